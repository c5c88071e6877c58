"""`experiments.train` with a storage fault on one process only (the others read normally).

  SAE_JAX_FAULT_PROCESS=1 SAE_JAX_FAULT_UNDER=/work/checkpoints/40 python -m tests.helpers.faulty_train <flags>

On the process whose --config.mesh.process_id is $SAE_JAX_FAULT_PROCESS, every file open under
$SAE_JAX_FAULT_UNDER (through etils.epath, orbax's path layer) fails with TimeoutError("read timed
out"): a persistent storage error seen by that host alone. Without the variables it is plain
`experiments.train`.
"""

import os
import sys

from absl import app

from experiments import common, train


def _process_id(argv) -> int:
  for a in argv:
    if a.startswith("--config.mesh.process_id="):
      return int(a.split("=", 1)[1])
  return -1


def install_fault(under: str) -> None:
  from etils.epath import backend

  real = type(backend.os_backend).open

  def open_(backend_self, path, mode, *args, **kwargs):
    if str(path).startswith(under):
      raise TimeoutError("read timed out")
    return real(backend_self, path, mode, *args, **kwargs)

  type(backend.os_backend).open = open_


if __name__ == "__main__":
  fault = os.environ.get("SAE_JAX_FAULT_PROCESS")
  if fault is not None and int(fault) == _process_id(sys.argv):
    install_fault(os.environ["SAE_JAX_FAULT_UNDER"])
  app.run(train.main, flags_parser=common.parse_flags)
