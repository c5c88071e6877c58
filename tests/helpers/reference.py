"""Independent NumPy references (dense, float64, written from the paper's formulas, not from the
library's code) that the tests compare the library against on small sizes."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def dense_codes(values: np.ndarray, indices: np.ndarray, c: int) -> np.ndarray:
  """Sparse codes (values [N, k], indices [N, k]) as a dense float64 [N, c] matrix (duplicates add)."""
  values, indices = np.asarray(values), np.asarray(indices)
  assert values.shape == indices.shape and values.ndim == 2, (values.shape, indices.shape)
  z = np.zeros((values.shape[0], c), np.float64)
  rows = np.repeat(np.arange(values.shape[0]), values.shape[1])
  np.add.at(z, (rows, indices.reshape(-1)), values.reshape(-1))
  return z


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def topk_relu_codes(pre: np.ndarray, k: int) -> np.ndarray:
  """Dense Top-K SAE codes: the k largest entries of ReLU(pre) per row (ties: lower index), rest 0."""
  pre = np.maximum(np.asarray(pre, np.float64), 0.0)
  z = np.zeros_like(pre)
  for n in range(pre.shape[0]):
    order = sorted(range(pre.shape[1]), key=lambda j: (-pre[n, j], j))[:k]
    z[n, order] = pre[n, order]
  return z


def concept_reference(D: np.ndarray, image_codes, text_codes) -> dict:
  """Eq. 3-7 of the paper from dense codes, the Gram matrix M = D D^T and the dense bridge matrix B."""
  D = np.asarray(D, np.float64)
  c = D.shape[0]
  zi, zt = dense_codes(*image_codes, c), dense_codes(*text_codes, c)
  n = zi.shape[0]
  M = D @ D.T
  e_img, e_txt = zi.mean(0), zt.mean(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    modality = e_txt / (e_img + e_txt)
  cooc = zi.T @ zt / n
  B = cooc * M  # B_ij = mean(z_iota,i z_tau,j) <d_i, d_j>
  x_img, x_txt = zi @ D, zt @ D  # reconstructions without the decoder bias
  return dict(
    zi=zi,
    zt=zt,
    M=M,
    B=B,
    cooc=cooc,
    energy=np.concatenate([zi, zt]).mean(0),
    energy_image=e_img,
    energy_text=e_txt,
    modality=modality,
    attribution=(zi * (zt @ M) + zt * (zi @ M)).mean(0),
    diag=np.diag(B).copy(),
    row=B.sum(1),
    col=B.sum(0),
    max=np.maximum(B.max(1), B.max(0)),
    pair_dot=float(np.mean(np.sum(x_img * x_txt, axis=1))),
  )


def topk_reference(
  queries: np.ndarray,
  candidates: np.ndarray,
  k: int,
  exclude: Optional[np.ndarray] = None,
  normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product over the full float64 score matrix, ties to the lower id
  (np.lexsort on (id, -score)); `exclude[i] >= 0` removes that candidate from query i's list."""
  q, c = np.asarray(queries, np.float64), np.asarray(candidates, np.float64)
  if normalize:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
  s = q @ c.T
  ids = np.arange(c.shape[0])
  scores, order = [], []
  for i in range(q.shape[0]):
    keep = ids if exclude is None or exclude[i] < 0 else ids[ids != exclude[i]]
    top = keep[np.lexsort((keep, -s[i, keep]))[:k]]
    order.append(top)
    scores.append(s[i, top])
  return np.array(scores), np.array(order)


def recall_reference(
  scores: np.ndarray,
  indptr: np.ndarray,
  indices: np.ndarray,
  ks: Sequence[int] = (1, 5, 10),
  exclude: Optional[np.ndarray] = None,
) -> dict:
  """Recall@K (percent; a hit when any positive ranks in the top K) from a full score matrix,
  counted without a top-k list: positive p of query i has rank #{j: s_ij > s_ip, or = and j < p}
  over the non-excluded candidates; the query hits at K when its best positive's rank is < K."""
  s = np.asarray(scores, np.float64)
  nq, nc = s.shape
  ids = np.arange(nc)
  best = np.empty(nq, np.int64)
  for i in range(nq):
    allowed = np.ones(nc, bool)
    if exclude is not None and exclude[i] >= 0:
      allowed[exclude[i]] = False
    ranks = [
      int(np.sum(allowed & ((s[i] > s[i, p]) | ((s[i] == s[i, p]) & (ids < p)))))
      for p in np.asarray(indices)[indptr[i] : indptr[i + 1]]
      if allowed[p]
    ]
    best[i] = min(ranks) if ranks else nc
  return {f"R@{k}": 100.0 * float(np.mean(best < k)) for k in ks}
