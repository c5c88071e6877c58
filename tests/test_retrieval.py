"""Exact top-K search and Recall@K against independent NumPy / faiss references."""

import os
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from sae_jax import retrieval as R
from sae_jax.errors import SaeJaxError
from tests.helpers.env import ROOT
from tests.helpers.reference import recall_reference, topk_reference


def _int_data(rng, n, d):
  # Small integers: every inner product is exact in float32, so ties are real ties whatever the
  # GEMM's summation order, and the tie-breaking rule alone decides the order.
  return rng.integers(-2, 3, (n, d)).astype(np.float32)


def _csr(rng, nq, nc, max_pos=4):
  counts = rng.integers(1, max_pos + 1, nq)
  indptr = np.concatenate([[0], np.cumsum(counts)])
  indices = np.concatenate([rng.choice(nc, c, replace=False) for c in counts])
  return indptr, indices


@pytest.mark.parametrize("block,group,qblock", [(64, 8, 16), (100, 4, 7), (1000, 32, 64), (37, 32, 64)])
def test_topk_ties_match_stable_reference(block, group, qblock):
  rng = np.random.default_rng(block)
  q = _int_data(rng, 45, 12)
  c = _int_data(rng, 700, 12)
  c[300:700:9] = c[11]  # many exact duplicates of candidate 11, scattered over blocks
  c[650] = c[3]
  exclude = rng.integers(-1, 700, 45)
  for ex in (None, exclude):
    s, i = R.topk_search(
      q, c, 10, exclude=ex, block_size=block, group_size=group, query_block_size=qblock, normalize=False
    )
    rs, ri = topk_reference(q, c, 10, exclude=ex, normalize=False)
    np.testing.assert_array_equal(np.asarray(i), ri)
    np.testing.assert_array_equal(np.asarray(s), rs)
    # Ties are present and resolved to the lower id.
    assert np.any(np.diff(rs, axis=1) == 0)


def test_recall_matches_numpy_reference_multi_positive_with_ties():
  rng = np.random.default_rng(1)
  nq, nc, d = 40, 300, 8
  q = _int_data(rng, nq, d)
  c = _int_data(rng, nc, d)
  indptr, indices = _csr(rng, nq, nc)
  # For each query: its first positive gets a duplicate at a LOWER index that is not a positive,
  # so R@1 depends on the tie-breaking rule (lower id wins -> miss at rank 1).
  for i in range(0, nq, 3):
    p = indices[indptr[i]]
    lower = [j for j in range(p) if j not in indices[indptr[i] : indptr[i + 1]]]
    if lower:
      c[lower[0]] = c[p]
      q[i] = c[p] * 3
  exclude = rng.integers(-1, nc, nq)
  for ex in (None, exclude):
    rec, ids = R.evaluate(
      q, c, indptr, indices, ks=(1, 5, 10), exclude=ex, normalize=False, block_size=64, group_size=8
    )
    ref = recall_reference(q @ c.T, indptr, indices, (1, 5, 10), ex)
    assert rec == pytest.approx(ref, abs=1e-9)
  assert 0 < rec["R@1"] < rec["R@10"] <= 100


def test_recall_multi_positive_counts_hit_once():
  ids = np.array([[5, 1, 2], [0, 9, 8], [3, 4, 7]])
  indptr = np.array([0, 2, 3, 6])
  indices = np.array([2, 1, 7, 6, 5, 4])  # q0: {2,1} (ranks 1,2); q1: {7} (miss); q2: {6,5,4}
  rec = R.recall_at_k(ids, indptr, indices, ks=(1, 2, 3))
  assert rec == pytest.approx({"R@1": 0.0, "R@2": 200 / 3, "R@3": 200 / 3})
  np.testing.assert_array_equal(np.asarray(R.first_hit_rank(ids, indptr, indices)), [1, 3, 1])


def test_topk_equals_faiss_flat_ip():
  rng = np.random.default_rng(2)
  q = R.l2_normalize(rng.standard_normal((300, 64)).astype(np.float32))
  c = R.l2_normalize(rng.standard_normal((5000, 64)).astype(np.float32))
  index = faiss.IndexFlatIP(64)
  index.add(c)
  fs, fi = index.search(q, 10)
  s, i = R.topk_search(q, c, 10, block_size=1024, query_block_size=128)
  np.testing.assert_array_equal(np.asarray(i), fi)
  np.testing.assert_allclose(np.asarray(s), fs, atol=2e-6)
  # Cosine: scaling rows does not change the neighbours.
  _, i2 = R.topk_search(q * 7.0, c * rng.uniform(0.5, 2.0, (5000, 1)).astype(np.float32), 10)
  np.testing.assert_array_equal(np.asarray(i2), fi)


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import AxisType
    from sae_jax import retrieval as R
    from tests.helpers.reference import topk_reference
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, (45, 12)).astype(np.float32)
    c = rng.integers(-2, 3, (701, 12)).astype(np.float32)   # 701: not divisible by the shards
    c[300::9] = c[11]
    ex = rng.integers(-1, 701, 45)
    for shape in ((2, 4), (8, 1), (1, 8)):
      mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
      for e in (None, ex):
        s, i = R.topk_search(q, c, 10, exclude=e, mesh=mesh, block_size=32, group_size=4,
                             query_block_size=4, normalize=False)
        rs, ri = topk_reference(q, c, 10, exclude=e, normalize=False)
        assert np.array_equal(np.asarray(i), ri), (shape, e is None)
        assert np.array_equal(np.asarray(s), rs), (shape, e is None)
    print("SHARDED-OK")
""")


def test_sharded_8_devices_equals_unblocked():
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  out = subprocess.run(
    [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARDED-OK" in out.stdout


def _one_line(excinfo, *words):
  msg = str(excinfo.value)
  assert "\n" not in msg and msg, msg
  for w in words:
    assert w in msg, msg


def test_bad_inputs_raise_one_clear_line():
  rng = np.random.default_rng(6)
  q = rng.standard_normal((4, 8)).astype(np.float32)
  c = rng.standard_normal((20, 8)).astype(np.float32)
  with pytest.raises(SaeJaxError) as e:
    R.topk_search(q, c[:, :6], 5)
  _one_line(e, "width 8", "width 6")
  with pytest.raises(SaeJaxError) as e:
    R.topk_search(q, c, 21)
  _one_line(e, "k=21", "20 candidates")
  with pytest.raises(SaeJaxError) as e:  # with exclusion the pool is one smaller
    R.topk_search(q, c, 20, exclude=np.zeros(4, np.int64))
  _one_line(e, "k=20")
  with pytest.raises(SaeJaxError) as e:
    R.evaluate(q, c, np.array([0, 1, 1, 2, 3]), np.array([0, 1, 2]), ks=(1,))
  _one_line(e, "query 1 has no positives")
