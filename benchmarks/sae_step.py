"""The real jitted train step on a fresh state, for benchmarks that time it beside something else."""

import jax
import numpy as np

from sae_jax import sae as sae_lib
from sae_jax import sharding as shard_lib
from sae_jax.training import state as state_lib
from sae_jax.training import step as step_lib


def fresh_step(cfg):
  """(step, state, put_batch) for `cfg`: `put_batch(rows)` places a host batch and its all-valid mask."""
  spec = sae_lib.spec_from_config(cfg.sae)
  optimizer = state_lib.make_optimizer(cfg.optim, 100)
  mesh = shard_lib.make_mesh(cfg.mesh)
  state_sharding = shard_lib.state_shardings(state_lib.abstract_state(spec, cfg), mesh)
  state = jax.device_put(
    state_lib.init_state(sae_lib.init_params(jax.random.key(0), spec, None), optimizer), state_sharding
  )
  step = step_lib.jit_train_step(spec, optimizer, mesh, state_sharding)
  bsh, vsh = shard_lib.batch_sharding(mesh), shard_lib.rows_sharding(mesh)

  def put_batch(rows: np.ndarray):
    return jax.device_put(rows, bsh), jax.device_put(np.ones(rows.shape[0], np.float32), vsh)

  return step, state, put_batch
