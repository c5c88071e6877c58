"""Imports an Overcomplete SAE checkpoint (the paper authors' `sae_<model>.pt`) into a workdir.

python -m experiments.import_sae --pt=sae_qwen2vl.pt --k=50 --workdir=runs/qwen2vl-authors
"""

from absl import app, flags

from configs import base
from experiments import common
from sae_jax.interop import overcomplete

_PT = flags.DEFINE_string("pt", None, "Overcomplete TopKSAE .pt (dict with 'model_state').")
_K = flags.DEFINE_integer("k", 50, "Top-k the SAE was trained with (not stored in the .pt).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to create (config.json + checkpoints/0).")
flags.mark_flags_as_required(["pt", "workdir"])


def import_and_report():
  sae = overcomplete.import_overcomplete(_PT.value, _WORKDIR.value, _K.value, base.get_config())
  d, c = sae.params["W_enc"].shape
  print(f"imported {_PT.value} -> {_WORKDIR.value}/checkpoints/0 (d={d}, c={c}, k={sae.k})")


def main(argv):
  common.run_main(argv, import_and_report)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
