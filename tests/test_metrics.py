"""sae_jax.metrics against straightforward dense NumPy formulations (dense codes, explicit M, B)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sae_jax import metrics
from sae_jax.errors import SaeJaxError
from tests.helpers.env import ROOT
from tests.helpers.reference import concept_reference


def random_problem(n=37, c=50, d=12, k=6, silent=4, seed=0):
  """Random unit dictionary and matched sparse codes; the last `silent` concepts never fire,
  some values are exactly 0 (Top-K after ReLU), and image/text supports overlap often."""
  rng = np.random.default_rng(seed)
  D = rng.standard_normal((c, d)).astype(np.float32)
  D /= np.linalg.norm(D, axis=1, keepdims=True)
  live = c - silent

  def codes():
    idx = np.argsort(rng.random((n, live)), axis=1)[:, :k].astype(np.int32)
    val = rng.uniform(0.1, 2.0, (n, k)).astype(np.float32)
    val[rng.random((n, k)) < 0.1] = 0.0
    return val, idx

  iv, ii = codes()
  tv, ti = codes()
  # Force overlaps so that B's diagonal is not trivially zero: copy one index per row.
  ti[:, 0] = ii[:, 0]
  return D, (iv, ii), (tv, ti)


@pytest.fixture(scope="module")
def problem():
  D, image, text = random_problem()
  ref = concept_reference(D, image, text)
  # Small blocks so that several blocks, a padded last block and micro-chunks are exercised.
  got = metrics.compute_concept_metrics(D, image, text, block_size=16, micro_size=4)
  return D, image, text, ref, got


def test_per_concept_metrics_match_dense(problem):
  D, image, text, ref, got = problem
  tol = dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.energy, ref["energy"], **tol)
  np.testing.assert_allclose(got.energy_image, ref["energy_image"], **tol)
  np.testing.assert_allclose(got.energy_text, ref["energy_text"], **tol)
  np.testing.assert_allclose(got.attribution, ref["attribution"], **tol)
  np.testing.assert_allclose(got.bridge_score("diag"), ref["diag"], **tol)
  np.testing.assert_allclose(got.bridge_score("row"), ref["row"], **tol)
  np.testing.assert_allclose(got.bridge_score("col"), ref["col"], **tol)
  np.testing.assert_allclose(got.mean_pair_dot, ref["pair_dot"], **tol)
  fires_i = (ref["zi"] > 0).mean(0)
  np.testing.assert_allclose(got.fire_rate_image, fires_i, atol=1e-12)
  assert got.n_pairs == 37
  assert np.all(ref["diag"][:5] != 0) or np.count_nonzero(ref["diag"]) > 10


def test_modality_score_nan_and_reverse(problem):
  D, image, text, ref, got = problem
  silent = np.isnan(ref["modality"])
  assert silent.sum() == 4 and got.n_silent == 4
  np.testing.assert_array_equal(np.isnan(got.modality_score), silent)
  np.testing.assert_allclose(got.modality_score[~silent], ref["modality"][~silent], rtol=1e-6)
  rev = metrics.compute_concept_metrics(D, image, text, reverse_modality=True)
  np.testing.assert_allclose(rev.modality_score[~silent], 1 - ref["modality"][~silent], rtol=1e-6)
  assert rev.modality_reverse and not got.modality_reverse
  # Hand case: text-only -> 1, image-only -> 0, balanced -> 0.5, never -> NaN.
  ms, n_nan = metrics.modality_score(np.array([0.0, 2.0, 1.0, 0.0]), np.array([3.0, 0.0, 1.0, 0.0]))
  np.testing.assert_allclose(ms[:3], [1.0, 0.0, 0.5])
  assert np.isnan(ms[3]) and n_nan == 1


def test_identities(problem):
  D, image, text, ref, got = problem
  B = ref["B"]  # built densely in NumPy; the library never builds B for these scores
  # 2: the symmetric row + column reduction of B is the attribution.
  np.testing.assert_allclose(got.attribution, B.sum(1) + B.sum(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.bridge_score("sym"), B.sum(1) + B.sum(0), rtol=1e-5, atol=1e-6)
  # 3: sum_ij B_ij = mean <x_hat_iota, x_hat_tau> and sum_i A_i = twice that (reconstructions in NumPy).
  np.testing.assert_allclose(got.mean_pair_dot, ref["pair_dot"], rtol=1e-5)
  np.testing.assert_allclose(B.sum(), ref["pair_dot"], rtol=1e-10)
  np.testing.assert_allclose(got.attribution.sum(), 2 * ref["pair_dot"], rtol=1e-5)


def test_streaming_chunks_equal_one_shot(problem):
  D, image, text, ref, got = problem
  acc = metrics.ConceptAccumulator(D, block_size=8, micro_size=8)
  for s in (slice(0, 5), slice(5, 30), slice(30, 37)):
    acc.update((image[0][s], image[1][s]), (text[0][s], text[1][s]))
  streamed = metrics.concept_metrics(acc.sums())
  np.testing.assert_allclose(streamed.attribution, got.attribution, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(streamed.energy, got.energy, rtol=1e-6)


def test_bfloat16_gather_is_close(problem):
  D, image, text, ref, got = problem
  bf = metrics.compute_concept_metrics(D, image, text, compute_dtype="bfloat16")
  np.testing.assert_allclose(bf.attribution, ref["attribution"], rtol=0.05, atol=0.02)
  np.testing.assert_allclose(bf.energy, ref["energy"], rtol=1e-6)


def test_bridge_blockwise_matches_dense(problem):
  D, image, text, ref, got = problem
  res = metrics.bridge_blockwise(D, image, text, top_k=15, tile=8, entry_block=16)
  np.testing.assert_allclose(res.row_max, ref["B"].max(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.col_max, ref["B"].max(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.bridge_score("max", res.max_score), ref["max"], rtol=1e-5, atol=1e-6)
  # Top pairs among co-occurring pairs.
  B, C = ref["B"], ref["cooc"]
  cand = np.where(C != 0, B, -np.inf).reshape(-1)
  best = np.argsort(-cand, kind="stable")[:15]
  np.testing.assert_allclose(res.pairs_value, cand[best], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.pairs_value, B[res.pairs_i, res.pairs_j], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.pairs_cooc, C[res.pairs_i, res.pairs_j], rtol=1e-4, atol=1e-6)
  assert np.all(np.diff(res.pairs_value) <= 0)
  # A tile size that does not divide c (padded last tile) gives the same answer.
  res2 = metrics.bridge_blockwise(D, image, text, top_k=15, tile=7, entry_block=4)
  np.testing.assert_allclose(res2.pairs_value, res.pairs_value, rtol=1e-6)
  np.testing.assert_allclose(res2.max_score, res.max_score, rtol=1e-6)


def test_top_sets_jaccard_table1():
  scores = np.array([0.5, 3.0, np.nan, 2.0, 3.0, -1.0, 0.0, 1.0, 2.5, 0.1])
  assert metrics.top_fraction_set(scores, 0.3).tolist() == [1, 4, 8]  # ceil(3.0) = 3
  assert metrics.top_fraction_set(scores, 0.21).tolist() == [1, 4, 8]  # ceil(2.1) = 3
  assert metrics.top_fraction_set(scores, 0.4).tolist() == [1, 3, 4, 8]  # 2.0 beats 1.0, NaN last
  assert metrics.top_fraction_set(scores, 1.0)[-1] == 9 and len(metrics.top_fraction_set(scores, 1.0)) == 10
  assert metrics.top_fraction_set(scores, 0.2).tolist() == [1, 4]  # exact: no float creep
  assert metrics.top_fraction_set(np.arange(32768.0), 0.01).shape == (328,)  # ceil(327.68)
  assert metrics.jaccard([1, 2, 3], [2, 3, 4, 5]) == pytest.approx(2 / 5)
  assert metrics.triple_overlap([1, 2, 3], [2, 3, 4], [3, 4, 5]) == pytest.approx(1 / 5)
  e = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], float)
  a = np.array([9, 0, 7, 6, 0, 0, 0, 0, 0, 8], float)
  b = np.array([0, 8, 7, 0, 5, 0, 0, 0, 0, 9], float)
  row = metrics.table1(e, a, b, fraction=0.3)  # S_E={0,1,2} S_A={0,2,9} S_B={1,2,9}
  assert row["J(S_E,S_A)"] == pytest.approx(2 / 4)
  assert row["J(S_E,S_B)"] == pytest.approx(2 / 4)
  assert row["J(S_A,S_B)"] == pytest.approx(2 / 4)
  assert row["triple_overlap"] == pytest.approx(1 / 4)
  assert row["set_size"] == 3


def test_table1_on_metrics_matches_dense_sets(problem):
  D, image, text, ref, got = problem
  row = metrics.table1(got.energy, got.attribution, got.bridge_score("diag"), fraction=0.1)
  size = math.ceil(0.1 * 50)
  sets = [set(np.argsort(-ref[key], kind="stable")[:size]) for key in ("energy", "attribution", "diag")]
  assert row["J(S_E,S_A)"] == pytest.approx(len(sets[0] & sets[1]) / len(sets[0] | sets[1]))
  assert row["J(S_A,S_B)"] == pytest.approx(len(sets[1] & sets[2]) / len(sets[1] | sets[2]))
  assert row["triple_overlap"] == pytest.approx(
    len(sets[0] & sets[1] & sets[2]) / len(sets[0] | sets[1] | sets[2])
  )


def test_bad_input_one_line_errors():
  D, (iv, ii), (tv, ti) = random_problem(n=10)
  cases = [
    (lambda: metrics.compute_concept_metrics(D, (iv, ii), (tv[:7], ti[:7])), "matched pairs"),
    (lambda: metrics.compute_concept_metrics(D, (iv[:0], ii[:0]), (tv[:0], ti[:0])), "empty"),
    (lambda: metrics.compute_concept_metrics(D[:20], (iv, ii), (tv, ti)), "c=20"),
    (lambda: metrics.compute_concept_metrics(D, (iv, ii[:, :3]), (tv, ti)), "must both be [N, k]"),
    (lambda: metrics.bridge_blockwise(D, (iv, ii), (tv[:3], ti[:3])), "matched pairs"),
    (lambda: metrics.table1(np.ones(3), np.ones(3), np.ones(3), fraction=0.0), "0 < fraction"),
    (
      lambda: metrics.ConceptMetrics.bridge_score(
        metrics.compute_concept_metrics(D, (iv, ii), (tv, ti)), "median"
      ),
      "expected one of",
    ),
  ]
  for fn, needle in cases:
    with pytest.raises(SaeJaxError) as err:
      fn()
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
  with pytest.raises(SaeJaxError, match="empty input"):
    metrics.ConceptAccumulator(D).sums()


SHARDED_SCRIPT = textwrap.dedent("""
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    import ml_collections
    from sae_jax import metrics, sharding
    from tests.test_metrics import random_problem
    assert len(jax.devices()) == 8
    D, image, text = random_problem(n=40, c=45, d=10, k=5, silent=3, seed=3)
    cfg = ml_collections.ConfigDict(dict(data=-1, model=8, multihost=False))
    mesh = sharding.make_mesh(cfg)
    one = metrics.bridge_blockwise(D, image, text, top_k=12, tile=4, entry_block=8)
    many = metrics.bridge_blockwise(D, image, text, top_k=12, tile=4, entry_block=8, mesh=mesh)
    print(json.dumps(dict(
        one=[one.pairs_value.tolist(), one.pairs_i.tolist(), one.pairs_j.tolist(),
             one.max_score.tolist()],
        many=[many.pairs_value.tolist(), many.pairs_i.tolist(), many.pairs_j.tolist(),
              many.max_score.tolist()])))
