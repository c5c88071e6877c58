"""Extracts VLM activations: python -m experiments.extract --config=configs/clip_coco.py --workdir=/tmp/clip"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.stages import extract

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; writes <workdir>/activations/.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*_coco.py file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  common.run_main(argv, lambda: extract.run_extraction(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
