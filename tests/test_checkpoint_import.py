"""Importing the authors' Overcomplete checkpoints (`sae_<model>.pt`, a dict with `model_state`)."""

import numpy as np
import pytest
import torch

from configs import base
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.interop import overcomplete as overcomplete_lib
from tests.helpers.env import overcomplete_topk_sae


def _authors_style_model(d=24, c=80, k=5, seed=0):
  """A real overcomplete TopKSAE as a checkpoint leaves it: the dictionary rows are not unit norm
  (they are renormalised at the next forward, not after the optimizer step) and the bias is not 0."""
  torch.manual_seed(seed)
  model = overcomplete_topk_sae()(d, c, top_k=k)
  with torch.no_grad():
    model.dictionary._weights.mul_(torch.rand(c, 1) * 3 + 0.5)
    model.encoder.final_block[0].bias.normal_(0.0, 0.1)
  return model


def test_import_then_encode_decode_match_overcomplete(tmp_path):
  model = _authors_style_model()
  torch.save({"model_state": model.state_dict(), "epoch": 7}, tmp_path / "sae_clip.pt")
  overcomplete_lib.import_overcomplete(
    str(tmp_path / "sae_clip.pt"), str(tmp_path / "w"), k=5, config=base.get_config()
  )
  # What every stage reads back from the workdir, compared with Overcomplete's own forward.
  loaded = workdir_lib.load_sae(str(tmp_path / "w"))
  assert (loaded.k, loaded.step, loaded.config.sae.c, loaded.config.sae.preset) == (5, 0, 80, "paper")
  x = np.random.default_rng(0).standard_normal((7, 24)).astype(np.float32)
  model.eval()  # eval: the fused (renormalised) dictionary, no in-place update
  with torch.no_grad():
    _, z_ref, x_hat_ref = (t.numpy() for t in model(torch.from_numpy(x)))
  assert np.all((z_ref > 0).sum(1) == 5)
  code = sae_lib.encode(loaded.params, x, loaded.k, loaded.spec)
  np.testing.assert_allclose(sae_lib.dense_codes(code, 80), z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae_lib.decode(loaded.params, code), x_hat_ref, rtol=1e-4, atol=1e-5)


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
