"""One process of a multi-process run on this machine (coordinator on 127.0.0.1).

python -m tests.helpers.run_multiprocess WORKDIR PORT NUM_PROCESSES PROCESS_ID NUM_STEPS
"""

import sys

import jax

from sae_jax.training import trainer
from tests.helpers.run_training import tiny_config


def main(argv):
  workdir, port, n, pid, steps = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
  config = tiny_config(mesh_data=-1, mesh_model=2, num_steps=steps)
  config.mesh.multihost = True
  config.mesh.coordinator_address = f"127.0.0.1:{port}"
  config.mesh.num_processes = n
  config.mesh.process_id = pid
  trainer.train_and_evaluate(config, workdir)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
