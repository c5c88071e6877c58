"""Per-concept metrics of the paper's Section 3.1 (Eq. 3-7), computed on sparse codes at scale.

Inputs are matched pairs of sparse codes (row n of the image codes and row n of the text codes
come from one image-caption pair), each as `values` float [N, k] and `indices` int [N, k], and the
unit-norm dictionary D [c, d] (one concept per row). Nothing here builds a dense [N, c] code
matrix or the c x c Gram matrix M = D D^T:

- energy `E_i = mean_n z_n,i` (over image and text rows together, and per modality);
- modality score `MS_i = E_tau,i / (E_iota,i + E_tau,i)` (1 = text-only, the paper's orientation;
  `reverse=True` gives Papadimitriou et al.'s 1 = image-only); NaN where a concept never fires;
- attribution `A_i = mean_pairs(z_iota,i (M z_tau)_i + z_tau,i (M z_iota)_i)` through the identity
  `(M z)_i = <d_i, x_hat>` (M = D D^T) with x_hat = z D WITHOUT the decoder bias, so each pair costs
  O(k d): gather the 2k active rows of D, reconstruct both sides, take 2k dot products;
- bridge `B_ij = mean_pairs(z_iota,i z_tau,j) <d_i, d_j>` reduced to one score per concept:
  `diag` B_ii (default), `row` sum_j B_ij = mean z_iota,i <d_i, x_hat_tau>, `col`
  sum_j B_ji = mean z_tau,i <d_i, x_hat_iota>, `sym` row + col (== attribution: sum_j B_ij + B_ji), and
  `max` max_j max(B_ij, B_ji). Only `max` and the top bridge pairs need B itself:
  `bridge_blockwise` builds it one tile of concept rows at a time (tiles sharded over the mesh's
  "model" axis), keeping a running top-K of pairs, never all of B.

Per-concept sums stream over N in fixed-size blocks (one jitted function, a scan over micro-chunks
inside so the gathered rows stay in cache), so memory does not grow with N; block partial sums are
accumulated on the host in float64.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sae_jax import sharding
from sae_jax.errors import SaeJaxError

REDUCTIONS = ("diag", "row", "col", "sym", "max")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------ validation


def _as_code(code: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(values float32 [N, k], indices int32 [N, k]) from a SparseCode-like pair."""
  try:
    values, indices = code
  except (TypeError, ValueError):
    raise SaeJaxError(f"{name}: expected a sparse code (values [N, k], indices [N, k])") from None
  values = np.asarray(values, np.float32)
  indices = np.asarray(indices)
  if values.ndim != 2 or values.shape != indices.shape:
    raise SaeJaxError(f"{name}: values {values.shape} and indices {indices.shape} must both be [N, k]")
  if not np.issubdtype(indices.dtype, np.integer):
    raise SaeJaxError(f"{name}: indices must be integers, got {indices.dtype}")
  return values, indices.astype(np.int32, copy=False)


