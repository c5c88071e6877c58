"""orbax checkpoints of a training run (loading a trained SAE for other stages: `sae_jax.workdir`).

`<workdir>/checkpoints/<step>/` holds three items:
  state  the train state pytree (params, Adam moments, step, dead-latent counters), StandardSave
  data   the grain iterator position, grain.checkpoint.CheckpointSave
  meta   JSON: step, tokens seen, the resolved SAE spec (rows skipped is a counter in `state`)
Saves are atomic (orbax writes a temporary directory and renames it), so a killed run leaves the
previous checkpoint intact. Restores take an abstract target carrying NamedShardings, so a run
saved on one mesh resumes on another.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from sae_jax.errors import SaeJaxError

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: str, train_cfg: Any = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=int(train_cfg.max_to_keep) if train_cfg is not None else None,
    enable_async_checkpointing=bool(train_cfg.async_checkpoint) if train_cfg is not None else False,
    create=True,
  )
  handlers = {
    "state": ocp.StandardCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), item_handlers=handlers, options=options
  )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: dict) -> None:
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta),
    ),
  )


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
        f"config implies {tuple(want.shape)} (config.sae.d / config.sae.c changed?)"
      )


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any = None
) -> tuple[Any, dict]:
  """Restores (state, meta) at `step` onto the shardings of `abstract_state`; sets `data_iter`."""
  _check_shapes(manager, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  # An imported SAE (import_overcomplete) has no data position: its stream starts at batch 0.
  if data_iter is not None and os.path.isdir(os.path.join(str(manager.directory), str(step), "data")):
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SaeJaxError(f"checkpoint {manager.directory}/{step} does not match the config: {first}") from None
  return restored["state"], dict(restored["meta"])
