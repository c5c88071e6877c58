"""Chameleon-7B last-layer residual stream (d=4096), SAE width 32768, on COCO captions (paper Section 2, Appendix A).

  python -m experiments.extract --config=configs/chameleon_coco.py --workdir=/tmp/chameleon_coco
  python -m experiments.train --config=configs/chameleon_coco.py --workdir=/tmp/chameleon_coco \
      --config.data.shard_dir=/tmp/chameleon_coco/activations/shards
Cost: 14 GB bf16 weights (gated); 1024 VQ image tokens per image: ~5-8 h on an A100 for COCO train; prefer ":online".
COCO is read from $COCO_ROOT (default data/coco): annotations/captions_train2017.json + train2017/.
Arg words (comma separated): "tiny" = local tiny random chameleon model on the 11-image fixture
(seconds on a CPU, no download): --config=configs/chameleon_coco.py:tiny ; "karpathy" / "parquet" pick the
other COCO layouts; "online" trains with the encoder inside the input pipeline.
"""

from configs import base, coco_common


def get_config(arg: str = ""):
  config = base.get_config()
  return coco_common.apply(
    config,
    arg,
    __file__,
    model_name="facebook/chameleon-7b",
    tiny_family="chameleon",
    d=4096,
    c=32768,
    decoder=True,
    batch_size=8,
  )
