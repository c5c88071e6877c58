"""Import of the paper authors' Overcomplete TopKSAE checkpoints (`sae_<model>.pt`) into a workdir.

The released files are torch dicts whose `model_state` holds `encoder.final_block.0.weight` [c, d],
`encoder.final_block.0.bias` [c] and `dictionary._weights` [c, d]; the top-k is not stored.
`write_overcomplete` writes ours in the same layout (`experiments.export_sae --format=overcomplete`).
"""

from __future__ import annotations

import os

import chex
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib

OVERCOMPLETE_KEYS = ("encoder.final_block.0.weight", "encoder.final_block.0.bias", "dictionary._weights")


def params_from_overcomplete(state_dict: dict, source: str = "state dict") -> dict:
  """Our params from an Overcomplete TopKSAE state dict (the authors' released `sae_<model>.pt`)."""
  missing = [k for k in OVERCOMPLETE_KEYS if k not in state_dict]
  if missing:
    raise SaeJaxError(
      f"{source}: missing {missing[0]!r}; expected an Overcomplete TopKSAE state dict "
      f"with keys {list(OVERCOMPLETE_KEYS)}"
    )
  as_np = lambda t: np.asarray(t.detach().cpu().float().numpy() if hasattr(t, "detach") else t, np.float32)
  W = as_np(state_dict["encoder.final_block.0.weight"])  # [c, d] (torch Linear layout)
  b = as_np(state_dict["encoder.final_block.0.bias"])
  D = as_np(state_dict["dictionary._weights"])
  if D.shape != W.shape or b.shape != (W.shape[0],):
    raise SaeJaxError(
      f"{source}: encoder weight {W.shape}, bias {b.shape} and dictionary {D.shape} "
      "do not describe one SAE ([c, d], [c], [c, d])"
    )
  if "dictionary.multiplier" in state_dict and float(as_np(state_dict["dictionary.multiplier"])) != 0.0:
    raise SaeJaxError(f"{source}: dictionary.multiplier != 0 (use_multiplier=True) is not supported")
  # D is kept as stored: Overcomplete renormalises `_weights` where it uses them, and so do
  # `load_sae` and the paper preset's train step, so export -> import is an exact round trip.
  return {"W_enc": W.T.copy(), "b_enc": b, "D": D, "b_dec": np.zeros(W.shape[1], np.float32)}


def import_overcomplete(
  pt_path: str, workdir: str, k: int, config: ml_collections.ConfigDict
) -> workdir_lib.LoadedSAE:
  """Writes a workdir (config.json + checkpoint at step 0) from an Overcomplete `.pt` checkpoint,
  so every stage (`load_sae`, analysis, retrieval) can use the authors' published SAEs.

  `config` supplies everything the .pt does not hold (optimizer, stages); its `sae` fields are
  overwritten with the paper preset and the checkpoint's d, c and the given k.
  """
  import torch  # the `extract` extra

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
  config = config.copy_and_resolve_references()
  config.sae.preset, config.sae.d, config.sae.c, config.sae.k = "paper", int(d), int(c), int(k)
  spec = sae_lib.spec_from_config(config.sae)
  optimizer = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
  state = state_lib.init_state({k_: jax.numpy.asarray(v) for k_, v in params.items()}, optimizer)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(
    workdir, {**workdir_lib.resolved_config_dict(config, spec), "imported_from": os.path.abspath(pt_path)}
  )
  manager = ckpt_lib.make_manager(workdir)
  manager.save(
    0,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 0, "imported_from": pt_path})
    ),
  )
  manager.wait_until_finished()
  manager.close()
  return workdir_lib.load_sae(workdir)


def overcomplete_state_dict(params: dict, spec: sae_lib.SAESpec) -> dict:
  """An Overcomplete TopKSAE(d, c, top_k=k) state dict (torch float32 tensors) from our params.

  Overcomplete's TopKSAE has no pre-bias or decoder bias, so a `b_dec` that is not all zero (the
  `modern` preset) cannot be expressed and is refused.
  """
  import torch  # the `interop` extra

  W_enc, b_enc, D = (np.asarray(params[n], np.float32) for n in ("W_enc", "b_enc", "D"))
  chex.assert_shape(W_enc, (spec.d, spec.c))
  chex.assert_shape(D, (spec.c, spec.d))
  b_dec = np.asarray(params["b_dec"], np.float32)
  if spec.pre_bias and np.any(b_dec != 0):
    raise SaeJaxError(
      f"Overcomplete export: this SAE has a decoder bias b_dec (preset {spec.preset!r}, pre_bias on) and "
      "Overcomplete's TopKSAE has none; export it with --format=saelens"
    )
  as_t = lambda a: torch.from_numpy(np.array(a, np.float32, order="C"))  # a writable copy
  return {
    "encoder.final_block.0.weight": as_t(W_enc.T),  # torch Linear layout [c, d]
    "encoder.final_block.0.bias": as_t(b_enc),
    "dictionary._weights": as_t(D),
    "dictionary.multiplier": torch.tensor(0.0),  # exp(0) = 1: no learned scale
  }


def write_overcomplete(path: str, params: dict, spec: sae_lib.SAESpec, metadata: dict) -> None:
  """Writes `{"model_state": state dict, "top_k": k, "sae_jax": metadata}` to `path` (torch.save),
  the layout of the authors' released `.pt` files that `import_overcomplete` reads."""
  import torch

  state_dict = overcomplete_state_dict(params, spec)
  bad = [n for n, t in state_dict.items() if not bool(torch.isfinite(t).all())]
  if bad:
    raise SaeJaxError(f"Overcomplete export: parameter {bad[0]} holds NaN or Inf; refusing to write it")
  tmp = path + ".tmp"
  torch.save({"model_state": state_dict, "top_k": int(spec.k), "sae_jax": metadata}, tmp)
  os.replace(tmp, path)
