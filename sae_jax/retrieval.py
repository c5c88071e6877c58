"""Zero-shot retrieval math: exact top-K cosine search and Recall@K.

Everything here is pure array code (jittable where it matters); the stage that reads workdirs and
writes tables lives in `sae_jax.stages.retrieve`.

Top-K search (`topk_search`)
  Exact float32 inner products on L2-normalised rows, computed blockwise: for each block of
  candidates one GEMM `queries @ block.T`, a cheap per-block selection, then a running top-K merge.
  The per-block selection is exact and avoids a full `lax.top_k` over the block: the block's
  scores are cut into groups of `g` consecutive candidates, the top `k` (k+1 with exclusion) groups
  by their maximum are kept, and `lax.top_k` runs only over those `k*g` scores. The true top-k of
  the block lies in those groups: an element outside them would have k groups, each with a distinct
  element at least as good, ahead of it (under the total order score desc, index asc).
  Ties are broken deterministically: the lower candidate index wins (every concatenation keeps
  candidates in index order and `lax.top_k` prefers the lower position).
  With a mesh, queries are split over the "data" axis and candidates over the "model" axis
  (`jax.shard_map`); each device runs the blockwise search on its candidate shard, the (score, id)
  lists are all-gathered over "model" in device order (= index order) and merged with one top_k.

  The search is GEMM-bound; the layout (NT) and block sizes were picked by measurement
  (benchmarks/README.md). `lax.approx_max_k` is not used: it is not exact in general.

Recall@K (`recall_at_k`)
  Hit rate: a query scores 1 at K if any of its positives (CSR `indptr`, `indices`) is in its top K.
  This is the UniIR / CLIP_benchmark convention.

The maps applied to the embeddings before the search (the removal of paper Eq. 8-10, whitening,
all-but-the-top, centring) are `sae_jax.projectors`.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae_jax import sharding
from sae_jax.errors import SaeJaxError

DEFAULT_BLOCK_SIZE = 8192
DEFAULT_QUERY_BLOCK_SIZE = 1024
DEFAULT_GROUP_SIZE = 32


# --------------------------------------------------------------------------------------------
# Normalisation and input checks.
# --------------------------------------------------------------------------------------------


def l2_normalize(x, eps: float = 1e-12):
  """Rows scaled to unit L2 norm (zero rows stay zero). Works on NumPy and JAX arrays."""
  xp = jnp if isinstance(x, jax.Array) else np
  norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
  return x / xp.maximum(norm, eps)


def check_2d(name: str, x) -> None:
  """Raises SaeJaxError (one line) unless `x` is a 2-D array."""
  if getattr(x, "ndim", None) != 2:
    raise SaeJaxError(f"{name}: expected a 2-D array [rows, d], got shape {getattr(x, 'shape', None)}")


def check_search_inputs(queries, candidates, k: int, exclude=None) -> None:
  """Raises SaeJaxError (one line) when the search cannot be exact and well defined."""
  check_2d("queries", queries)
  check_2d("candidates", candidates)
  if queries.shape[1] != candidates.shape[1]:
    raise SaeJaxError(
      f"queries have width {queries.shape[1]} but candidates have width {candidates.shape[1]}; "
      "both must be embeddings of the same space"
    )
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise SaeJaxError(f"k: expected a positive integer, got {k!r}")
  pool = candidates.shape[0] - (1 if exclude is not None else 0)
  if k > pool:
    raise SaeJaxError(
      f"k={k} is larger than the candidate pool ({candidates.shape[0]} candidates"
      f"{', one excluded per query' if exclude is not None else ''})"
    )
  if exclude is not None and np.shape(exclude) != (queries.shape[0],):
    raise SaeJaxError(
      f"exclude: expected one candidate index (or -1) per query, shape ({queries.shape[0]},), "
      f"got {np.shape(exclude)}"
    )


def check_positives(indptr, indices, n_queries: int, n_candidates: int, allow_empty: bool = False) -> None:
  """CSR positives: indptr [Nq+1] non-decreasing from 0, every query with >= 1 valid positive.

  `allow_empty`: queries without positives are allowed (they count as misses in `recall_at_k`).
  """
  indptr = np.asarray(indptr)
  indices = np.asarray(indices)
  if indptr.shape != (n_queries + 1,):
    raise SaeJaxError(
      f"positives_indptr: expected shape ({n_queries + 1},) for {n_queries} queries, got {indptr.shape}"
    )
  if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
    raise SaeJaxError("positives_indptr: expected non-decreasing offsets from 0 to len(positives_indices)")
  empty = np.flatnonzero(np.diff(indptr) == 0)
  if empty.size and not allow_empty:
    raise SaeJaxError(
      f"query {int(empty[0])} has no positives ({empty.size} such queries); every query needs "
      "at least one positive candidate"
    )
  if indices.size and (indices.min() < 0 or indices.max() >= n_candidates):
    raise SaeJaxError(
      f"positives_indices: values must lie in [0, {n_candidates}), got range "
      f"[{int(indices.min())}, {int(indices.max())}]"
    )


# --------------------------------------------------------------------------------------------
# Exact blockwise top-K.
# --------------------------------------------------------------------------------------------


def _merge(top_s, top_i, new_s, new_i, k):
  """Merges two (score, id) lists; `top_*` must hold the lower candidate ids (tie order)."""
  s = jnp.concatenate([top_s, new_s], axis=1)
  i = jnp.concatenate([top_i, new_i], axis=1)
  s, pos = lax.top_k(s, k)
  return s, jnp.take_along_axis(i, pos, axis=1)


def _pick_group(block: int, k: int, group: int, n_extra: int) -> int:
  """Largest power-of-two group size <= `group` dividing `block` with >= k+n_extra+1 groups."""
  g = 1
  while g * 2 <= group and block % (g * 2) == 0 and block // (g * 2) >= k + n_extra + 1:
    g *= 2
  return g


def _block_topk(q, cblk, base_id, k, group, n_valid, exclude):
  """Exact top-k of one candidate block. q [nq, d], cblk [B, d]; ids are base_id + row."""
  nq = q.shape[0]
  b = cblk.shape[0]
  s = lax.dot_general(
    q, cblk, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  )
  ids = base_id + jnp.arange(b, dtype=jnp.int32)

  def masked(scores, cand_ids):
    # cand_ids broadcastable to scores; -inf for padding rows and the excluded candidate.
    if n_valid is not None:
      scores = jnp.where(cand_ids >= n_valid, -jnp.inf, scores)
    if exclude is not None:
      scores = jnp.where(cand_ids == exclude[:, None], -jnp.inf, scores)
    return scores

  n_extra = 1 if exclude is not None else 0
  g = _pick_group(b, k, group, n_extra)
  if g == 1 or b < k:
    sm = masked(s, ids[None, :])
    kk = min(k, b)
    top_s, pos = lax.top_k(sm, kk)
    top_i = jnp.take_along_axis(jnp.broadcast_to(ids[None, :], (nq, b)), pos, axis=1)
    if kk < k:  # pad so every block returns k entries
      top_s = jnp.concatenate([top_s, jnp.full((nq, k - kk), -jnp.inf, top_s.dtype)], axis=1)
      top_i = jnp.concatenate([top_i, jnp.full((nq, k - kk), jnp.iinfo(jnp.int32).max, jnp.int32)], axis=1)
    return top_s, top_i
  n_groups = b // g
  # Group maxima over masked scores (the mask is fused into the reduction).
  gmax = jnp.max(masked(s, ids[None, :]).reshape(nq, n_groups, g), axis=2)
  kg = min(k + n_extra, n_groups)
  _, gsel = lax.top_k(gmax, kg)
  gsel = jnp.sort(gsel, axis=1)  # keep index order so ties resolve to the lower id
  s3 = s.reshape(nq, n_groups, g)
  cand_s = jnp.take_along_axis(s3, gsel[:, :, None], axis=1).reshape(nq, kg * g)
  cand_i = base_id + gsel[:, :, None] * g + jnp.arange(g, dtype=jnp.int32)[None, None, :]
  cand_i = cand_i.reshape(nq, kg * g)
  cand_s = masked(cand_s, cand_i)
  top_s, pos = lax.top_k(cand_s, k)
  return top_s, jnp.take_along_axis(cand_i, pos, axis=1)


def _search_local(q, c, k, block, group, id_offset, n_valid, exclude):
  """Top-k of q [nq, d] over c [nc, d] (ids id_offset + row), blockwise with a running merge."""
  nq = q.shape[0]
  nc = c.shape[0]
  block = max(1, min(block, nc))
  nb, rem = divmod(nc, block)
  init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), jnp.iinfo(jnp.int32).max, jnp.int32))

  def body(j, carry):
    start = j * block
    cblk = lax.dynamic_slice_in_dim(c, start, block, axis=0)
    bs, bi = _block_topk(q, cblk, id_offset + start, k, group, n_valid, exclude)
    return _merge(carry[0], carry[1], bs, bi, k)

  top = lax.fori_loop(0, nb, body, init) if nb > 1 else (body(0, init) if nb == 1 else init)
  if rem:
    tail = lax.slice_in_dim(c, nb * block, nc, axis=0)
    bs, bi = _block_topk(q, tail, id_offset + nb * block, k, group, n_valid, exclude)
    top = _merge(top[0], top[1], bs, bi, k)
  return top


def _search_queries(q, c, k, block, query_block, group, id_offset, n_valid, exclude):
  """Loops `_search_local` over blocks of queries (q is padded to a multiple of query_block)."""
  nq = q.shape[0]
  if nq <= query_block:
    return _search_local(q, c, k, block, group, id_offset, n_valid, exclude)
  nqb = nq // query_block
  qb = q.reshape(nqb, query_block, q.shape[1])
  if exclude is None:
    fn = lambda qq: _search_local(qq, c, k, block, group, id_offset, n_valid, None)
    s, i = lax.map(fn, qb)
  else:
    eb = exclude.reshape(nqb, query_block)
    fn = lambda a: _search_local(a[0], c, k, block, group, id_offset, n_valid, a[1])
    s, i = lax.map(fn, (qb, eb))
  return s.reshape(nq, k), i.reshape(nq, k)


@functools.partial(jax.jit, static_argnames=("k", "block", "query_block", "group", "n_valid"))
def _search_jit(q, c, exclude, *, k, block, query_block, group, n_valid):
  return _search_queries(q, c, k, block, query_block, group, 0, n_valid, exclude)


def _pad_rows(x, multiple, value=0):
  n = x.shape[0]
  pad = (-n) % multiple
  if not pad:
    return x
  widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
  return (
    np.pad(np.asarray(x), widths, constant_values=value)
    if isinstance(x, np.ndarray)
    else jnp.pad(x, widths, constant_values=value)
  )


def _sharded_search(q, c, exclude, k, block, query_block, group, mesh, data_axis, model_axis):
  n_data = mesh.shape[data_axis] if data_axis else 1
  n_model = mesh.shape[model_axis] if model_axis else 1
  nq, nc = q.shape[0], c.shape[0]
  c = _pad_rows(c, n_model)
  local_nc = c.shape[0] // n_model
  n_valid = nc if c.shape[0] != nc else None
  local_nq = -(-nq // n_data)
  qbs = min(query_block, local_nq)
  local_nq = -(-local_nq // qbs) * qbs
  q = _pad_rows(q, local_nq * n_data)
  if exclude is not None:
    exclude = _pad_rows(exclude, local_nq * n_data, value=-1)
  P = jax.sharding.PartitionSpec

  def local(qs, cs, es=None):
    offset = (lax.axis_index(model_axis) * local_nc) if model_axis else 0
    s, i = _search_queries(qs, cs, k, block, qbs, group, offset, n_valid, es)
    if model_axis and n_model > 1:
      s = lax.all_gather(s, model_axis, axis=1, tiled=True)  # [nq, n_model*k] in device order
      i = lax.all_gather(i, model_axis, axis=1, tiled=True)
      s, pos = lax.top_k(s, k)
      i = jnp.take_along_axis(i, pos, axis=1)
    return s, i

  qspec = P(data_axis, None)
  cspec = P(model_axis, None)
  out = (P(data_axis, None), P(data_axis, None))
  if exclude is None:
    fn = jax.shard_map(
      lambda a, b: local(a, b), mesh=mesh, in_specs=(qspec, cspec), out_specs=out, check_vma=False
    )
    s, i = jax.jit(fn)(q, c)
  else:
    fn = jax.shard_map(
      local, mesh=mesh, in_specs=(qspec, cspec, P(data_axis)), out_specs=out, check_vma=False
    )
    s, i = jax.jit(fn)(q, c, exclude)
  return s[:nq], i[:nq]


def topk_search(
  queries,
  candidates,
  k: int,
  *,
  exclude=None,
  block_size: int = DEFAULT_BLOCK_SIZE,
  query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE,
  group_size: int = DEFAULT_GROUP_SIZE,
  mesh: Optional[jax.sharding.Mesh] = None,
  data_axis: Optional[str] = sharding.DATA,
  model_axis: Optional[str] = sharding.MODEL,
  normalize: bool = True,
):
  """Exact top-k candidates per query by inner product (cosine when `normalize`).

  Args:
    queries: [Nq, d] float32. candidates: [Nc, d] float32.
    k: number of neighbours; must not exceed the pool.
    exclude: optional int [Nq]; candidate id removed from each query's pool (-1: none), e.g. the
      query's own reference image in CIRR.
    block_size / query_block_size: candidates / queries per GEMM.
    group_size: candidates per group in the exact two-stage block selection (1 disables it).
    mesh: optional mesh; queries split over `data_axis`, candidates over `model_axis` (either axis
      may be None or absent from the mesh).
    normalize: L2-normalise both sides first (float32).

  Returns:
    (scores [Nq, k] float32 descending, ids [Nq, k] int32); ties resolve to the lower id.
  """
  check_search_inputs(queries, candidates, k, exclude)
  q = jnp.asarray(queries, jnp.float32)
  c = jnp.asarray(candidates, jnp.float32)
  if normalize:
    q, c = l2_normalize(q), l2_normalize(c)
  if exclude is not None:
    exclude = jnp.asarray(exclude, jnp.int32)
  if mesh is not None:
    axes = mesh.axis_names
    data_axis = data_axis if data_axis in axes else None
    model_axis = model_axis if model_axis in axes else None
    return _sharded_search(
      q, c, exclude, k, block_size, query_block_size, group_size, mesh, data_axis, model_axis
    )
  # Query blocks are dispatched from Python: one compiled program for every block (same shapes),
  # and JAX's async dispatch keeps the blocks back to back.
  nq = q.shape[0]
  qbs = min(query_block_size, nq)
  qp = _pad_rows(q, qbs)
  ep = None if exclude is None else _pad_rows(exclude, qbs, value=-1)
  outs = []
  for start in range(0, qp.shape[0], qbs):
    outs.append(
      _search_jit(
        qp[start : start + qbs],
        c,
        None if ep is None else ep[start : start + qbs],
        k=int(k),
        block=int(block_size),
        query_block=qbs,
        group=int(group_size),
        n_valid=None,
      )
    )
  s = jnp.concatenate([o[0] for o in outs], axis=0) if len(outs) > 1 else outs[0][0]
  i = jnp.concatenate([o[1] for o in outs], axis=0) if len(outs) > 1 else outs[0][1]
  return s[:nq], i[:nq]


# --------------------------------------------------------------------------------------------
# Recall@K.
# --------------------------------------------------------------------------------------------


def first_hit_rank(topk_ids, indptr, indices):
  """Rank (0-based) of the best-ranked positive in each query's list; K when none is there.

  Jittable: one [P, K] comparison over all positives plus a segment-min per query.
  """
  topk_ids = jnp.asarray(topk_ids)
  nq, kk = topk_ids.shape
  indptr = jnp.asarray(indptr, jnp.int32)
  indices = jnp.asarray(indices, jnp.int32)
  n_pos = indices.shape[0]
  owner = jnp.searchsorted(indptr, jnp.arange(n_pos, dtype=jnp.int32), side="right") - 1
  match = topk_ids[owner] == indices[:, None]  # [P, K]
  rank = jnp.where(jnp.any(match, axis=1), jnp.argmax(match, axis=1), kk)
  return jax.ops.segment_min(rank, owner, num_segments=nq, indices_are_sorted=True)


def recall_at_k(topk_ids, indptr, indices, ks: Sequence[int] = (1, 5, 10), allow_empty: bool = False) -> dict:
  """Recall@K in percent (hit rate over queries) for each K in `ks` (K <= list length).

  `allow_empty`: a query without positives is a miss (the denominator is every query).
  """
  topk_ids = np.asarray(topk_ids)
  check_positives(indptr, indices, topk_ids.shape[0], np.iinfo(np.int32).max, allow_empty)
  for kk in ks:
    if kk > topk_ids.shape[1]:
      raise SaeJaxError(f"Recall@{kk} needs at least {kk} retrieved ids per query, got {topk_ids.shape[1]}")
  rank = np.asarray(jax.jit(first_hit_rank)(topk_ids, indptr, indices))
  return {f"R@{kk}": float(100.0 * np.mean(rank < kk)) for kk in ks}


def evaluate(queries, candidates, indptr, indices, ks=(1, 5, 10), exclude=None, **search_kwargs):
  """Recall@K (percent) of exact cosine search; returns (recall dict, top ids)."""
  check_positives(indptr, indices, np.shape(queries)[0], np.shape(candidates)[0])
  _, ids = topk_search(queries, candidates, max(ks), exclude=exclude, **search_kwargs)
  return recall_at_k(ids, indptr, indices, ks), np.asarray(ids)
