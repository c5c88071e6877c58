"""sae_jax.removal: the removal rules and the validation selection against independent NumPy
computations on small data."""

import numpy as np
import pytest

from sae_jax import projectors, removal
from sae_jax.errors import SaeJaxError
from tests.helpers.reference import dense_codes


def _sparse(dense, k):
  """(values [N, k], indices [N, k]) of the k largest entries per row (what `sae.encode` returns)."""
  idx = np.argsort(-dense, axis=1)[:, :k].astype(np.int32)
  return np.take_along_axis(dense, idx, axis=1).astype(np.float32), idx


def _pairs(n=40, c=12, d=6, k=3, seed=0):
  rng = np.random.default_rng(seed)
  D = rng.standard_normal((c, d))
  D /= np.linalg.norm(D, axis=1, keepdims=True)
  zi = np.where(rng.random((n, c)) < 0.3, rng.uniform(0.5, 2.0, (n, c)), 0.0)
  zt = np.where(rng.random((n, c)) < 0.3, rng.uniform(0.5, 2.0, (n, c)), 0.0)
  ci, ct = _sparse(zi, k), _sparse(zt, k)
  return D.astype(np.float32), ci, ct


def test_derangements_pair_every_row_with_another_and_are_seeded():
  p = removal.unmatched_permutations(50, draws=3, seed=7)
  assert p.shape == (3, 50)
  for row in p:
    assert sorted(row) == list(range(50)) and not np.any(row == np.arange(50))
  np.testing.assert_array_equal(p, removal.unmatched_permutations(50, draws=3, seed=7))
  assert not np.array_equal(p, removal.unmatched_permutations(50, draws=3, seed=8))
  with pytest.raises(SaeJaxError):
    removal.derangement(1, 0)


def test_rules_match_a_dense_numpy_computation():
  D, ci, ct = _pairs()
  c = D.shape[0]
  zi = dense_codes(*ci, c).astype(np.float64)
  zt = dense_codes(*ct, c).astype(np.float64)
  M = D.astype(np.float64) @ D.T.astype(np.float64)
  attr = lambda a, b: np.mean(a * (b @ M) + b * (a @ M), axis=0)  # Eq. 6 over the rows given
  perms = removal.unmatched_permutations(zi.shape[0], draws=3, seed=5)
  neg_ref = np.mean([attr(zi, zt[p]) for p in perms], axis=0)
  scores, cm = removal.concept_scores(D, ci, ct, draws=3, seed=5)
  np.testing.assert_allclose(scores["attribution"], attr(zi, zt), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores["negatives"], neg_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores["margin"], 2 * neg_ref - attr(zi, zt), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores["energy"], (zi.mean(0) + zt.mean(0)) / 2, rtol=1e-6)
  np.testing.assert_allclose(scores["abs_attribution"], np.abs(attr(zi, zt)), rtol=1e-5, atol=1e-6)
  assert set(scores) == set(removal.RULES)
  # Matched pairs share more concepts than shuffled ones would only by chance: here the codes are
  # independent, so A+ and A- are the same in expectation but not equal on 40 pairs.
  assert not np.allclose(scores["negatives"], scores["attribution"])


def test_validation_split_is_image_disjoint_complete_and_seeded():
  ids = np.repeat(np.arange(30), 5)[np.random.default_rng(0).permutation(150)]
  val, scored = removal.validation_split(ids, 0.2, seed=3)
  assert np.intersect1d(ids[val], ids[scored]).size == 0  # no image on both sides
  assert np.union1d(val, scored).tolist() == list(range(150)) and np.intersect1d(val, scored).size == 0
  assert np.unique(ids[val]).size == 6  # 0.2 of 30 images, all their rows
  v2, s2 = removal.validation_split(ids, 0.2, seed=3)
  np.testing.assert_array_equal(val, v2)
  assert not np.array_equal(val, removal.validation_split(ids, 0.2, seed=4)[0])
  with pytest.raises(SaeJaxError, match="validation_fraction"):
    removal.validation_split(ids, 1.0, 0)


def test_one_se_rule_takes_the_least_removed_close_to_the_best():
  r1 = [30.0, 40.0, 39.0, 41.0]
  cost = [(1, 0.01), (8, 0.02), (2, 0.01), (16, 0.05)]
  # se at p = 0.41 over 400 queries is 2.46 points: 40, 39 and 41 qualify; (2, 0.01) costs least.
  assert removal.one_se_pick(r1, cost, 400) == 2
  # Over 40000 queries the se is 0.25: only 41 qualifies.
  assert removal.one_se_pick(r1, cost, 40000) == 3


def test_select_removal_scores_every_candidate_and_picks_by_validation_only():
  rng = np.random.default_rng(2)
  D = rng.standard_normal((20, 6)).astype(np.float32)
  scores = {"attribution": rng.random(20), "energy": rng.random(20)}
  grid = removal.removal_grid(["attribution", "energy"], [0.1, 0.2], [1, 2, -1], 20, 6)
  assert [(g.rule, g.fraction, g.rank) for g in grid[:3]] == [
    ("attribution", 0.1, 1),
    ("attribution", 0.1, 2),
  ] + [("attribution", 0.2, 1)]
  # A validation R@1 that is highest for the energy rule's top-2 atoms at full rank.
  target = projectors.fit_removal(D, scores["energy"], 2, 0.1).basis

  def val_r1(p):
    return 50.0 - 10.0 * np.linalg.norm(p.basis @ p.basis.T - target @ target.T)

  sel = removal.select_removal(D, scores, grid, val_r1, how="best")
  assert (sel.chosen.rule, sel.chosen.fraction, sel.chosen.rank) == ("energy", 0.1, 2)
  assert len(sel.table) == len(grid) and max(t["R@1"] for t in sel.table) == pytest.approx(50.0)


def test_subspace_overlap():
  truth = np.eye(5)[:2]  # span of e0, e1
  assert removal.subspace_overlap(np.eye(5)[:, :2], truth) == pytest.approx(1.0)
  assert removal.subspace_overlap(np.eye(5)[:, 2:4], truth) == pytest.approx(0.0)
  half = np.stack([np.array([1, 0, 1, 0, 0]) / np.sqrt(2), np.eye(5)[3]], 1)
  assert removal.subspace_overlap(half, truth) == pytest.approx(0.25)  # (0.5 + 0) / 2


def test_selection_reuses_one_svd_per_rule_and_fraction():
  """The projectors the selection builds equal `projectors.fit_removal` at each candidate's rank."""
  rng = np.random.default_rng(4)
  D = rng.standard_normal((30, 8)).astype(np.float32)
  scores = {"energy": rng.random(30)}
  grid = removal.removal_grid(["energy"], [0.2], [1, 3, -1], 30, 8)
  seen = []
  removal.select_removal(D, scores, grid, lambda p: seen.append(p) or 1.0, how="best")
  for cand, p in zip(grid, seen):
    ref = projectors.fit_removal(D, scores["energy"], cand.rank, cand.fraction)
    np.testing.assert_allclose(p.basis @ p.basis.T, ref.basis @ ref.basis.T, atol=1e-5)
    assert (p.info["rank"], p.info["atoms"]) == (ref.info["rank"], ref.info["atoms"])
