"""Writes the shapes world in the COCO captions layout: python -m experiments.make_shapes --out=data/shapes

Sizes and seed from `config.shapes` (`--config.shapes.train_images=...`; default configs/base.py).
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.data import shapes

_OUT = flags.DEFINE_string("out", None, "Directory for images/, captions_<split>.json, scenes_<split>.json.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/base.py", "A configs/*.py file.", lock_config=True
)
flags.mark_flags_as_required(["out"])


def main(argv):
  common.run_main(argv, lambda: shapes.write_shapes(_CONFIG.value.shapes, _OUT.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
