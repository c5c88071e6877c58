"""Qwen3-VL-8B-Instruct last-layer residual stream (d=4096), SAE width 32768, on COCO captions (paper Section 2, Appendix A).

  python -m experiments.extract --config=configs/qwen3vl_coco.py --workdir=/tmp/qwen3vl_coco
  python -m experiments.train --config=configs/qwen3vl_coco.py --workdir=/tmp/qwen3vl_coco \
      --config.data.shard_dir=/tmp/qwen3vl_coco/activations/shards
Cost: 17 GB bf16 weights, one >=24 GB GPU; ~3-5 h on an A100 for COCO train; token shards ~1.6 KB/token fp32: prefer ":online".
COCO is read from $COCO_ROOT (default data/coco): annotations/captions_train2017.json + train2017/.
Arg words (comma separated): "tiny" = local tiny random qwen3_vl model on the 11-image fixture
(seconds on a CPU, no download): --config=configs/qwen3vl_coco.py:tiny ; "karpathy" / "parquet" pick the
other COCO layouts; "online" trains with the encoder inside the input pipeline.
"""

from configs import base, coco_common


def get_config(arg: str = ""):
  config = base.get_config()
  return coco_common.apply(
    config,
    arg,
    __file__,
    model_name="Qwen/Qwen3-VL-8B-Instruct",
    tiny_family="qwen3_vl",
    d=4096,
    c=32768,
    decoder=True,
    batch_size=8,
  )
