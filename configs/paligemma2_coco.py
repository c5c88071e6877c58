"""PaliGemma2-3B-Mix-224 last-layer residual stream (d=2304), SAE width 20736, on COCO captions.

c=20736 is the width of the authors' released PaliGemma2 SAE; the paper's text gives 32768 for every
MLLM (set --config.sae.c=32768 for that reading).

  python -m experiments.extract --config=configs/paligemma2_coco.py --workdir=/tmp/paligemma2_coco
  python -m experiments.train --config=configs/paligemma2_coco.py --workdir=/tmp/paligemma2_coco \
      --config.data.shard_dir=/tmp/paligemma2_coco/activations/shards
Cost: 6 GB bf16 weights (gated on the hub: accept the license, `huggingface-cli login`); 256 image tokens per image: ~1-2 h on an A100 for COCO train.
COCO is read from $COCO_ROOT (default data/coco): annotations/captions_train2017.json + train2017/.
Arg words (comma separated): "tiny" = local tiny random paligemma model on the 11-image fixture
(seconds on a CPU, no download): --config=configs/paligemma2_coco.py:tiny ; "karpathy" / "parquet" pick the
other COCO layouts; "online" trains with the encoder inside the input pipeline.
"""

from configs import base, coco_common


def get_config(arg: str = ""):
  config = base.get_config()
  return coco_common.apply(
    config,
    arg,
    __file__,
    model_name="google/paligemma2-3b-mix-224",
    tiny_family="paligemma",
    d=2304,
    c=20736,
    decoder=True,
    batch_size=16,
  )
