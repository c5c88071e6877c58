"""Runs a short training in a fresh process (so XLA_FLAGS can fake devices) and saves the state.

  python -m tests.helpers.run_training WORKDIR OUT.npz MESH_DATA MESH_MODEL NUM_STEPS [PRESET]

Set XLA_FLAGS=--xla_force_host_platform_device_count=8 in the environment for 8 CPU devices.
"""

import sys

import jax
import numpy as np

from configs import synthetic
from sae_jax import sae as sae_lib
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib
from sae_jax.training import trainer


def tiny_config(mesh_data=1, mesh_model=1, num_steps=10, preset="modern"):
  config = synthetic.get_config(f"tiny,{preset}")
  config.sae.c = 64
  config.sae.k = 8
  config.data.batch_size = 64
  config.train.num_steps = num_steps
  config.train.checkpoint_every = 10
  config.train.log_every = 5
  config.train.async_checkpoint = False
  config.train.tensorboard = False
  config.mesh.data = mesh_data
  config.mesh.model = mesh_model
  return config


def final_state(workdir, config):
  """The newest checkpoint's full train state as a flat dict of numpy arrays."""
  spec = sae_lib.spec_from_config(config.sae)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state_lib.abstract_state(spec, config)
  )
  manager = ckpt_lib.make_manager(workdir)
  state, _ = ckpt_lib.restore(manager, manager.latest_step(), abstract)
  manager.close()
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def main(argv):
  workdir, out, data, model, steps = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
  preset = argv[6] if len(argv) > 6 else "modern"
  config = tiny_config(data, model, steps, preset)
  trainer.train_and_evaluate(config, workdir)
  np.savez(out, n_devices=len(jax.devices()), **final_state(workdir, config))


if __name__ == "__main__":
  main(sys.argv)
