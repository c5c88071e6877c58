"""Extracts VLM activations: python -m experiments.extract --config=configs/clip_coco.py --workdir=/tmp/clip

List every config field with its value: add --print_config (e.g. --config=configs/synthetic.py --print_config);
set one with --config.<section>.<field>=value.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.stages import extract

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; writes <workdir>/activations/.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*_coco.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])  # --workdir is checked after --print_config
flags.declare_key_flag("print_config")  # defined in experiments.common; shown by --help


def main(argv):
  common.run_main(
    argv,
    lambda: extract.run_extraction(_CONFIG.value, _WORKDIR.value),
    config=_CONFIG,
    workdir=_WORKDIR,
    report=common.extract_report(_CONFIG, _WORKDIR),
  )


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
