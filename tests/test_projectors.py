"""sae_jax.projectors: every projector (removal of paper Eq. 8-10, shrinkage whitening and ReAlign,
all-but-the-top, centring) against an independent NumPy computation of its map, through the
`apply(task, data)` protocol the retrieval stage uses and through `transform`, plus save / load.
"""

import numpy as np
import pytest

from sae_jax import projectors as P
from sae_jax.errors import SaeJaxError
from sae_jax.retrieval import l2_normalize
from sae_jax.retrieval_tasks import TaskData


def _unit(a):
  a = np.asarray(a, np.float64)
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def _zca(x, alpha, eps=0.0):
  """(mean, (Σ̂ + eps I)^(-1/2)) of rows x, Σ̂ = (1 - α) Σ + α tr(Σ)/d I, Σ the sample covariance."""
  x = np.asarray(x, np.float64)
  cov = np.cov(x, rowvar=False)
  d = x.shape[1]
  shrunk = (1 - alpha) * cov + alpha * np.trace(cov) / d * np.eye(d)
  u, s, _ = np.linalg.svd(shrunk)
  return x.mean(0), u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T


def _top_directions(x, n):
  """[d, n]: the top-n principal directions of the rows x (right singular vectors of x - mean)."""
  _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
  return vt[:n].T


def _remove(h, v):
  return _unit(h - h @ v @ v.T)


