"""Qwen2-VL-7B-Instruct last-layer residual stream (d=3584), SAE width 32768, on COCO captions (paper Section 2, Appendix A).

  python -m experiments.extract --config=configs/qwen2vl_coco.py --workdir=/tmp/qwen2vl_coco
  python -m experiments.train --config=configs/qwen2vl_coco.py --workdir=/tmp/qwen2vl_coco \
      --config.data.shard_dir=/tmp/qwen2vl_coco/activations/shards
Cost: 16 GB bf16 weights, one >=24 GB GPU; ~300-700 tokens per 640x480 image: ~3-5 h on an A100 for COCO train; token shards are huge (~1.4 KB/token fp32 -> ~1 TB): prefer data.source=online (":online").
COCO is read from $COCO_ROOT (default data/coco): annotations/captions_train2017.json + train2017/.
Arg words (comma separated): "tiny" = local tiny random qwen2_vl model on the 11-image fixture
(seconds on a CPU, no download): --config=configs/qwen2vl_coco.py:tiny ; "karpathy" / "parquet" pick the
other COCO layouts; "online" trains with the encoder inside the input pipeline.
"""

from configs import base, coco_common


def get_config(arg: str = ""):
  config = base.get_config()
  return coco_common.apply(
    config,
    arg,
    __file__,
    model_name="Qwen/Qwen2-VL-7B-Instruct",
    tiny_family="qwen2_vl",
    d=3584,
    c=32768,
    decoder=True,
    batch_size=8,
  )
