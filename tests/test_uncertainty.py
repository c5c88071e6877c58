"""Bootstrap intervals and chance levels (sae_jax.uncertainty) against direct NumPy computations."""

import math

import numpy as np
import pytest

from sae_jax import uncertainty
from sae_jax.errors import SaeJaxError


def _ranks(n, seed, p_top1=0.3):
  rng = np.random.default_rng(seed)
  return np.where(rng.random(n) < p_top1, 0, rng.integers(1, 20, n))


def test_recall_ci_matches_direct_resampling_on_fixed_draws():
  ranks = _ranks(257, 0)
  draws = uncertainty.bootstrap_draws(257, n_boot=300, seed=3)
  out = uncertainty.recall_with_ci(ranks, ks=(1, 5, 10), draws=draws)
  for kk in (1, 5, 10):
    hits = (ranks < kk).astype(float)
    # Independent: gather the resampled rows, mean each resample, take numpy's percentiles.
    stats = 100.0 * hits[draws].mean(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    assert out[f"R@{kk}"] == pytest.approx(100.0 * hits.mean(), abs=1e-12)
    assert out[f"R@{kk}_ci95"] == pytest.approx([lo, hi], abs=1e-9)
  assert out["R@1_ci95"][0] < out["R@1"] < out["R@1_ci95"][1]


def test_recall_ci_width_shrinks_like_one_over_sqrt_n():
  small = uncertainty.recall_with_ci(_ranks(400, 1), ks=(1,), n_boot=2000, seed=0)
  large = uncertainty.recall_with_ci(_ranks(6400, 1), ks=(1,), n_boot=2000, seed=0)
  w_small = np.diff(small["R@1_ci95"])[0]
  w_large = np.diff(large["R@1_ci95"])[0]
  # 16x the queries: a 4x narrower interval (binomial sd), within the bootstrap's own noise.
  assert 3.2 < w_small / w_large < 4.8
  # And the width is what the binomial standard error says: 2 * 1.96 * sqrt(p (1 - p) / n).
  p = large["R@1"] / 100
  assert w_large == pytest.approx(100 * 2 * 1.96 * math.sqrt(p * (1 - p) / 6400), rel=0.1)


def test_paired_delta_matches_direct_and_is_narrower_than_unpaired():
  rng = np.random.default_rng(5)
  a = _ranks(500, 2)
  # b: the same queries, a few more hits at rank 0 (a small, consistent improvement).
  b = np.where((a > 0) & (rng.random(500) < 0.08), 0, a)
  draws = uncertainty.bootstrap_draws(500, n_boot=400, seed=9)
  out = uncertainty.paired_recall_delta(a, b, ks=(1, 5), draws=draws)
  diff = (b < 1).astype(float) - (a < 1).astype(float)
  stats = 100.0 * diff[draws].mean(axis=1)
  assert out["R@1"] == pytest.approx(100.0 * diff.mean(), abs=1e-12)
  assert out["R@1_ci95"] == pytest.approx(list(np.percentile(stats, [2.5, 97.5])), abs=1e-9)
  assert uncertainty.excludes_zero(out["R@1_ci95"])
  unpaired = uncertainty.recall_with_ci(a, ks=(1,), draws=draws)["R@1_ci95"]
  assert np.diff(out["R@1_ci95"])[0] < 0.5 * np.diff(unpaired)[0]


def test_identical_variants_have_a_zero_interval_and_no_finding():
  a = _ranks(300, 4)
  out = uncertainty.paired_recall_delta(a, a.copy(), ks=(1,), n_boot=200)
  assert out["R@1"] == 0.0 and out["R@1_ci95"] == [0.0, 0.0]
  assert not uncertainty.excludes_zero(out["R@1_ci95"])
  assert uncertainty.excludes_zero([0.1, 2.0]) and uncertainty.excludes_zero([-2.0, -0.1])
  assert not uncertainty.excludes_zero([-0.1, 2.0])


@pytest.mark.parametrize("n, p, k", [(10, 1, 1), (10, 1, 5), (5000, 5, 10), (25, 3, 24), (8, 8, 1)])
def test_chance_recall_is_the_exact_combinatorial_probability(n, p, k):
  expected = 100.0 * (1.0 - math.comb(n - p, k) / math.comb(n, k))
  assert uncertainty.chance_recall(p, n, ks=(k,))[f"R@{k}"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_chance_recall_matches_random_rankings():
  rng = np.random.default_rng(0)
  n, positives = 40, np.array([1, 2, 5] * 200)
  hits = []
  for p in positives:
    order = rng.permutation(n)
    hits.append(np.min(np.flatnonzero(np.isin(order, np.arange(p)))) < 3)
  assert uncertainty.chance_recall(positives, n, ks=(3,))["R@3"] == pytest.approx(
    100 * np.mean(hits), abs=3.0
  )


def test_bad_inputs_name_what_is_wrong():
  with pytest.raises(SaeJaxError, match="same queries"):
    uncertainty.paired_recall_delta(np.zeros(3), np.zeros(4))
  with pytest.raises(SaeJaxError, match=r"\[n_boot, 5\]"):
    uncertainty.recall_with_ci(np.zeros(5), draws=np.zeros((3, 4), int))
  with pytest.raises(SaeJaxError, match="1-D"):
    uncertainty.recall_with_ci(np.zeros((2, 2)))
  with pytest.raises(SaeJaxError, match="level"):
    uncertainty.recall_with_ci(np.zeros(5), level=95)
