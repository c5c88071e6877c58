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
  # An imported SAE (import_overcomplete) has no data position: its stream starts at batch 0.
  if data_iter is not None and os.path.isdir(os.path.join(str(manager.directory), str(step), "data")):
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


# --------------------------------------------------------------------- other formats

OVERCOMPLETE_KEYS = ("encoder.final_block.0.weight", "encoder.final_block.0.bias", "dictionary._weights")


def params_from_overcomplete(state_dict: dict, source: str = "state dict") -> dict:
  """Our params from an Overcomplete TopKSAE state dict (the authors' released `sae_<model>.pt`)."""
  missing = [k for k in OVERCOMPLETE_KEYS if k not in state_dict]
  if missing:
    raise SaeJaxError(f"{source}: missing {missing[0]!r}; expected an Overcomplete TopKSAE state dict "
                      f"with keys {list(OVERCOMPLETE_KEYS)}")
  as_np = lambda t: np.asarray(t.detach().cpu().float().numpy() if hasattr(t, "detach") else t, np.float32)
  W = as_np(state_dict["encoder.final_block.0.weight"])  # [c, d] (torch Linear layout)
  b = as_np(state_dict["encoder.final_block.0.bias"])
  D = as_np(state_dict["dictionary._weights"])
  if D.shape != W.shape or b.shape != (W.shape[0],):
    raise SaeJaxError(f"{source}: encoder weight {W.shape}, bias {b.shape} and dictionary {D.shape} "
                      "do not describe one SAE ([c, d], [c], [c, d])")
  if "dictionary.multiplier" in state_dict and float(as_np(state_dict["dictionary.multiplier"])) != 0.0:
    raise SaeJaxError(f"{source}: dictionary.multiplier != 0 (use_multiplier=True) is not supported")
  D = D / (np.linalg.norm(D, axis=1, keepdims=True) + 1e-8)
  return {"W_enc": W.T.copy(), "b_enc": b, "D": D, "b_dec": np.zeros(W.shape[1], np.float32)}


def import_overcomplete(pt_path: str, workdir: str, k: int, config: Optional[Any] = None) -> LoadedSAE:
  """Writes a workdir (config.json + checkpoint at step 0) from an Overcomplete `.pt` checkpoint,
  so every stage (`load_sae`, analysis, retrieval) can use the authors' published SAEs."""
  import torch
  from configs import base
  from sae_jax import sae as sae_lib, train as train_lib
  if not os.path.exists(pt_path):
    raise SaeJaxError(f"{pt_path}: no such file")
  try:
    obj = torch.load(pt_path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors come in many types
    raise SaeJaxError(f"{pt_path}: not a loadable torch checkpoint ({type(e).__name__})") from None
  state_dict = obj.get("model_state", obj) if isinstance(obj, dict) else None
  if not isinstance(state_dict, dict):
    raise SaeJaxError(f"{pt_path}: expected a dict (with 'model_state'), got {type(obj).__name__}")
  params = params_from_overcomplete(state_dict, pt_path)
  d, c = params["W_enc"].shape
  config = config or base.get_config()
  config.sae.preset, config.sae.d, config.sae.c, config.sae.k = "paper", int(d), int(c), int(k)
  spec = sae_lib.spec_from_config(config.sae)
  optimizer = train_lib.make_optimizer(config.optim, int(config.train.num_steps))
  state = train_lib.init_state({k_: jax.numpy.asarray(v) for k_, v in params.items()}, optimizer)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump({**json.loads(config.to_json()), "sae_spec": dataclasses.asdict(spec),
               "imported_from": os.path.abspath(pt_path)}, f, indent=1)
  manager = make_manager(workdir)
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({"step": 0, "imported_from": pt_path})))
  manager.wait_until_finished()
  manager.close()
  return load_sae(workdir)
