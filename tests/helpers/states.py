"""A workdir's checkpointed train state as numpy arrays, for bit-identical resume checks."""

import jax
import numpy as np

from sae_jax import workdir as workdir_lib
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib


def checkpoint_state(workdir, step=None) -> dict:
  """The full train state of a checkpoint (params, Adam moments, counters; newest without `step`)
  as {path: numpy array}, restored onto one device."""
  config = workdir_lib.read_config(str(workdir))
  spec = workdir_lib.spec_of_config(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state_lib.abstract_state(spec, config)
  )
  manager = ckpt_lib.make_manager(str(workdir))
  state, _ = ckpt_lib.restore(manager, step if step is not None else manager.latest_step(), abstract)
  manager.close()
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_identical(a: dict, b: dict) -> None:
  """Two states with the same leaves, equal bit for bit."""
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
