"""The shared pieces of the analysis and retrieval stages: the block encoder, the AUC, the top-set size."""

import itertools

import numpy as np
import pytest

from sae_jax import metrics
from sae_jax import sae as sae_lib
from sae_jax.block_encoder import BlockEncoder, encode_rows
from sae_jax.errors import SaeJaxError
from sae_jax.stages import analysis_planted


def _dense_topk_codes(x, params, k, pre_bias):
  """NumPy float64: the k largest entries of ReLU((x - b_dec) W_enc + b_enc) per row (ties: lower index)."""
  x = np.asarray(x, np.float64) - (np.asarray(params["b_dec"], np.float64) if pre_bias else 0.0)
  pre = np.maximum(x @ np.asarray(params["W_enc"], np.float64) + np.asarray(params["b_enc"], np.float64), 0.0)
  order = np.lexsort((np.broadcast_to(np.arange(pre.shape[1]), pre.shape), -pre), axis=1)[:, :k]
  return np.take_along_axis(pre, order, axis=1), order


@pytest.mark.parametrize("block", [1, 7, 64])
def test_block_encoder_matches_dense_reference_at_any_block(block):
  spec = sae_lib.SAESpec(d=12, c=40, k=5, pre_bias=True)
  rng = np.random.default_rng(0)
  params = {
    "W_enc": rng.standard_normal((12, 40)).astype(np.float32),
    "b_enc": rng.standard_normal(40).astype(np.float32) * 0.1,
    "D": rng.standard_normal((40, 12)).astype(np.float32),
    "b_dec": rng.standard_normal(12).astype(np.float32),
  }
  x = rng.standard_normal((23, 12)).astype(np.float32)  # 23 = not a multiple of 7: a padded last block
  values, indices = BlockEncoder(params, spec, block)(x)
  want_v, want_i = _dense_topk_codes(x, params, spec.k, pre_bias=True)
  assert values.shape == indices.shape == (23, 5)
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_allclose(values, want_v, rtol=1e-5, atol=1e-5)
  empty_v, empty_i = encode_rows(params, spec, x[:0], block)
  assert empty_v.shape == empty_i.shape == (0, 5)
  with pytest.raises(SaeJaxError, match="expected rows"):
    BlockEncoder(params, spec, block)(x[0])


def test_auc_counts_pairs_with_ties_as_half():
  neg = np.array([0.1, 0.4, 0.4, 0.7, 0.2])
  pos = np.array([0.4, 0.9, 0.3, 0.7])
  # Brute force over all 20 (neg, pos) pairs: wins 1, ties 1/2.
  want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for n, p in itertools.product(neg, pos)])
  assert analysis_planted.auc_mann_whitney(neg, pos) == pytest.approx(want)
  assert want == pytest.approx(0.725)  # 14.5 of 20 pairs, by hand
  assert analysis_planted.auc_mann_whitney(pos, neg) == pytest.approx(1.0 - want)
  with pytest.raises(SaeJaxError, match="at least one score of each class"):
    analysis_planted.auc_mann_whitney(neg, pos[:0])


@pytest.mark.parametrize(
  "fraction, c, size",
  [(0.01, 100, 1), (0.07, 100, 7), (0.01, 256, 3), (0.02, 256, 6), (0.001, 50, 1), (1.0, 5, 5)],
)
def test_top_fraction_size_is_ceil_at_least_one(fraction, c, size):
  assert metrics.top_fraction_size(fraction, c) == size
  assert metrics.top_fraction_set(np.arange(c, dtype=np.float64), fraction).size == size


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_top_fraction_size_rejects_out_of_range(fraction):
  with pytest.raises(SaeJaxError, match=r"config.retrieval.removal_fraction=.*expected 0 < fraction <= 1"):
    metrics.top_fraction_size(fraction, 10, "config.retrieval.removal_fraction")
