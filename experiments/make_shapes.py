"""Writes the shapes world in the COCO captions layout: python -m experiments.make_shapes --out=data/shapes

Sizes and seed from `config.shapes` (`--config.shapes.train_images=...`; default configs/study_common.py).
`--coco_mini` writes instead the 11-image set in the COCO val2017 layout that the `:tiny` model presets
read from $COCO_MINI: python -m experiments.make_shapes --coco_mini --out=data/coco-mini
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.study import shapes_files

_OUT = flags.DEFINE_string("out", None, "Directory for images/, captions_<split>.json, scenes_<split>.json.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/study_common.py", "A configs/study_*.py file.", lock_config=True
)
_COCO_MINI = flags.DEFINE_bool(
  "coco_mini",
  False,
  "Write the 11-image COCO val2017-layout set (captions.json, images/) of the tiny presets.",
)
flags.mark_flags_as_required(["out"])


def _write():
  if _COCO_MINI.value:
    return shapes_files.write_coco_mini(_OUT.value, seed=int(_CONFIG.value.shapes.seed))
  return shapes_files.write_shapes(_CONFIG.value.shapes, _OUT.value)


def main(argv):
  common.run_main(argv, _write, config=_CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
