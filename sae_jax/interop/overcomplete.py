"""Import of the paper authors' Overcomplete TopKSAE checkpoints (`sae_<model>.pt`) into a workdir.

The released files are torch dicts whose `model_state` holds `encoder.final_block.0.weight` [c, d],
`encoder.final_block.0.bias` [c] and `dictionary._weights` [c, d]; the top-k is not stored.
"""

from __future__ import annotations

import os

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
  D = D / (np.linalg.norm(D, axis=1, keepdims=True) + 1e-8)
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