def test_every_projector_applies_its_numpy_map_through_the_protocol():
  rng = np.random.default_rng(9)
  d = 8
  q = (rng.standard_normal((120, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) + 2.0).astype(
    np.float32
  )
  c = (3.0 * rng.standard_normal((150, d)) - 1.0).astype(np.float32)
  data = TaskData(q, c, np.arange(121), np.arange(120))
  atoms = _unit(rng.standard_normal((40, d))).astype(np.float32)
  scores = rng.standard_normal(40)
  top = np.argsort(-scores)[:10]  # ceil(0.25 * 40) atoms
  planted = rng.standard_normal((3, d))
  both = np.concatenate([q, c]).astype(np.float64)
  mean, w = _zca(both, 0.1)

  def realign(h):
    mu, wh = _zca(_unit(h), 0.1, 1e-5)
    return _unit((_unit(h) - mu) @ wh)

  def abtt(h, n):
    hu = _unit(h)
    return _remove(hu - hu.mean(0), _top_directions(hu, n))

  removal_v = np.linalg.svd(atoms[top].astype(np.float64))[2][:3].T
  oracle_v = np.linalg.svd(planted)[2][:3].T
  q_mean = _unit(q).mean(0)
  cases = {  # name: (projector, reference map of the queries, of the candidates when not the same)
    "removal": (P.fit_removal(atoms, scores, 3, 0.25), lambda h: _remove(h, removal_v), None),
    "oracle removal": (P.subspace_projector(planted), lambda h: _remove(h, oracle_v), None),
    "joint whitening": (P.fit_whitening(both, 0.1), lambda h: _unit((h - mean) @ w), None),
    "centring fitted on the queries": (P.fit_centering(q), lambda h: _unit(_unit(h) - q_mean), None),
    "all-but-the-top fitted on the queries": (
      P.fit_abtt(q, 2),
      lambda h: _remove(_unit(h) - q_mean, _top_directions(_unit(q), 2)),
      None,
    ),
    "ReAlign, per side": (P.RealignWhitening(0.1), realign, realign),
    "all-but-the-top, per side": (P.PerSideAbtt(2), lambda h: abtt(h, 2), lambda h: abtt(h, 2)),
    "centring, per side": (P.PerSideAbtt(0), lambda h: abtt(h, 0), lambda h: abtt(h, 0)),
  }
  for name, (proj, ref_q, ref_c) in cases.items():
    assert isinstance(proj, P.TaskProjector), name
    out = proj.apply("image_to_text", data)
    np.testing.assert_allclose(out.queries, ref_q(q), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out.candidates, (ref_c or ref_q)(c), atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(out.positives_indices, data.positives_indices)


def test_removal_orthogonal_unit_norm_and_matches_svd():
  rng = np.random.default_rng(3)
  c_, d = 200, 32
  D = l2_normalize(rng.standard_normal((c_, d))).astype(np.float32)
  scores = rng.standard_normal(c_)
  proj = P.fit_removal(D, scores, rank=3, fraction=0.05)  # ceil(0.05*200) = 10 atoms
  top = np.argsort(-scores)[:10]
  assert sorted(proj.info["atoms"]) == sorted(top.tolist())
  _, _, vt = np.linalg.svd(D[top].astype(np.float64))
  ref_p = vt[:3].T @ vt[:3]
  np.testing.assert_allclose(proj.basis @ proj.basis.T, ref_p, atol=1e-5)
  h = rng.standard_normal((50, d)).astype(np.float32) * 5
  out = proj.transform(h)
  np.testing.assert_allclose(out @ proj.basis, 0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
  ref = h - (h @ vt[:3].T) @ vt[:3]
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # The jittable function on an SVD basis computed here (not the projector's).
  np.testing.assert_allclose(np.asarray(P.project(h, vt[:3].T.astype(np.float32))), ref, atol=1e-5)


def test_projector_save_load_fit_one_transform_another(tmp_path):
  rng = np.random.default_rng(4)
  fit_set = rng.standard_normal((500, 16)).astype(np.float32) @ rng.standard_normal((16, 16)).astype(
    np.float32
  )
  other = rng.standard_normal((30, 16)).astype(np.float32)
  for proj in (
    P.fit_whitening(fit_set, alpha=0.1),
    P.fit_removal(l2_normalize(fit_set[:40]), rng.standard_normal(40), 2, 0.25),
  ):
    path = str(tmp_path / f"{proj.kind}.npz")
    proj.save(path)
    back = P.Projector.load(path)
    assert back.kind == proj.kind and back.info == proj.info
    np.testing.assert_allclose(back.transform(other), proj.transform(other), atol=1e-7)


def test_shrinkage_whitening_matches_formula():
  rng = np.random.default_rng(5)
  a = rng.standard_normal((8, 8))
  x = rng.standard_normal((2000, 8)) @ a + 3.0
  for alpha in (0.0, 0.1, 0.5):
    p = P.fit_whitening(x, alpha=alpha)
    cov = np.cov(x, rowvar=False)
    shrunk = (1 - alpha) * cov + alpha * np.trace(cov) / 8 * np.eye(8)
    w = p.matrix.astype(np.float64)
    np.testing.assert_allclose(w, w.T, atol=1e-6)
    np.testing.assert_allclose(w @ shrunk @ w, np.eye(8), atol=1e-4)
    np.testing.assert_allclose(p.mean, x.mean(0), atol=1e-5)
    if alpha == 0.0:  # fully whitened: identity covariance before the normalisation
      np.testing.assert_allclose(np.cov((x - p.mean) @ w, rowvar=False), np.eye(8), atol=1e-4)
    y = p.transform(x[:5])
    ref = (x[:5] - x.mean(0)) @ w
    np.testing.assert_allclose(y, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_abtt_matches_numpy_pca():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((60, 8)) @ rng.standard_normal((8, 8)) + 3.0
  h = rng.standard_normal((5, 8))
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  xu = unit(x)
  mu = xu.mean(0)
  evals, evecs = np.linalg.eigh((xu - mu).T @ (xu - mu))
  for n_comp in (0, 1, 3):
    u = evecs[:, ::-1][:, :n_comp]  # top principal directions
    c = unit(h) - mu
    want = unit(c - c @ u @ u.T)
    got = P.fit_abtt(x.astype(np.float32), n_comp).transform(h.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  with pytest.raises(SaeJaxError, match="abtt_components"):
    P.fit_abtt(x, 9)


def _realign_reference(x, alpha=0.1, eps=1e-5):
  """ReAlign's `shrinkage_whiten` on one side, float64: normalise, centre, shrink, U S^-1/2 U^T."""
  x = np.asarray(x, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  mean = x.mean(0, keepdims=True)
  cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
  d = x.shape[1]
  shrunk = (1 - alpha) * cov + alpha * np.trace(cov) / d * np.eye(d)
  u, s, _ = np.linalg.svd(shrunk)
  out = (x - mean) @ (u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T)
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_realign_whitening_matches_an_independent_numpy_version():
  rng = np.random.default_rng(6)
  d = 12
  # Two modalities with different offsets, scales and covariances (the modality gap).
  img = (rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + 3.0).astype(np.float32)
  txt = (5.0 * rng.standard_normal((200, d)) - 1.0).astype(np.float32)
  qp, cp = P.fit_realign(img, txt, alpha=0.1)
  np.testing.assert_allclose(qp.transform(img), _realign_reference(img), atol=2e-5)
  np.testing.assert_allclose(cp.transform(txt), _realign_reference(txt), atol=2e-5)
  # Each side is centred on its own mean: a joint fit on the stacked rows is a different map.
  joint = P.fit_whitening(np.concatenate([img, txt]), 0.1)
  assert np.abs(joint.transform(img) - _realign_reference(img)).max() > 0.1
  # Saved and loaded, the query projector still normalises its input first.
  data = TaskData(img[:50], txt, np.arange(51), np.arange(50))
  whitened = P.RealignWhitening(0.1).apply("image_to_text", data)
  np.testing.assert_allclose(whitened.queries, _realign_reference(img[:50]), atol=2e-5)
  np.testing.assert_allclose(whitened.candidates, _realign_reference(txt), atol=2e-5)


def test_realign_projector_round_trips(tmp_path):
  rng = np.random.default_rng(7)
  x = rng.standard_normal((40, 5)).astype(np.float32) + 2
  qp, _ = P.fit_realign(x, x, 0.1)
  qp.save(str(tmp_path / "p.npz"))
  back = P.Projector.load(str(tmp_path / "p.npz"))
  assert back.prenormalize and back.info["eps"] == 1e-5
  np.testing.assert_allclose(back.transform(3 * x), _realign_reference(x), atol=2e-5)


def test_rank_cut_on_rank_deficient_selected_atoms():
  rng = np.random.default_rng(8)
  d, c = 10, 50
  D = rng.standard_normal((c, d))
  span = np.linalg.qr(rng.standard_normal((d, 3)))[0]  # 3 orthonormal directions
  D[:6] = rng.standard_normal((6, 3)) @ span.T  # the 6 top-scored atoms span only 3 dimensions
  D /= np.linalg.norm(D, axis=1, keepdims=True)
  scores = np.r_[np.full(6, 10.0), rng.random(c - 6)]
  proj = P.fit_removal(D.astype(np.float32), scores, rank=6, fraction=6 / c)
  assert proj.info["n_atoms"] == 6 and proj.info["rank_requested"] == 6 and proj.info["rank"] == 3
  assert proj.basis.shape == (d, 3)
  np.testing.assert_allclose(proj.basis @ proj.basis.T, span @ span.T, atol=1e-5)
  # A vector orthogonal to the span passes unchanged; one inside it is removed entirely.
  h = rng.standard_normal((4, d))
  h_perp = h - h @ span @ span.T
  np.testing.assert_allclose(
    proj.transform(h_perp), h_perp / np.linalg.norm(h_perp, axis=1, keepdims=True), atol=1e-5
  )
  h_in = h @ span @ span.T
  assert np.abs(h_in - h_in @ proj.basis @ proj.basis.T).max() < 1e-5
  # rtol=0 keeps the six directions the SVD returns (three of them arbitrary).
  assert P.fit_removal(D.astype(np.float32), scores, 6, 6 / c, rtol=0.0).basis.shape == (d, 6)
  assert P.fit_removal(D.astype(np.float32), scores, 2, 6 / c).info["rank"] == 2


def test_removal_bad_inputs_raise_one_clear_line():
  rng = np.random.default_rng(6)
  q = rng.standard_normal((4, 8)).astype(np.float32)
  D = l2_normalize(rng.standard_normal((100, 8)).astype(np.float32))
  with pytest.raises(SaeJaxError) as e:
    P.fit_removal(D, rng.standard_normal(100), rank=3, fraction=0.01)  # 1 atom selected
  assert (
    "\n" not in str(e.value) and "removal_rank=3" in str(e.value) and "selected atoms (1)" in str(e.value)
  )
  with pytest.raises(SaeJaxError):
    P.fit_removal(D, rng.standard_normal(99), rank=1)
  with pytest.raises(SaeJaxError) as e:
    P.fit_removal(D, rng.standard_normal(100), rank=1).transform(q[:, :5])
  assert "\n" not in str(e.value) and "width 5" in str(e.value)