def check_pair_codes(image: Any, text: Any, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Validates matched image/text codes against a dictionary of `c` concepts; one-line errors."""
  iv, ii = _as_code(image, "image codes")
  tv, ti = _as_code(text, "text codes")
  if iv.shape[0] != tv.shape[0]:
    raise SaeJaxError(
      f"image codes have {iv.shape[0]} rows but text codes have {tv.shape[0]}: "
      "image and text must be matched pairs (same count, row n = pair n)"
    )
  if iv.shape[0] == 0:
    raise SaeJaxError("no image/text pairs: the codes are empty (expected N >= 1 matched pairs)")
  for name, v, i in (("image codes", iv, ii), ("text codes", tv, ti)):
    if i.size and (i.min() < 0 or i.max() >= c):
      raise SaeJaxError(
        f"{name}: concept indices span [{i.min()}, {i.max()}] but the dictionary has c={c} concepts"
      )
    if not np.all(np.isfinite(v)):
      raise SaeJaxError(f"{name}: values contain NaN or Inf")
  return iv, ii, tv, ti


def check_dictionary(D: Any) -> np.ndarray:
  D = np.asarray(D, np.float32)
  if D.ndim != 2 or D.shape[0] == 0 or D.shape[1] == 0:
    raise SaeJaxError(f"dictionary D: expected a non-empty [c, d] array, got shape {D.shape}")
  return D


# ------------------------------------------------------------------------ streaming sums


class ConceptSums(NamedTuple):
  """Sums over pairs (float64, host); divide by `n_pairs` for means."""

  n_pairs: int
  image_sum: np.ndarray  # [c] sum_n z_iota,n,i
  text_sum: np.ndarray  # [c] sum_n z_tau,n,i
  image_fires: np.ndarray  # [c] number of image rows where concept i is active (> 0)
  text_fires: np.ndarray  # [c]
  attr_image: np.ndarray  # [c] sum_n z_iota,n,i <d_i, x_hat_tau,n>   (= N * row sums of B)
  attr_text: np.ndarray  # [c] sum_n z_tau,n,i <d_i, x_hat_iota,n>   (= N * col sums of B)
  bridge_diag: np.ndarray  # [c] sum_n z_iota,n,i z_tau,n,i            (= N * B_ii / <d_i,d_i>)
  pair_dot: float  # sum_n <x_hat_iota,n, x_hat_tau,n>        (= N * sum_i A_i / 2)


def _micro_dots(D, iv, ii, tv, ti):
  """Per-entry terms of one micro-chunk [m, k]: <d_a, x_hat_other>, the diagonal co-activation, and
  <x_hat_iota, x_hat_tau> summed over the chunk. The 2k gathered rows stay in cache."""
  # Indices are validated on the host (check_pair_codes), so the gather skips bounds handling.
  Ri = D.at[ii].get(mode="promise_in_bounds")  # [m, ki, d]
  Rt = D.at[ti].get(mode="promise_in_bounds")  # [m, kt, d]
  f32, dt = jnp.float32, D.dtype
  mm = lambda a, b: jnp.matmul(a, b, preferred_element_type=f32)
  xi = mm(iv[:, None, :].astype(dt), Ri)[:, 0]  # x_hat_iota [m, d], no b_dec
  xt = mm(tv[:, None, :].astype(dt), Rt)[:, 0]
  dots_i = mm(Ri, xt[:, :, None].astype(dt))[..., 0]  # <d_a, x_hat_tau> [m, ki]
  dots_t = mm(Rt, xi[:, :, None].astype(dt))[..., 0]
  same = (ii[:, :, None] == ti[:, None, :]).astype(f32)  # [m, ki, kt]
  diag = jnp.einsum("nab,nb->na", same, tv)  # z_tau at the image's concepts
  return dots_i, dots_t, diag, jnp.sum(xi * xt)


@jax.jit(static_argnames=("micro",))
def _block_sums(D: jax.Array, iv: jax.Array, ii: jax.Array, tv: jax.Array, ti: jax.Array, micro: int):
  """Sums of one block of B pairs (B a multiple of `micro`): a scan over micro-chunks for the
  O(k d) gathers and dots, then one scatter-add per modality (columns: value, fires, attribution
  half, diagonal co-activation)."""
  chex.assert_rank([D, iv, ii, tv, ti], 2)
  chex.assert_equal_shape([iv, ii])
  chex.assert_equal_shape([tv, ti])
  chex.assert_equal_shape_prefix([iv, tv], 1)
  b = iv.shape[0]
  chex.assert_is_divisible(b, micro)
  split = lambda x: x.reshape((b // micro, micro) + x.shape[1:])
  c = D.shape[0]
  f32 = jnp.float32

  def body(acc, xs):
    dots_i, dots_t, diag, pair = _micro_dots(D, *xs)
    return acc + pair, (dots_i, dots_t, diag)

  pair, (dots_i, dots_t, diag) = jax.lax.scan(
    body, jnp.zeros((), f32), tuple(split(x) for x in (iv, ii, tv, ti))
  )
  dots_i, dots_t, diag = (x.reshape(b, -1) for x in (dots_i, dots_t, diag))
  upd_i = jnp.stack([iv, (iv > 0).astype(f32), iv * dots_i, iv * diag], -1).reshape(-1, 4)
  upd_t = jnp.stack([tv, (tv > 0).astype(f32), tv * dots_t], -1).reshape(-1, 3)
  sums_i = jnp.zeros((c, 4), f32).at[ii.reshape(-1)].add(upd_i)
  sums_t = jnp.zeros((c, 3), f32).at[ti.reshape(-1)].add(upd_t)
  return (
    sums_i[:, 0],
    sums_t[:, 0],
    sums_i[:, 1],
    sums_t[:, 1],
    sums_i[:, 2],
    sums_t[:, 2],
    sums_i[:, 3],
    pair,
  )


@jax.jit
def _two_sum_add(hi, lo, x):
  """hi + x per element in float32, its rounding error (Knuth's TwoSum) added to lo: many block
  sums accumulate on the device about as accurately as a float64 host sum."""

  def add(h, e, v):
    s = h + v
    bv = s - h
    return s, e + ((h - (s - bv)) + (v - bv))

  pairs = jax.tree.map(add, hi, lo, x)
  return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


class ConceptAccumulator:
  """Streams matched code pairs through `update` in any number of chunks; `sums()` at the end.

  Memory is O(workers * block_size * k) for the blocks in flight (plus micro_size * 2k * d for the
  gathered rows) and O(c) for the sums: independent of the number of pairs.
  `compute_dtype="bfloat16"` gathers a bf16 copy of D (float32 accumulation; no faster under
  XLA:CPU here, meant for accelerators); float32 is exact to rounding.
  """

  def __init__(
    self,
    dictionary: Any,
    *,
    block_size: int = 4096,
    micro_size: int = 4,
    compute_dtype: str = "float32",
    workers: int = 2,
  ):
    D = check_dictionary(dictionary)
    if compute_dtype not in _DTYPES:
      raise SaeJaxError(f"compute_dtype={compute_dtype!r}: expected one of {tuple(_DTYPES)}")
    if micro_size <= 0 or block_size <= 0 or workers <= 0:
      raise SaeJaxError(
        f"block_size={block_size}, micro_size={micro_size}, workers={workers}: must be positive"
      )
    self.c, self.d = D.shape
    self._D = jnp.asarray(D, _DTYPES[compute_dtype])
    self.micro = int(micro_size)
    self.block = int(math.ceil(block_size / micro_size) * micro_size)
    self.workers = int(workers)
    self._hi = self._lo = None  # float32 sums and their rounding errors, on the device
    self.n_pairs = 0

  def _run(self, iv, ii, tv, ti):
    n = iv.shape[0]
    size = self.block if n >= self.block else int(math.ceil(n / self.micro) * self.micro)
    if n < size:  # zero values at index 0 contribute nothing (fires count values > 0 only)
      pad = lambda x: np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
      iv, ii, tv, ti = map(pad, (iv, ii, tv, ti))
    return _block_sums(self._D, iv, ii, tv, ti, micro=self.micro)

  def _add(self, out) -> None:
    # On the device, no host round-trip per block; fetched once by `sums()`.
    if self._hi is None:
      self._hi = self._lo = jax.tree.map(jnp.zeros_like, out)
    self._hi, self._lo = _two_sum_add(self._hi, self._lo, out)

  def update(self, image: Any, text: Any) -> None:
    """Adds matched pairs. Blocks run `workers` at a time (the micro-chunk scan inside one block
    is sequential, so a second block in flight uses the second core); sums are added in block
    order, so the result does not depend on scheduling."""
    iv, ii, tv, ti = check_pair_codes(image, text, self.c)
    starts = list(range(0, iv.shape[0], self.block))
    job = lambda s: self._run(
      iv[s : s + self.block], ii[s : s + self.block], tv[s : s + self.block], ti[s : s + self.block]
    )
    if self.workers == 1 or len(starts) == 1:
      for s in starts:
        self._add(job(s))
    else:
      with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
        pending = collections.deque()
        for s in starts:
          pending.append(pool.submit(job, s))
          if len(pending) > self.workers:
            self._add(pending.popleft().result())
        while pending:
          self._add(pending.popleft().result())
    self.n_pairs += iv.shape[0]

  def sums(self) -> ConceptSums:
    if self.n_pairs == 0:
      raise SaeJaxError("no image/text pairs were given to the concept metrics (empty input)")
    hi, lo = jax.device_get((self._hi, self._lo))
    a = [np.asarray(h, np.float64) + np.asarray(e, np.float64) for h, e in zip(hi, lo)]
    return ConceptSums(
      self.n_pairs,
      a[0],
      a[1],
      a[2].round().astype(np.int64),
      a[3].round().astype(np.int64),
      a[4],
      a[5],
      a[6],
      float(a[7]),
    )


def concept_sums(dictionary: Any, image: Any, text: Any, **kwargs) -> ConceptSums:
  """One-shot `ConceptAccumulator` over in-memory (or memory-mapped) codes."""
  acc = ConceptAccumulator(dictionary, **kwargs)
  acc.update(image, text)
  return acc.sums()


# ------------------------------------------------------------------------ per-concept scores


def modality_score(
  energy_image: np.ndarray, energy_text: np.ndarray, reverse: bool = False
) -> tuple[np.ndarray, int]:
  """Eq. 4: E_tau / (E_iota + E_tau) (1 = text-only), or the reverse; NaN (and counted) where
  the concept never fires on either side."""
  ei = np.asarray(energy_image, np.float64)
  et = np.asarray(energy_text, np.float64)
  chex.assert_equal_shape([ei, et])
  denom = ei + et
  silent = denom <= 0
  with np.errstate(invalid="ignore", divide="ignore"):
    score = np.where(silent, np.nan, (ei if reverse else et) / np.where(silent, 1.0, denom))
  return score, int(silent.sum())


@dataclasses.dataclass(frozen=True)
class ConceptMetrics:
  """Per-concept scores [c] (float64) of one set of matched pairs."""

  n_pairs: int
  energy: np.ndarray
  energy_image: np.ndarray
  energy_text: np.ndarray
  fire_rate_image: np.ndarray
  fire_rate_text: np.ndarray
  modality_score: np.ndarray
  n_silent: int  # concepts with NaN modality score (never fire)
  modality_reverse: bool  # False: 1 = text-only (paper); True: 1 = image-only
  attribution: np.ndarray
  bridge_diag: np.ndarray
  bridge_row: np.ndarray
  bridge_col: np.ndarray
  mean_pair_dot: float  # mean_pairs <x_hat_iota, x_hat_tau> (no decoder bias)

  @property
  def bridge_sym(self) -> np.ndarray:
    return self.bridge_row + self.bridge_col

  def bridge_score(self, reduction: str = "diag", bridge_max: Optional[np.ndarray] = None) -> np.ndarray:
    """One bridge score per concept; `max` needs `bridge_blockwise(...).max_score`."""
    if reduction not in REDUCTIONS:
      raise SaeJaxError(f"bridge reduction {reduction!r}: expected one of {REDUCTIONS}")
    if reduction == "max":
      if bridge_max is None:
        raise SaeJaxError("bridge reduction 'max' needs B itself: pass bridge_blockwise(...).max_score")
      return np.asarray(bridge_max, np.float64)
    return {"diag": self.bridge_diag, "row": self.bridge_row, "col": self.bridge_col, "sym": self.bridge_sym}[
      reduction
    ]


def concept_metrics(sums: ConceptSums, *, reverse_modality: bool = False) -> ConceptMetrics:
  """Means and scores from streamed sums. D rows are unit norm, so B_ii = mean z_iota,i z_tau,i."""
  n = float(sums.n_pairs)
  ei, et = sums.image_sum / n, sums.text_sum / n
  ms, n_silent = modality_score(ei, et, reverse_modality)
  row, col = sums.attr_image / n, sums.attr_text / n
  return ConceptMetrics(
    n_pairs=sums.n_pairs,
    energy=(ei + et) / 2.0,
    energy_image=ei,
    energy_text=et,
    fire_rate_image=sums.image_fires / n,
    fire_rate_text=sums.text_fires / n,
    modality_score=ms,
    n_silent=n_silent,
    modality_reverse=bool(reverse_modality),
    attribution=row + col,
    bridge_diag=sums.bridge_diag / n,
    bridge_row=row,
    bridge_col=col,
    mean_pair_dot=sums.pair_dot / n,
  )


def compute_concept_metrics(
  dictionary: Any, image: Any, text: Any, *, reverse_modality: bool = False, **kwargs
) -> ConceptMetrics:
  """All per-concept metrics of matched codes in one streaming pass."""
  return concept_metrics(concept_sums(dictionary, image, text, **kwargs), reverse_modality=reverse_modality)


# ------------------------------------------------------------------ blockwise bridge matrix


class BridgeResult(NamedTuple):
  pairs_i: np.ndarray  # [K] image-side concept i of the top pairs, best first
  pairs_j: np.ndarray  # [K] text-side concept j
  pairs_value: np.ndarray  # [K] B_ij
  pairs_cooc: np.ndarray  # [K] mean_pairs(z_iota,i z_tau,j)
  row_max: np.ndarray  # [c] max_j B_ij
  col_max: np.ndarray  # [c] max_i B_ij (as a function of j)

  @property
  def max_score(self) -> np.ndarray:
    """The `max` reduction: strongest single bridge a concept takes part in, either side."""
    return np.maximum(self.row_max, self.col_max)


def _tile_entries(iv, ii, slot_of, c_pad, tile, block):
  """Image-code entries (pair n, row in tile, value) bucketed by tile: [n_tiles, L] each.

  `slot_of[i]` is concept i's row in the tiled (permuted, padded) dictionary."""
  n, k = iv.shape
  rows = np.repeat(np.arange(n, dtype=np.int32), k)
  slot = slot_of[ii.reshape(-1)]
  vals = iv.reshape(-1)
  keep = vals != 0
  rows, slot, vals = rows[keep], slot[keep], vals[keep]
  order = np.argsort(slot, kind="stable")
  rows, slot, vals = rows[order], slot[order], vals[order]
  n_tiles = c_pad // tile
  bounds = np.searchsorted(slot, np.arange(n_tiles + 1) * tile)
  counts = np.diff(bounds)
  length = max(block, int(math.ceil(max(int(counts.max()), 1) / block) * block))
  e_row = np.zeros((n_tiles, length), np.int32)
  e_loc = np.zeros((n_tiles, length), np.int32)
  e_val = np.zeros((n_tiles, length), np.float32)
  for t in range(n_tiles):
    s, e = bounds[t], bounds[t + 1]
    e_row[t, : e - s] = rows[s:e]
    e_loc[t, : e - s] = slot[s:e] - t * tile
    e_val[t, : e - s] = vals[s:e]
  return e_row, e_loc, e_val


def _balanced_slots(iv, ii, c, n_tiles, tile):
  """Concepts dealt to tiles round-robin by decreasing firing count, so a few very frequent
  concepts (real codes are long-tailed) do not make one tile's entry list, which sets the padded
  length of all of them, much longer than the rest. Returns (slot_of [c], concept_of_slot [c_pad],
  c for padding)."""
  counts = np.bincount(ii.reshape(-1)[iv.reshape(-1) != 0], minlength=c)
  order = np.argsort(-counts, kind="stable")
  r = np.arange(c)
  slots = (r % n_tiles) * tile + r // n_tiles
  slot_of = np.empty(c, np.int64)
  slot_of[order] = slots
  concept_of_slot = np.full(n_tiles * tile, c, np.int64)
  concept_of_slot[slots] = order
  return slot_of, concept_of_slot


def _merge_top(carry, cand, k):
  """Running top-k of (value, i, j, cooc) tuples: the best k of the carried and the new ones."""
  allv = jnp.concatenate([carry[0], cand[0]])
  best, pos = jax.lax.top_k(allv, k)
  return (best,) + tuple(jnp.concatenate([a, b])[pos] for a, b in zip(carry[1:], cand[1:]))


def _bridge_local(
  D_tiles, row_ids, e_row, e_loc, e_val, D_all, tv, ti, *, c, n_pairs, top_k, entry_block, dtype
):
  """Tiles given to one device: [T, tile, d] rows of D, their concept ids [T, tile] (c = padding)
  and image entries; returns the running top-K, column maxima and the rows' maxima."""
  tile = D_tiles.shape[1]
  K = top_k
  D_all_c = D_all.astype(dtype)

  def one_tile(carry, xs):
    top, col_max = carry
    Dt, grow, rows, loc, val = xs
    nb = rows.shape[0] // entry_block
    split = lambda x: x.reshape(nb, entry_block)

    def scatter(C, blk):
      r, loc, v = blk
      upd = v[:, None] * tv[r]  # [e, kt]
      flat = (loc[:, None] * c + ti[r]).reshape(-1)
      return C.at[flat].add(upd.reshape(-1)), None

    C, _ = jax.lax.scan(scatter, jnp.zeros((tile * c,), jnp.float32), (split(rows), split(loc), split(val)))
    C = C.reshape(tile, c) / n_pairs  # mean_pairs z_iota,i z_tau,j
    G = jnp.matmul(Dt.astype(dtype), D_all_c.T, preferred_element_type=jnp.float32)
    B = C * G
    valid_row = grow < c
    neg = jnp.float32(-jnp.inf)
    Bv = jnp.where(valid_row[:, None], B, neg)
    row_max = jnp.max(Bv, axis=1)
    col_max = jnp.maximum(col_max, jnp.max(Bv, axis=0))
    # Top pairs among co-occurring pairs only: two-stage top-k (per row, then over the tile).
    cand = jnp.where((C != 0) & valid_row[:, None], B, neg)
    kk = min(K, c)
    rv, rj = jax.lax.top_k(cand, kk)  # [tile, kk]
    rc = jnp.take_along_axis(C, rj, axis=1)
    tv2, pos = jax.lax.top_k(rv.reshape(-1), min(K, tile * kk))
    new = (tv2, grow[pos // kk].astype(jnp.int32), rj.reshape(-1)[pos].astype(jnp.int32), rc.reshape(-1)[pos])
    return (_merge_top(top, new, K), col_max), row_max

  top0 = (
    jnp.full((K,), -jnp.inf, jnp.float32),
    jnp.zeros((K,), jnp.int32),
    jnp.zeros((K,), jnp.int32),
    jnp.zeros((K,), jnp.float32),
  )
  ((top_v, top_i, top_j, top_c), col_max), row_max = jax.lax.scan(
    one_tile, (top0, jnp.full((c,), -jnp.inf, jnp.float32)), (D_tiles, row_ids, e_row, e_loc, e_val)
  )
  return top_v[None], top_i[None], top_j[None], top_c[None], col_max[None], row_max


def bridge_blockwise(
  dictionary: Any,
  image: Any,
  text: Any,
  *,
  top_k: int = 100,
  tile: int = 1024,
  mesh: Optional[Mesh] = None,
  entry_block: int = 2048,
  compute_dtype: str = "float32",
) -> BridgeResult:
  """The bridge matrix B, one tile of `tile` concept rows at a time, never all of it.

  Per tile: the co-occurrence rows C[I, :] = mean_pairs z_iota,I z_tau^T from the image entries
  whose concept falls in the tile (bucketed once on the host, O(N k)), scattered with their pair's
  text code (O(N k^2) over all tiles), times the Gram rows D[I] D^T (the only O(c^2 d) part);
  then the row/column maxima and a running top-K of pairs (i, j) with C_ij != 0. Concepts are
  dealt to tiles by decreasing firing count (`_balanced_slots`) so tiles carry similar numbers of
  entries on long-tailed codes. With a `mesh`,
  tiles are split over its "model" axis (shard_map); the per-device top-K candidates are merged by
  a second top-K, which gives the same pairs as one device.
  """
  D = check_dictionary(dictionary)
  c, d = D.shape
  iv, ii, tv, ti = check_pair_codes(image, text, c)
  if compute_dtype not in _DTYPES:
    raise SaeJaxError(f"compute_dtype={compute_dtype!r}: expected one of {tuple(_DTYPES)}")
  if top_k <= 0 or tile <= 0 or entry_block <= 0:
    raise SaeJaxError(f"top_k={top_k}, tile={tile}, entry_block={entry_block}: must be positive")
  n_pairs = iv.shape[0]
  tile = min(tile, c)
  m = 1 if mesh is None else int(mesh.shape[sharding.MODEL])
  n_tiles = int(math.ceil(math.ceil(c / tile) / m) * m)
  c_pad = n_tiles * tile
  slot_of, concept_of_slot = _balanced_slots(iv, ii, c, n_tiles, tile)
  D_pad = np.zeros((c_pad, d), np.float32)
  D_pad[slot_of] = D
  e_row, e_loc, e_val = _tile_entries(iv, ii, slot_of, c_pad, tile, entry_block)
  K = int(top_k)
  args = (
    D_pad.reshape(n_tiles, tile, d),
    concept_of_slot.reshape(n_tiles, tile).astype(np.int32),
    e_row,
    e_loc,
    e_val,
    D,
    tv,
    ti,
  )
  kw = dict(c=c, n_pairs=float(n_pairs), top_k=K, entry_block=entry_block, dtype=_DTYPES[compute_dtype])
  local = lambda *a: _bridge_local(*a, **kw)
  if mesh is None:
    out = jax.jit(local)(*args)
  else:
    tiled = P(sharding.MODEL)
    fn = jax.shard_map(
      local, mesh=mesh, in_specs=(tiled,) * 5 + (P(),) * 3, out_specs=(tiled,) * 6, check_vma=False
    )
    out = jax.jit(fn)(*args)
  top_v, top_i, top_j, top_c, col_max, row_max = (np.asarray(x) for x in jax.device_get(out))
  # Second stage of the two-stage top-k: merge the per-device candidates.
  v, i, j, co = top_v.reshape(-1), top_i.reshape(-1), top_j.reshape(-1), top_c.reshape(-1)
  order = np.lexsort((j, i, -v))[:K]
  v, i, j, co = v[order], i[order], j[order], co[order]
  keep = np.isfinite(v)
  v, i, j, cooc = (
    v[keep].astype(np.float64),
    i[keep].astype(np.int64),
    j[keep].astype(np.int64),
    co[keep].astype(np.float64),
  )
  row_max_c = np.empty(c, np.float64)
  row_max_c[concept_of_slot[concept_of_slot < c]] = row_max.reshape(-1)[concept_of_slot < c]
  return BridgeResult(i, j, v, cooc, row_max_c, col_max.max(axis=0).astype(np.float64))


# -------------------------------------------------------------------------- top sets, Table 1


def top_fraction_size(fraction: float, c: int, name: str = "top fraction") -> int:
  """Size of a top-fraction concept set: ceil(fraction * c), at least 1.

  The one rule for every top set (Table 1, the removal atoms, the figures). The paper says "top 1%"
  without a rounding rule; ceil keeps at least one concept for any c, and the 1e-9 slack keeps
  float error (0.07 * 100 = 7.000000000000001) from adding a concept. `name` is the config field
  named in the error.
  """
  if not 0.0 < fraction <= 1.0:
    raise SaeJaxError(f"{name}={fraction}: expected 0 < fraction <= 1")
  return max(1, int(math.ceil(fraction * int(c) - 1e-9)))


def top_fraction_set(scores: Any, fraction: float) -> np.ndarray:
  """Indices of the ceil(fraction * c) highest scores (NaN last, ties by lower index), sorted."""
  s = np.asarray(scores, np.float64)
  chex.assert_rank(s, 1)
  size = top_fraction_size(fraction, s.shape[0])
  key = np.where(np.isnan(s), -np.inf, s)
  order = np.lexsort((np.arange(s.shape[0]), -key))
  return np.sort(order[:size])


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
  """Eq. 7: |A ∩ B| / |A ∪ B| (0 for two empty sets)."""
  a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
  union = a | b
  return len(a & b) / len(union) if union else 0.0


def triple_overlap(a: Sequence[int], b: Sequence[int], c: Sequence[int]) -> float:
  """|A ∩ B ∩ C| / |A ∪ B ∪ C|."""
  a, b, c = (set(np.asarray(x).tolist()) for x in (a, b, c))
  union = a | b | c
  return len(a & b & c) / len(union) if union else 0.0


def table1(energy: Any, attribution: Any, bridge: Any, fraction: float = 0.01) -> dict:
  """The paper's Table 1 row: Jaccard of the top-`fraction` sets S_E, S_A, S_B and the triple overlap."""
  e, a, b = (np.asarray(x, np.float64) for x in (energy, attribution, bridge))
  chex.assert_equal_shape([e, a, b])
  se, sa, sb = (top_fraction_set(x, fraction) for x in (e, a, b))
  return {
    "J(S_E,S_A)": jaccard(se, sa),
    "J(S_E,S_B)": jaccard(se, sb),
    "J(S_A,S_B)": jaccard(sa, sb),
    "triple_overlap": triple_overlap(se, sa, sb),
    "fraction": float(fraction),
    "set_size": int(se.shape[0]),
    "c": int(e.shape[0]),
  }
