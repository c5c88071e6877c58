"""`experiments.train` with a fault on one process only (the others run normally).

  SAE_JAX_FAULT_PROCESS=1 SAE_JAX_FAULT_UNDER=/work/checkpoints/40 python -m tests.helpers.faulty_train <flags>
  SAE_JAX_FAULT_PROCESS=1 SAE_JAX_FAULT_DATA_AFTER=30 python -m tests.helpers.faulty_train <flags>

On the process whose --config.mesh.process_id is $SAE_JAX_FAULT_PROCESS:
- SAE_JAX_FAULT_UNDER: every file open under that path (through etils.epath, orbax's path layer)
  fails with TimeoutError("read timed out"): a persistent storage error seen by that host alone;
- SAE_JAX_FAULT_DATA_AFTER=n: training batches (this process's slice of each, read by grain's
  threads) of the activation shards after the first n fail with an I/O error
  naming the store's second shard (a disk error mid-run; a shard truncated under a memory map would
  end the process by SIGBUS instead, which is the lost-process case).
Without the variables it is plain `experiments.train`.
"""

import errno
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


def install_data_fault(after: int) -> None:
  from sae_jax.data import pipeline, shards

  real = pipeline.ShardBatches.__call__
  calls = [0]

  def call(self, i):
    if self.local_size == self.batch_size:  # init's and evaluation's whole batches: not counted
      return real(self, i)
    calls[0] += 1
    if calls[0] > after:
      path = shards.shard_path(self.store.directory, self.store.index["shards"][1]["name"])
      raise OSError(errno.EIO, "Input/output error", path)
    return real(self, i)

  pipeline.ShardBatches.__call__ = call


if __name__ == "__main__":
  fault = os.environ.get("SAE_JAX_FAULT_PROCESS")
  if fault is not None and int(fault) == _process_id(sys.argv):
    if "SAE_JAX_FAULT_UNDER" in os.environ:
      install_fault(os.environ["SAE_JAX_FAULT_UNDER"])
    if "SAE_JAX_FAULT_DATA_AFTER" in os.environ:
      install_data_fault(int(os.environ["SAE_JAX_FAULT_DATA_AFTER"]))
  app.run(train.main, flags_parser=common.parse_flags)
