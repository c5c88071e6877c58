"""Importing the authors' Overcomplete checkpoints (`sae_<model>.pt`, a dict with `model_state`)."""

import numpy as np
import pytest
import torch

from configs import base
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.interop import overcomplete as overcomplete_lib


def _authors_style_checkpoint(path, d=24, c=80, seed=0):
  g = torch.Generator().manual_seed(seed)
  state = {
    "encoder.final_block.0.weight": torch.randn(c, d, generator=g),
    "encoder.final_block.0.bias": torch.randn(c, generator=g) * 0.1,
    "dictionary._weights": torch.randn(c, d, generator=g) * 3.0,  # not yet renormalised
    "dictionary.multiplier": torch.tensor(0.0),
  }
  torch.save({"model_state": state, "epoch": 7}, path)
  return {k: v.numpy() for k, v in state.items()}


def test_import_then_encode_matches_torch_reference(tmp_path):
  raw = _authors_style_checkpoint(tmp_path / "sae_clip.pt")
  loaded = overcomplete_lib.import_overcomplete(
    str(tmp_path / "sae_clip.pt"), str(tmp_path / "w"), k=5, config=base.get_config()
  )
  assert loaded.k == 5 and loaded.step == 0 and loaded.config.sae.c == 80
  x = np.random.default_rng(0).standard_normal((7, 24)).astype(np.float32)
  # Overcomplete: z = topk(relu(x W^T + b)), x_hat = z (W_d / (||W_d|| + 1e-8)).
  acts = np.maximum(x @ raw["encoder.final_block.0.weight"].T + raw["encoder.final_block.0.bias"], 0)
  z = np.zeros_like(acts)
  for n in range(7):
    top = np.argsort(-acts[n])[:5]
    z[n, top] = acts[n, top]
  Dn = raw["dictionary._weights"] / (np.linalg.norm(raw["dictionary._weights"], axis=1, keepdims=True) + 1e-8)
  code = sae_lib.encode(loaded.params, x, loaded.k)
  np.testing.assert_allclose(sae_lib.dense_codes(code, 80), z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae_lib.decode(loaded.params, code), z @ Dn, rtol=1e-4, atol=1e-5)
  # The imported workdir is a normal one: load_sae sees the same parameters.
  again = workdir_lib.load_sae(str(tmp_path / "w"))
  for name in again.params:
    np.testing.assert_array_equal(again.params[name], loaded.params[name])


def test_import_rejects_other_files(tmp_path):
  torch.save({"model_state": {"encoder.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
  with pytest.raises(SaeJaxError, match=r"other.pt: missing 'encoder.final_block.0.weight'"):
    overcomplete_lib.import_overcomplete(
      str(tmp_path / "other.pt"), str(tmp_path / "w"), k=2, config=base.get_config()
    )
  with pytest.raises(SaeJaxError, match="no such file"):
    overcomplete_lib.import_overcomplete(
      str(tmp_path / "absent.pt"), str(tmp_path / "w"), k=2, config=base.get_config()
    )


def test_load_sae_errors(tmp_path):
  with pytest.raises(SaeJaxError, match=r"config.json is missing: .* is not an sae-jax training workdir"):
    workdir_lib.load_sae(str(tmp_path))
