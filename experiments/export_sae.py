"""Exports a trained SAE for SAELens (`SAE.load_from_disk(out)`) or Overcomplete (`out/sae.pt`).

python -m experiments.export_sae --workdir=runs/clip --format=saelens --out=runs/clip-saelens
python -m experiments.export_sae --workdir=runs/clip --format=overcomplete --out=runs/clip-overcomplete
(seconds; the SAE's parameters are read once and written once)
"""

from absl import app, flags

from experiments import common
from sae_jax.interop import export

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_FORMAT = flags.DEFINE_string("format", None, f"One of {export.FORMATS}.")
_OUT = flags.DEFINE_string("out", None, "Directory to create (must not exist).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = newest.")
flags.mark_flags_as_required(["workdir", "format", "out"])


def export_and_report():
  step = None if _STEP.value < 0 else _STEP.value
  out = export.export_sae(_WORKDIR.value, _FORMAT.value, _OUT.value, step)
  print(f"exported {_WORKDIR.value} ({_FORMAT.value}) -> {out}")


def main(argv):
  common.run_main(argv, export_and_report)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
