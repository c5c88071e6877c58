"""Projectors: the maps applied to embeddings before retrieval, all behind one protocol.

Every projector has `apply(task, data) -> data` (`TaskProjector`): the task's queries and candidates
(`retrieval_tasks.TaskData`) mapped to new rows, which the retrieval stage then L2-normalises and
scores. Two families:

  fitted once, the same map for every task and side (`Projector`, an affine map then L2
  normalisation; saved to / loaded from `.npz`):
    removal          paper Eq. 8-10: h -> normalise(h - V_r V_r^T h), V_r the top right singular
                     vectors of the atoms of the top-scored concepts (`fit_removal`, `removal_basis`);
                     `subspace_projector` for any span (the planted oracle)
    whitening        shrinkage whitening h -> normalise((h - mu) W), W = (Sigma_hat + eps I)^(-1/2)
                     (`fit_whitening`; ReAlign's per-side pair: `fit_realign`)
    all-but-the-top  h -> normalise(c - U U^T c), c = h - mu (`fit_abtt`, Mu & Viswanath 2018)
    centring         h -> normalise(h - mu): all-but-the-top with D = 0 (`fit_centering`)

  fitted per task and side on the very rows they map (transductive, no labels): `RealignWhitening`
  (the ReAlign baseline) and `PerSideAbtt` (all-but-the-top; D = 0 is mean-centring).

Which concepts the removal takes out, and how its settings are chosen, is `sae_jax.removal`; the
search and Recall@K are `sae_jax.retrieval`. Pure array code apart from the `.npz` files `save` writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import metrics
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.retrieval import check_2d, l2_normalize
from sae_jax.retrieval_tasks import TaskData


@runtime_checkable
class TaskProjector(Protocol):
  """What the retrieval stage applies to a task: `apply(task, data)` returns the mapped task."""

  kind: str

  def apply(self, task: str, data: TaskData) -> TaskData: ...


# --------------------------------------------------------------------------------------------
# The fitted projector.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Projector:
  """An affine map followed by L2 normalisation, fitted once and applied to any embeddings.

  kind 'removal':   h -> normalise(h - (h @ basis) @ basis.T)      basis [d, r] orthonormal.
  kind 'whitening': h -> normalise((h - mean) @ matrix)           matrix [d, d] symmetric.
  kind 'abtt':      h -> normalise(c - (c @ basis) @ basis.T), c = h - mean   (all-but-the-top,
                    `fit_abtt`; basis [d, D] orthonormal, D = 0 centres only).
  With `prenormalize`, h is L2-normalised before the map (ReAlign fits and applies it that way).
  """

  kind: str
  basis: Optional[np.ndarray] = None
  mean: Optional[np.ndarray] = None
  matrix: Optional[np.ndarray] = None
  info: dict = dataclasses.field(default_factory=dict)
  prenormalize: bool = False

  @property
  def d(self) -> int:
    return int((self.basis if self.basis is not None else self.matrix).shape[0])

  def transform(self, h):
    h = np.asarray(h, np.float32)
    check_2d("embeddings", h)
    if h.shape[1] != self.d:
      raise SaeJaxError(
        f"embeddings have width {h.shape[1]} but the {self.kind} projector was fitted on width {self.d}"
      )
    if self.prenormalize:
      h = np.asarray(l2_normalize(h), np.float32)
    return np.asarray(_apply_projector(self.kind, jnp.asarray(h), self.basis, self.mean, self.matrix))

  __call__ = transform

  def apply(self, task: str, data: TaskData) -> TaskData:
    """`data` with both sides mapped by this one fitted projector (the task does not matter)."""
    del task
    return data.map(self.transform)

  def save(self, path: str) -> None:
    arrays = {
      k: v for k, v in (("basis", self.basis), ("mean", self.mean), ("matrix", self.matrix)) if v is not None
    }
    tmp = path + ".tmp.npz"
    np.savez(
      tmp,
      kind=np.asarray(self.kind),
      info=np.asarray(json.dumps(self.info)),
      prenormalize=np.asarray(bool(self.prenormalize)),
      **arrays,
    )
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Projector":
    if not os.path.exists(path):
      raise SaeJaxError(f"{path}: no projector file there")
    with np.load(path, allow_pickle=False) as z:
      if "kind" not in z.files:
        raise SaeJaxError(f'{path}: not a projector file (no "kind" entry)')
      get = lambda key: np.asarray(z[key], np.float32) if key in z.files else None
      return cls(
        kind=str(z["kind"]),
        basis=get("basis"),
        mean=get("mean"),
        matrix=get("matrix"),
        info=json.loads(str(z["info"])) if "info" in z.files else {},
        prenormalize=bool(z["prenormalize"]) if "prenormalize" in z.files else False,
      )


@functools.partial(jax.jit, static_argnames=("kind",))
def _apply_projector(kind, h, basis, mean, matrix):
  if kind == "removal":
    out = h - (h @ basis) @ basis.T
  elif kind == "whitening":
    out = (h - mean) @ matrix
  elif kind == "abtt":
    centred = h - mean
    out = centred - (centred @ basis) @ basis.T
  else:
    raise SaeJaxError(f'projector kind: expected "removal", "whitening" or "abtt", got {kind!r}')
  return l2_normalize(out)


# --------------------------------------------------------------------------------------------
# Removal of the attribution subspace (paper Eq. 8-10).
# --------------------------------------------------------------------------------------------


def top_fraction(scores, fraction: float) -> np.ndarray:
  """Indices of the top `metrics.top_fraction_size` scores, best first (NaN last; ties -> lower index)."""
  scores = np.asarray(scores, np.float64)
  m = metrics.top_fraction_size(fraction, scores.shape[0], "config.retrieval.removal_fraction")
  key = np.where(np.isnan(scores), -np.inf, scores)
  return np.lexsort((np.arange(scores.shape[0]), -key))[:m]


RANK_CUT_RTOL = 1e-6


def removal_basis(atoms, rank: int, rtol: float = RANK_CUT_RTOL) -> np.ndarray:
  """Top right singular vectors of `atoms` [m, d] (Eq. 8), as [d, r_used] orthonormal.

  r_used = min(rank, number of singular values > rtol * sigma_max): when the selected atoms are
  (numerically) rank-deficient, the directions of near-zero singular values are arbitrary (any
  orthonormal completion is an equally valid SVD), so they are not removed. `rtol=0` keeps every
  nonzero direction. The caller reads r_used from the returned shape.
  """
  atoms = np.asarray(atoms, np.float64)
  check_2d("atoms", atoms)
  m, d = atoms.shape
  if not isinstance(rank, (int, np.integer)) or rank < 1:
    raise SaeJaxError(f"retrieval.removal_rank: expected a positive integer, got {rank!r}")
  if rank > min(m, d):
    raise SaeJaxError(
      f"retrieval.removal_rank={rank} is larger than the number of selected atoms ({m}) "
      f"or the width ({d}); raise retrieval.removal_fraction or lower the rank"
    )
  _, sv, vt = np.linalg.svd(atoms, full_matrices=False)
  if not np.all(np.isfinite(sv)) or sv[0] <= 0:
    raise SaeJaxError(f"atoms: the {m} selected dictionary rows are all zero or not finite")
  numerical = int(np.sum(sv > rtol * sv[0]))
  return vt[: min(int(rank), numerical)].T.astype(np.float32)


def fit_removal(
  dictionary, scores, rank: int, fraction: float = 0.01, rtol: float = RANK_CUT_RTOL
) -> Projector:
  """Removal projector (paper Eq. 8-10) from the top-`fraction` concepts by `scores`.

  `info["rank"]` is the rank actually removed (after the cut of near-zero singular values, see
  `removal_basis`), `info["rank_requested"]` the one asked for.
  """
  dictionary = np.asarray(dictionary, np.float32)
  check_2d("D", dictionary)
  scores = np.asarray(scores)
  if scores.shape != (dictionary.shape[0],):
    raise SaeJaxError(
      f"attribution: expected one score per dictionary row ({dictionary.shape[0]},), got {scores.shape}"
    )
  sel = top_fraction(scores, fraction)
  basis = removal_basis(dictionary[sel], rank, rtol)
  return Projector(
    "removal",
    basis=basis,
    info={
      "rank": int(basis.shape[1]),
      "rank_requested": int(rank),
      "rank_cut_rtol": float(rtol),
      "fraction": float(fraction),
      "n_atoms": int(sel.size),
      "atoms": [int(a) for a in sel[:4096]],
    },
  )


def subspace_projector(vectors, rank: Optional[int] = None) -> Projector:
  """Removal projector for the span of arbitrary `vectors` [m, d] (e.g. an oracle subspace)."""
  vectors = np.asarray(vectors, np.float32)
  check_2d("vectors", vectors)
  if rank is None:
    rank = int(np.linalg.matrix_rank(vectors.astype(np.float64)))
  return Projector(
    "removal",
    basis=removal_basis(vectors, rank),
    info={"rank": int(rank), "n_atoms": int(vectors.shape[0]), "source": "vectors"},
  )


def leading_removal(proj: Projector, rank: int) -> Projector:
  """The removal of the first `rank` directions of the removal `proj` (what `fit_removal` with that
  rank gives: the same SVD, fewer right singular vectors)."""
  basis = proj.basis[:, : min(int(rank), proj.basis.shape[1])]
  info = dict(proj.info, rank=int(basis.shape[1]), rank_requested=int(rank))
  return Projector("removal", basis=basis, info=info)


def project(h, basis):
  """Eq. 9-10 plus normalisation: normalise(h - V_r V_r^T h). Jittable."""
  h = jnp.asarray(h, jnp.float32)
  return l2_normalize(h - (h @ basis) @ basis.T)


# --------------------------------------------------------------------------------------------
# Shrinkage whitening and ReAlign.
# --------------------------------------------------------------------------------------------


def fit_whitening(
  embeddings, alpha: float = 0.1, center: bool = True, eps: float = 0.0, prenormalize: bool = False
) -> Projector:
  """Shrinkage whitening: Σ̂ = (1-α)Σ + α·tr(Σ)/d·I, W = (Σ̂ + eps·I)^(-1/2) (symmetric, via eigh).

  `prenormalize`: rows are L2-normalised before the fit, and the projector normalises its input too.
  """
  x = np.asarray(embeddings, np.float64)
  check_2d("embeddings", x)
  if not 0.0 <= alpha <= 1.0:
    raise SaeJaxError(f"retrieval.whitening_alpha: expected a value in [0, 1], got {alpha}")
  if prenormalize:
    x = l2_normalize(x)
  n, d = x.shape
  mean = x.mean(axis=0) if center else np.zeros(d)
  xc = x - mean
  cov = xc.T @ xc / max(n - 1, 1)
  shrunk = (1.0 - alpha) * cov + alpha * np.trace(cov) / d * np.eye(d)
  evals, evecs = np.linalg.eigh(shrunk)
  if evals.min() + eps <= 0:
    raise SaeJaxError(
      f"whitening: the shrunk covariance is singular (min eigenvalue {evals.min():.3g}); use "
      "retrieval.whitening_alpha > 0 or more embeddings"
    )
  w = (evecs / np.sqrt(evals + eps)) @ evecs.T
  return Projector(
    "whitening",
    mean=mean.astype(np.float32),
    matrix=w.astype(np.float32),
    info={"alpha": float(alpha), "center": bool(center), "n_fit": int(n), "eps": float(eps)},
    prenormalize=bool(prenormalize),
  )


WHITENING_MODES = ("realign", "joint")
REALIGN_EPS = 1e-5


def fit_realign(queries, candidates, alpha: float = 0.1) -> tuple[Projector, Projector]:
  """ReAlign whitening: one shrinkage-whitening projector per side, each fitted on its own rows.

  Rows are L2-normalised first; each side is centred on its own mean (which removes the offset
  between the two modalities) and whitened with (Σ̂ + 1e-5·I)^(-1/2). Transductive: fitted on the
  very query and candidate sets that are scored (no labels are used).
  Returns (query projector, candidate projector).
  """
  qp = fit_whitening(queries, alpha, eps=REALIGN_EPS, prenormalize=True)
  cp = fit_whitening(candidates, alpha, eps=REALIGN_EPS, prenormalize=True)
  qp.info["side"], cp.info["side"] = "queries", "candidates"
  return qp, cp


# --------------------------------------------------------------------------------------------
# All-but-the-top and centring.
# --------------------------------------------------------------------------------------------


def fit_abtt(embeddings: Any, n_components: int, prenormalize: bool = True) -> Projector:
  """All-but-the-top (Mu & Viswanath, 2018): h -> normalise((h − μ) − U Uᵀ (h − μ)), U [d, D] the
  top-D principal directions of the (L2-normalised, with `prenormalize`) rows; D = 0 centres only."""
  x = np.asarray(embeddings, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise SaeJaxError(f"all-but-the-top: expected embeddings [N >= 2, d], got shape {x.shape}")
  n, d = x.shape
  if not isinstance(n_components, (int, np.integer)) or not 0 <= n_components <= min(n - 1, d):
    raise SaeJaxError(
      f"config.retrieval.abtt_components: {n_components!r} must be an integer in [0, {min(n - 1, d)}]"
    )
  if prenormalize:
    x = np.asarray(l2_normalize(x))
  mean = x.mean(axis=0)
  if n_components:
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:n_components].T
  else:
    basis = np.zeros((d, 0))
  return Projector(
    "abtt",
    basis=basis.astype(np.float32),
    mean=mean.astype(np.float32),
    info={"n_components": int(n_components), "n_fit": int(n)},
    prenormalize=bool(prenormalize),
  )


def fit_centering(embeddings: Any, prenormalize: bool = True) -> Projector:
  """Mean-centring: h -> normalise(h − μ), μ the mean of the (L2-normalised) rows; all-but-the-top
  with no direction removed (`+center`)."""
  return fit_abtt(embeddings, 0, prenormalize)


# --------------------------------------------------------------------------------------------
# Fitted per task and side, on the rows they map.
# --------------------------------------------------------------------------------------------


class RealignWhitening:
  """ReAlign (the authors' baseline): per task, one whitening per side fitted on that side's rows.

  Transductive by construction (fitted on the very query and candidate sets that are scored; no
  labels are used). `fitted` keeps each task's (query, candidate) projectors for `save`.
  """

  kind = "realign"

  def __init__(self, alpha: float):
    self.alpha = float(alpha)
    self.fitted: dict[str, tuple[Projector, Projector]] = {}

  def apply(self, task: str, data: TaskData) -> TaskData:
    qp, cp = fit_realign(data.queries, data.candidates, self.alpha)
    self.fitted[task] = (qp, cp)
    return dataclasses.replace(
      data, queries=qp.transform(data.queries), candidates=cp.transform(data.candidates)
    )

  def save(self, path: str) -> None:
    arrays = {"kind": np.asarray("realign"), "alpha": np.asarray(self.alpha)}
    for task, (qp, cp) in self.fitted.items():
      for side, p in (("queries", qp), ("candidates", cp)):
        arrays[f"{task}__{side}__mean"] = p.mean
        arrays[f"{task}__{side}__matrix"] = p.matrix
    workdir_lib.atomic_savez(path, **arrays)


class PerSideAbtt:
  """All-but-the-top (`fit_abtt`) per task and side, fitted on that side's rows like
  `RealignWhitening` (transductive, no labels); `n_components` = 0 is mean-centring only."""

  kind = "abtt"

  def __init__(self, n_components: int):
    self.n_components = int(n_components)

  def apply(self, task: str, data: TaskData) -> TaskData:
    del task
    qp = fit_abtt(data.queries, self.n_components)
    cp = fit_abtt(data.candidates, self.n_components)
    return dataclasses.replace(
      data, queries=qp.transform(data.queries), candidates=cp.transform(data.candidates)
    )