""")


def test_bridge_sharded_over_model_axis_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", SHARDED_SCRIPT.format(root=str(ROOT))],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  one, many = res["one"], res["many"]
  np.testing.assert_allclose(many[0], one[0], rtol=1e-6)
  assert many[1] == one[1] and many[2] == one[2]
  np.testing.assert_allclose(many[3], one[3], rtol=1e-6)
  # And both equal the dense B.
  D, image, text = random_problem(n=40, c=45, d=10, k=5, silent=3, seed=3)
  ref = concept_reference(D, image, text)
  np.testing.assert_allclose(one[3], ref["max"], rtol=1e-5, atol=1e-6)
  cand = np.where(ref["cooc"] != 0, ref["B"], -np.inf).reshape(-1)
  np.testing.assert_allclose(one[0], np.sort(cand)[::-1][:12], rtol=1e-5, atol=1e-6)


def test_bridge_blockwise_long_tailed_codes():
  """A few concepts fire in every row (as on real codes): tiles are balanced, results exact."""
  # Draws use concepts 0..61 only (silent=2), so forcing 62 and 63 keeps each row's indices distinct.
  D, (iv, ii), (tv, ti) = random_problem(n=60, c=64, d=10, k=6, silent=2, seed=7)
  ii[:, 1], ii[:, 2] = 63, 62  # two hot concepts, in every image row
  ti[:, 1] = 63
  ref = concept_reference(D, (iv, ii), (tv, ti))
  slot_of, concept_of_slot = metrics._balanced_slots(iv, ii, 64, 4, 16)
  assert slot_of[63] // 16 != slot_of[62] // 16  # hot concepts split up
  assert sorted(concept_of_slot.tolist()) == list(range(64))
  res = metrics.bridge_blockwise(D, (iv, ii), (tv, ti), top_k=10, tile=16, entry_block=8)
  np.testing.assert_allclose(res.max_score, ref["max"], rtol=1e-5, atol=1e-6)
  cand = np.where(ref["cooc"] != 0, ref["B"], -np.inf).reshape(-1)
  np.testing.assert_allclose(res.pairs_value, np.sort(cand)[::-1][:10], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.pairs_cooc, ref["cooc"][res.pairs_i, res.pairs_j], rtol=1e-5)
