"""CLIP ViT-B/32 final projected embeddings (d=512), SAE width 7168, on COCO captions (paper Section 2, Appendix A).

  python -m experiments.extract --config=configs/clip_coco.py --workdir=/tmp/clip_coco
  python -m experiments.train --config=configs/clip_coco.py --workdir=/tmp/clip_coco \
      --config.data.shard_dir=/tmp/clip_coco/activations/shards
Cost: ~1 ms/image on one GPU; 118k train images + 591k captions: ~10 min on an A100, ~1-2 h on 16 CPU cores; shards ~1.4 GB fp32.
COCO is read from $COCO_ROOT (default data/coco): annotations/captions_train2017.json + train2017/.
Arg words (comma separated): "tiny" = local tiny random clip model on the 11-image fixture
(seconds on a CPU, no download): --config=configs/clip_coco.py:tiny ; "karpathy" / "parquet" pick the
other COCO layouts; "online" trains with the encoder inside the input pipeline.
"""

from configs import base, coco_common


def get_config(arg: str = ""):
  config = base.get_config()
  return coco_common.apply(
    config,
    arg,
    __file__,
    model_name="openai/clip-vit-base-patch32",
    tiny_family="clip",
    d=512,
    c=7168,
    decoder=False,
    batch_size=64,
  )
