"""orbax checkpoints of a training run, and loading a trained SAE for the other stages.

`<workdir>/checkpoints/<step>/` holds three items:
  state  the train state pytree (params, Adam moments, step, dead-latent counters), StandardSave
  data   the grain iterator position, grain.checkpoint.CheckpointSave
  meta   JSON: step, tokens seen, rows skipped, the resolved SAE spec
Saves are atomic (orbax writes a temporary directory and renames it), so a killed run leaves the
previous checkpoint intact. Restores take an abstract target carrying NamedShardings, so a run
saved on one mesh resumes on another.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Optional

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sae_jax.errors import SaeJaxError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def make_manager(workdir: str, train_cfg: Any = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(train_cfg.max_to_keep) if train_cfg is not None else None,
      enable_async_checkpointing=bool(train_cfg.async_checkpoint) if train_cfg is not None else False,
      create=True,
  )
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                               item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)))


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """A clear error when the stored arrays do not have the shapes the config implies."""
  try:
    stored = manager.item_metadata(step)["state"]
  except Exception:  # metadata is an optimisation; restore still validates
    return
  if stored is None:
    return
  stored_params = stored.get("params", {}) if hasattr(stored, "get") else {}
  for name, want in abstract_state["params"].items():
    got = stored_params.get(name) if hasattr(stored_params, "get") else None
    if got is not None and tuple(got.shape) != tuple(want.shape):
      raise SaeJaxError(
          f"checkpoint {manager.directory}/{step}: params/{name} has shape {tuple(got.shape)}, the "
          f"config implies {tuple(want.shape)} (config.sae.d / config.sae.c changed?)")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any = None) -> tuple[Any, dict]:
  """Restores (state, meta) at `step` onto the shardings of `abstract_state`; sets `data_iter`."""
  _check_shapes(manager, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SaeJaxError(f"checkpoint {manager.directory}/{step} does not match the config: {first}") from None
  return restored["state"], dict(restored["meta"])


class LoadedSAE(NamedTuple):
  params: dict          # numpy arrays; D has unit-norm rows
  k: int
  config: ml_collections.ConfigDict
  step: int


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise SaeJaxError(f"{path} is missing: {workdir} is not an sae-jax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_sae(workdir: str, step: Optional[int] = None) -> LoadedSAE:
  """The SAE parameters of a training workdir (newest checkpoint unless `step`), on the host."""
  from sae_jax import sae as sae_lib, train as train_lib  # train imports this module
  config = read_config(workdir)
  manager = make_manager(workdir)
  steps = manager.all_steps()
  if not steps:
    raise SaeJaxError(f"{os.path.join(workdir, CHECKPOINT_DIR)}: no checkpoint found "
                      "(train first with experiments.train)")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise SaeJaxError(f"{workdir}: no checkpoint at step {step}; available: {sorted(steps)}")
  spec = sae_lib.SAESpec(**config.sae_spec.to_dict()) if "sae_spec" in config else \
      sae_lib.spec_from_config(config.sae)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          train_lib.abstract_state(spec, config))
  state, _ = restore(manager, step, abstract)
  manager.close()
  params = {k: np.asarray(v) for k, v in state["params"].items()}
  params["D"] = np.asarray(sae_lib.normalize_rows(params["D"]))
  return LoadedSAE(params, spec.k, config, int(step))
