"""Per-concept statistics over sparse codes, streamed block by block (no dense [N, c] matrix).

`TopRows` keeps, for every concept, the rows of largest activation seen so far (ties: the lower row
first); `SparseColumns` keeps the nonzero (row, concept, value) triples of the codes, from which
`sparse_auroc` computes, for every concept at once, the ROC AUC of its activation against binary row
labels (a concept's zeros are tied at the lowest rank, so only its nonzeros need sorting).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse

from sae_jax.errors import SaeJaxError


class TopRows:
  """Streaming top-`n_top` rows per concept of a sparse code stream (values/indices [B, k] blocks).

  Each `update` merges the block's (concept, value, row) triples with the kept ones by one lexsort
  over (concept, -value, row) and keeps the first `n_top` of every concept: exactly the first
  `n_top` entries of a per-concept argsort by (-value, row) over all rows, whatever the blocks."""

  def __init__(self, c: int, n_top: int):
    if int(n_top) < 1:
      raise SaeJaxError(f"top rows: n_top={n_top}: expected >= 1")
    self.c, self.n_top = int(c), int(n_top)
    self.values = np.full((self.c, self.n_top), -np.inf, np.float32)  # -inf: no row yet
    self.rows = np.full((self.c, self.n_top), -1, np.int64)

  def update(self, values: np.ndarray, indices: np.ndarray, row_offset: int) -> None:
    values = np.asarray(values, np.float32)
    indices = np.asarray(indices)
    rows = row_offset + np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)
    keep = values > 0  # an inactive code slot is no example of its concept
    cand_c = np.concatenate([np.repeat(np.arange(self.c), self.n_top), indices[keep].astype(np.int64)])
    cand_v = np.concatenate([self.values.ravel(), values[keep]])
    cand_r = np.concatenate([self.rows.ravel(), rows[keep].astype(np.int64)])
    # Empty slots (row -1) sort after every real row of equal value -inf; real values are > 0.
    order = np.lexsort((np.where(cand_r < 0, np.iinfo(np.int64).max, cand_r), -cand_v, cand_c))
    cand_c, cand_v, cand_r = cand_c[order], cand_v[order], cand_r[order]
    starts = np.searchsorted(cand_c, np.arange(self.c))
    take = starts[:, None] + np.arange(self.n_top)[None, :]  # every concept has >= n_top entries
    self.values = cand_v[take]
    self.rows = cand_r[take]


class SparseColumns:
  """The nonzero (row, concept, value) triples of a code stream, gathered block by block."""

  def __init__(self, c: int):
    self.c = int(c)
    self._parts: list = []
    self.n_rows = 0

  def update(self, values: np.ndarray, indices: np.ndarray) -> None:
    values = np.asarray(values, np.float32)
    rows = self.n_rows + np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)
    keep = values > 0
    self._parts.append(
      (rows[keep].astype(np.int64), np.asarray(indices)[keep].astype(np.int64), values[keep])
    )
    self.n_rows += values.shape[0]

  def matrix(self) -> scipy.sparse.csc_matrix:
    """The codes as a sparse [n_rows, c] matrix (duplicate (row, concept) entries summed)."""
    if self._parts:
      r, c, v = (np.concatenate(p) for p in zip(*self._parts))
    else:
      r, c, v = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return scipy.sparse.csc_matrix((v, (r, c)), shape=(self.n_rows, self.c))


def top_rows(values: np.ndarray, indices: np.ndarray, c: int, n_top: int, block: int = 4096) -> TopRows:
  """`TopRows` of codes (values, indices) [N, k] fed `block` rows at a time."""
  top = TopRows(c, n_top)
  for s in range(0, np.shape(values)[0], int(block)):
    top.update(values[s : s + int(block)], indices[s : s + int(block)], s)
  return top


def sparse_codes(
  values: np.ndarray, indices: np.ndarray, c: int, block: int = 4096
) -> scipy.sparse.csc_matrix:
  """Codes (values, indices) [N, k] as a sparse [N, c] matrix, gathered `block` rows at a time."""
  cols = SparseColumns(c)
  for s in range(0, np.shape(values)[0], int(block)):
    cols.update(values[s : s + int(block)], indices[s : s + int(block)])
  return cols.matrix()


def _column_ranks(codes: scipy.sparse.csc_matrix) -> tuple[np.ndarray, np.ndarray]:
  """Average ranks (ties one half) of each column's nonzeros among that column's N values, its zeros
  tied at the bottom; returns (ranks of the stored entries in CSC order, the zeros' rank [c])."""
  n, c = codes.shape
  nnz_per_col = np.diff(codes.indptr)
  n_zero = n - nnz_per_col
  col = np.repeat(np.arange(c), nnz_per_col)
  vals = codes.data.astype(np.float64)
  order = np.lexsort((vals, col))
  sorted_col, sorted_val = col[order], vals[order]
  # Position within the column (0-based), then the average over runs of equal (column, value).
  pos = np.arange(order.size) - codes.indptr[sorted_col]
  new_run = np.ones(order.size, bool)
  new_run[1:] = (sorted_col[1:] != sorted_col[:-1]) | (sorted_val[1:] != sorted_val[:-1])
  run_id = np.cumsum(new_run) - 1
  run_first = pos[new_run]
  run_len = np.bincount(run_id)
  avg_pos = run_first[run_id] + (run_len[run_id] - 1) / 2.0
  ranks = np.empty(order.size, np.float64)
  ranks[order] = n_zero[sorted_col] + 1.0 + avg_pos
  return ranks, (n_zero + 1.0) / 2.0


def sparse_auroc(codes: scipy.sparse.csc_matrix, labels: np.ndarray) -> np.ndarray:
  """ROC AUC [c, V] of every concept's activation (column of `codes` [N, c]) against every binary
  label column of `labels` [N, V]: the Mann-Whitney U over average ranks (ties count one half);
  NaN where a label has no positive or no negative row."""
  codes = scipy.sparse.csc_matrix(codes)
  codes.sum_duplicates()
  codes.sort_indices()
  y = np.asarray(labels, bool)
  n = codes.shape[0]
  if y.ndim != 2 or y.shape[0] != n:
    raise SaeJaxError(f"sparse_auroc: labels {y.shape} do not match codes rows {n}")
  ranks, zero_rank = _column_ranks(codes)
  pos = y.sum(0).astype(np.float64)  # [V]
  shifted = scipy.sparse.csc_matrix(
    (ranks - np.repeat(zero_rank, np.diff(codes.indptr)), codes.indices, codes.indptr), shape=codes.shape
  )
  # Sum of the positives' ranks = zero rank * positives + the nonzeros' excess over it.
  rank_sum = zero_rank[:, None] * pos[None, :] + np.asarray(shifted.T @ y.astype(np.float64))
  neg = n - pos
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
  auc[:, (pos == 0) | (neg == 0)] = np.nan
  return auc


def fire_rates(codes: scipy.sparse.csc_matrix) -> np.ndarray:
  """Share of rows where each concept is active, [c]."""
  n = max(codes.shape[0], 1)
  return np.diff(scipy.sparse.csc_matrix(codes).indptr) / n


def nearest_by_cosine(D: np.ndarray, ids: np.ndarray, n_near: int, block: int = 1024) -> tuple:
  """For each concept in `ids`: the `n_near` other concepts of largest decoder cosine (ids, cosines)."""
  Dn = np.asarray(D, np.float32)
  Dn = Dn / np.maximum(np.linalg.norm(Dn, axis=1, keepdims=True), 1e-12)
  ids = np.asarray(ids, np.int64)
  n_near = min(int(n_near), Dn.shape[0] - 1)
  out_i = np.zeros((ids.size, max(n_near, 0)), np.int64)
  out_c = np.zeros((ids.size, max(n_near, 0)), np.float32)
  for s in range(0, ids.size, block):
    q = ids[s : s + block]
    cos = Dn[q] @ Dn.T
    cos[np.arange(q.size), q] = -np.inf
    top = np.argsort(-cos, axis=1, kind="stable")[:, :n_near]
    out_i[s : s + q.size] = top
    out_c[s : s + q.size] = np.take_along_axis(cos, top, 1)
  return out_i, out_c


def best_labels(
  auc: np.ndarray, names: list, min_auroc: float, fired: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
  """Per concept: the index of its best label column (largest AUROC, NaN ignored; -1 when none
  reaches `min_auroc` or the concept never fires) and that AUROC."""
  if len(names) != auc.shape[1]:
    raise SaeJaxError(f"best_labels: {len(names)} names for {auc.shape[1]} label columns")
  filled = np.where(np.isnan(auc), -np.inf, auc)
  best = np.argmax(filled, axis=1) if auc.shape[1] else np.zeros(auc.shape[0], np.int64)
  val = filled[np.arange(auc.shape[0]), best] if auc.shape[1] else np.full(auc.shape[0], np.nan)
  ok = val >= float(min_auroc)
  if fired is not None:
    ok &= np.asarray(fired, bool)
  return np.where(ok, best, -1), np.where(np.isfinite(val), val, np.nan)


def composition(categories: list, ids: np.ndarray) -> dict:
  """{category: count} of the concepts `ids`, largest first (ties by name)."""
  counts: dict = {}
  for i in np.asarray(ids, np.int64):
    counts[categories[i]] = counts.get(categories[i], 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def composition_line(name: str, comp: dict) -> str:
  """'S_A: 12 colour, 3 position, 5 content-free' (or 'S_A: empty')."""
  return f"{name}: " + (", ".join(f"{v} {k}" for k, v in comp.items()) or "empty")
