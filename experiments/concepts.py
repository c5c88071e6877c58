"""The concept browser: python -m experiments.concepts --config=configs/synthetic.py --workdir=/tmp/sae

Writes <workdir>/concepts/ (index.html, cards/, concepts.json) for an analysed workdir (run
experiments.analyze first; experiments.retrieve adds the removal set). List every config field with
--print_config; set one with --config.concepts.<field>=value.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.stages import concepts

_WORKDIR = flags.DEFINE_string("workdir", None, "Analysed run directory; writes <workdir>/concepts/.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])  # --workdir is checked after --print_config
flags.declare_key_flag("print_config")  # defined in experiments.common; shown by --help


def main(argv):
  common.run_main(
    argv,
    lambda: concepts.run_concepts(_CONFIG.value, _WORKDIR.value, log=print),
    config=_CONFIG,
    workdir=_WORKDIR,
  )


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
