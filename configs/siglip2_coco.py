"""SigLIP2 Base/16 at 512 px final embeddings (d=768), SAE width 7168, on COCO captions (paper Section 2, Appendix A).

  python -m experiments.extract --config=configs/siglip2_coco.py --workdir=/tmp/siglip2_coco
  python -m experiments.train --config=configs/siglip2_coco.py --workdir=/tmp/siglip2_coco \
      --config.data.shard_dir=/tmp/siglip2_coco/activations/shards
Cost: 1024 patches per image: ~30 min on an A100 for COCO train; CPU is impractical (hours); shards ~2.2 GB fp32.
COCO is read from $COCO_ROOT (default data/coco): annotations/captions_train2017.json + train2017/.
Arg words (comma separated): "tiny" = local tiny random siglip2 model on the 11-image fixture
(seconds on a CPU, no download): --config=configs/siglip2_coco.py:tiny ; "karpathy" / "parquet" pick the
other COCO layouts; "online" trains with the encoder inside the input pipeline.
"""

from configs import base, coco_common


def get_config(arg: str = ""):
  config = base.get_config()
  return coco_common.apply(
    config,
    arg,
    __file__,
    model_name="google/siglip2-base-patch16-512",
    tiny_family="siglip2",
    d=768,
    c=7168,
    decoder=False,
    batch_size=32,
  )
