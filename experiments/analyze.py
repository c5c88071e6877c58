"""Concept metrics, Table 1 and Figures 2-3: python -m experiments.analyze --config=configs/synthetic.py --workdir=/tmp/sae

List every config field with its value: add --print_config (e.g. --config=configs/synthetic.py --print_config);
set one with --config.<section>.<field>=value.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.stages import analyze

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; writes <workdir>/analysis/.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])  # --workdir is checked after --print_config
flags.declare_key_flag("print_config")  # defined in experiments.common; shown by --help


def _analyze():
  config = _CONFIG.value
  sae_dir = str(config.analysis.sae_workdir) or _WORKDIR.value
  common.refuse_overrides_of_the_workdir(_CONFIG, sae_dir, "experiments.analyze")
  return analyze.run_analysis(config, _WORKDIR.value, log=print)


def main(argv):
  common.run_main(
    argv,
    _analyze,
    config=_CONFIG,
    workdir=_WORKDIR,
  )


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
