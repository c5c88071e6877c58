"""Zero-shot retrieval tables: python -m experiments.retrieve --config=configs/synthetic.py --workdir=/tmp/sae"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from sae_jax.stages import retrieve

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; writes <workdir>/retrieval/.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  common.run_main(argv, lambda: retrieve.run_retrieval(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
