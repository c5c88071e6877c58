"""Sharding, expressed once: mesh axes, partition rules by parameter name, multi-host start-up.

Mesh axes: "data" splits the batch, "model" splits the dictionary (the c axis). Every array of
the train state gets its PartitionSpec from PARTITION_RULES by the name of its leaf, so the
optimizer's moments follow their parameters without per-call-site annotations.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.errors import SaeJaxError

DATA, MODEL = "data", "model"

# leaf name -> spec; leaves not named here (step counters, scalars) are replicated.
PARTITION_RULES: dict[str, P] = {
  "W_enc": P(None, MODEL),  # [d, c]
  "b_enc": P(MODEL),  # [c]
  "D": P(MODEL, None),  # [c, d]
  "b_dec": P(),  # [d]
  "tokens_since_fired": P(MODEL),  # [c]
}
BATCH_SPEC = P(DATA, None)

# ZeRO-1 (`config.mesh.shard_optimizer`): the Adam moments (and the reduce-scattered gradients)
# are split over "data" as well, along a d axis (b_enc: within each model shard).
ZERO_RULES: dict[str, P] = {
  "W_enc": P(DATA, MODEL),  # [d, c]
  "b_enc": P((MODEL, DATA)),  # [c]
  "D": P(MODEL, DATA),  # [c, d]
  "b_dec": P(DATA),  # [d]
}


def maybe_initialize_distributed(mesh_cfg: Any) -> None:
  """jax.distributed.initialize for multi-host runs (TPU pods, SLURM) when the config asks."""
  if not mesh_cfg.multihost:
    return
  # The coordination service's timeouts: a process that stops sending heartbeats for
  # heartbeat_timeout_s is declared dead and every other process is ended (natively, by jax).
  kwargs = dict(
    initialization_timeout=int(mesh_cfg.init_timeout_s),
    heartbeat_timeout_seconds=int(mesh_cfg.heartbeat_timeout_s),
    shutdown_timeout_seconds=int(mesh_cfg.shutdown_timeout_s),
  )
  if mesh_cfg.coordinator_address:
    kwargs.update(
      coordinator_address=mesh_cfg.coordinator_address,
      num_processes=int(mesh_cfg.num_processes),
      process_id=int(mesh_cfg.process_id),
    )
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if "already" not in str(e):
      raise


def make_mesh(mesh_cfg: Any, devices=None) -> Mesh:
  """A ("data", "model") mesh; mesh.data=-1 takes every device not used by mesh.model."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  model = int(mesh_cfg.model)
  data = int(mesh_cfg.data)
  if model <= 0 or n % model:
    raise SaeJaxError(f"config.mesh.model={model}: must be a positive divisor of the {n} devices")
  if data == -1:
    data = n // model
  if data * model != n:
    raise SaeJaxError(
      f"config.mesh.data={mesh_cfg.data} x config.mesh.model={model} = {data * model}, "
      f"but {n} devices are visible"
    )
  # Auto axis types: lax.top_k over an Explicit-sharded axis fails in jax 0.10.
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2, devices=devices)


def _leaf_name(path) -> str:
  for entry in reversed(path):
    if isinstance(entry, jax.tree_util.DictKey):
      return str(entry.key)
  return ""


def _in_opt_state(path) -> bool:
  return any(isinstance(e, jax.tree_util.DictKey) and e.key == "opt_state" for e in path)


def spec_for(path, leaf, shard_optimizer: bool = False) -> P:
  rules = ZERO_RULES if shard_optimizer and _in_opt_state(path) else PARTITION_RULES
  spec = rules.get(_leaf_name(path))
  if spec is None or len(spec) != np.ndim(leaf):
    return P()
  return spec


def state_shardings(state: Any, mesh: Mesh, shard_optimizer: bool = False) -> Any:
  """NamedSharding for every leaf of a (possibly abstract) state pytree; with `shard_optimizer`
  the optimizer's moments follow ZERO_RULES."""
  zero = shard_optimizer and mesh.shape[DATA] > 1
  return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec_for(p, x, zero)), state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """A per-row vector of the batch (the `valid` mask): split like the batch rows."""
  return NamedSharding(mesh, P(DATA))


def check_divisible(mesh: Mesh, batch_size: int, c: int, d: int = 0, shard_optimizer: bool = False) -> None:
  dp, mp = mesh.shape[DATA], mesh.shape[MODEL]
  if batch_size % dp:
    raise SaeJaxError(f"config.data.batch_size={batch_size} is not divisible by mesh data axis {dp}")
  if c % mp:
    raise SaeJaxError(f"config.sae.c={c} is not divisible by mesh model axis {mp}")
  if shard_optimizer and dp > 1 and (d % dp or (c // mp) % dp):
    raise SaeJaxError(
      f"config.mesh.shard_optimizer=True needs config.sae.d={d} and config.sae.c/mesh.model={c // mp} "
      f"divisible by the mesh data axis {dp}"
    )
