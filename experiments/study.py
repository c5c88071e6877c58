"""The whole study, data to report: python -m experiments.study --config=configs/study_shapes.py --workdir=runs/shapes"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.study import driver as study

_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory; writes <workdir>/report/.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/study_shapes.py or configs/study_paper.py.", lock_config=True
)
flags.mark_flags_as_required(["config"])  # --workdir is checked after --print_config
flags.declare_key_flag("print_config")  # defined in experiments.common; shown by --help


def main(argv):
  common.run_main(
    argv,
    lambda: study.run_study(_CONFIG.value, _WORKDIR.value),
    config=_CONFIG,
    workdir=_WORKDIR,
    report=common.study_report(_CONFIG),
  )


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
