"""Export to SAELens's on-disk format (`SAE.load_from_disk(dir)`; what Neuronpedia and most SAE tools read).

A directory with `cfg.json` and `sae_weights.safetensors` laid out as sae-lens 6.x's inference
`TopKSAE` (architecture "topk"):

    z = scatter(ReLU(TopK_k((x - b_dec * apply_b_dec_to_input) W_enc + b_enc))),   x_hat = z W_dec + b_dec

SAELens takes the top k pre-activations and then applies ReLU; we apply ReLU first. Both give the
same dense codes: ReLU is monotone, so the k largest pre-activations and the k largest rectified
ones are the same entries whenever at least k are positive, and when fewer are, the extra entries
are 0 either way. SAELens does not renormalise W_dec, so the unit-norm dictionary is written.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import chex
import numpy as np

from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The sae-lens release whose TopKSAE layout this writer was checked against (its loader treats
# files that name a version below 6.0 as the older layout).
SAELENS_VERSION = "6.54.12"


def saelens_state_dict(params: dict, spec: sae_lib.SAESpec) -> dict[str, np.ndarray]:
  """SAELens TopKSAE tensors (float32) from our params; `params["D"]` must have unit-norm rows."""
  W_enc, b_enc, D = (np.asarray(params[n], np.float32) for n in ("W_enc", "b_enc", "D"))
  chex.assert_shape(W_enc, (spec.d, spec.c))
  chex.assert_shape(D, (spec.c, spec.d))
  chex.assert_shape(b_enc, (spec.c,))
  # Without a pre-bias our model has no decoder bias (b_dec is neither subtracted nor added).
  b_dec = np.asarray(params["b_dec"], np.float32) if spec.pre_bias else np.zeros(spec.d, np.float32)
  return {
    "W_enc": np.ascontiguousarray(W_enc),
    "b_enc": np.ascontiguousarray(b_enc),
    "W_dec": np.ascontiguousarray(D),
    "b_dec": np.ascontiguousarray(b_dec),
  }


def saelens_cfg(spec: sae_lib.SAESpec, metadata: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """`cfg.json` of a SAELens TopKSAE for `spec`; `metadata` (model_name, hook_name, ...) goes
  under "metadata", which SAELens keeps as free-form attributes."""
  return {
    "d_in": spec.d,
    "d_sae": spec.c,
    "dtype": "float32",
    "device": "cpu",
    # With the pre-bias off b_dec is exported as zeros, so either value encodes the same; False
    # says what the model computes.
    "apply_b_dec_to_input": bool(spec.pre_bias),
    "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": {
      "sae_lens_version": SAELENS_VERSION,
      "sae_lens_training_version": None,
      **(metadata or {}),
    },
    "k": spec.k,
    "rescale_acts_by_decoder_norm": False,
    "architecture": "topk",
  }


def write_saelens(
  directory: str, params: dict, spec: sae_lib.SAESpec, metadata: Optional[dict] = None
) -> None:
  """Writes `cfg.json` and `sae_weights.safetensors` into the existing `directory`."""
  from safetensors.numpy import save_file  # the `interop` extra

  if not os.path.isdir(directory):
    raise SaeJaxError(f"{directory}: SAELens export directory does not exist")
  tensors = saelens_state_dict(params, spec)
  bad = [n for n, t in tensors.items() if not np.isfinite(t).all()]
  if bad:
    raise SaeJaxError(f"SAELens export: parameter {bad[0]} holds NaN or Inf; refusing to write it")
  weights = os.path.join(directory, WEIGHTS_FILE)
  save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
  os.replace(weights + ".tmp", weights)
  cfg = saelens_cfg(spec, metadata)
  workdir_lib.atomic_write_text(os.path.join(directory, CFG_FILE), json.dumps(cfg, indent=1) + "\n")
