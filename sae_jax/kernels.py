"""Sparse kernels of the Top-K SAE step, with custom VJPs.

A Top-K step touches only B*k of the B*c codes. Plain autodiff of `lax.top_k` scatters the
cotangent into a dense [B, c] array and then pays a dense B*c*d GEMM for dW_enc; a gather decoder
written as one einsum materialises the B x k x d gathered rows. The kernels here visit the k active
columns one at a time, so each temporary is [B, d]. Measured choices (block sizes, which decoder)
are in benchmarks/README.md.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

TopKFn = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]


def matmul(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """a @ b with operands in `dtype` and a float32 result (bf16 only pays off with f32 output)."""
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def local_top_k(acts: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k over the last axis, for arrays that are not sharded (one device). `topk_encode`
  recognises it and then fuses the encoder GEMM, ReLU and top-k per block of rows."""
  return jax.lax.top_k(acts, k)


# Rows per encoder block on CPU: the block's [rows, c] activations stay in cache for top_k.
_ENCODER_BLOCK_ROWS = 512
_MIN_BLOCK_ROWS = 64


def gather_weighted_sum(weights: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
  """out[b] = sum_j weights[b, j] * table[indices[b, j]]:  [B, k], [B, k], [n, d] -> [B, d]."""
  w_t, i_t = weights.T, indices.T  # one contiguous column per iteration

  def body(j, acc):
    return acc + w_t[j][:, None] * jnp.take(table, i_t[j], axis=0)

  init = jnp.zeros((weights.shape[0], table.shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, weights.shape[1], body, init)


_GATHER_BLOCK_BYTES = 1 << 26  # accelerators: the largest gathered block
_LLC_FALLBACK_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def cpu_block_bytes() -> int:
  """Bytes of a gathered / scattered block on CPU: 1/8 of the last-level cache (sysfs), so the
  block stays cached between the op that writes it and the one that reads it, beside the rows it
  is gathered from or added to. Measured optimum 2.5-10 MB on a 32 MB L3 (benchmarks/README.md)."""
  size = 0
  root = "/sys/devices/system/cpu/cpu0/cache"
  try:
    for entry in sorted(os.listdir(root)):
      if not entry.startswith("index"):
        continue
      with open(os.path.join(root, entry, "type")) as f:
        if f.read().strip() == "Instruction":
          continue
      with open(os.path.join(root, entry, "size")) as f:
        text = f.read().strip().upper()
      unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
      size = max(size, int(text.rstrip("KMG")) * unit)
  except (OSError, ValueError):
    size = 0
  return (size or _LLC_FALLBACK_BYTES) // 8


def row_chunk(n_rows: int, row_bytes: int, block_bytes: int, most: Optional[int] = None) -> int:
  """The largest power of two dividing n_rows with chunk * row_bytes <= block_bytes (>= 1), at most `most`."""
  chunk = 1
  while (
    n_rows % (chunk * 2) == 0
    and (chunk * 2) * row_bytes <= block_bytes
    and (most is None or chunk * 2 <= most)
  ):
    chunk *= 2
  return chunk


def gather_dot(rows: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
  """out[b, j] = <rows[b], table[indices[b, j]]>:  [B, d], [B, k], [n, d] -> [B, k].

  Row chunks keep the gathered block at [chunk, k, d] (a per-column loop of row dots ran slower):
  on CPU sized to stay in cache (`cpu_block_bytes`; 16-32 rows at k=50, d=768 ran 1.4x faster
  than 128), elsewhere up to 128 rows and 64 MB.
  """
  (n_rows, d), k = rows.shape, indices.shape[1]
  if jax.default_backend() == "cpu":
    chunk = row_chunk(n_rows, 4 * k * d, cpu_block_bytes())
  else:
    chunk = row_chunk(n_rows, 4 * k * d, _GATHER_BLOCK_BYTES, most=128)
  blocks = (rows.reshape(-1, chunk, d), indices.reshape(-1, chunk, k))
  out = jax.lax.map(lambda a: jnp.einsum("bd,bkd->bk", a[0], jnp.take(table, a[1], axis=0)), blocks)
  return out.reshape(n_rows, k)


def scatter_weighted_rows(
  weights: jax.Array, indices: jax.Array, rows: jax.Array, n: int, init: Optional[jax.Array] = None
) -> jax.Array:
  """out[i] = init[i] + sum over (b, j) with indices[b, j] = i of weights[b, j] * rows[b]: [n, d].

  `init` (default zeros) lets a second scatter accumulate into the first one's buffer. On CPU one
  scatter per chunk of rows of all their k weighted copies (a cache-sized block, `cpu_block_bytes`):
  2.1x faster than one scatter of B rows per column j at B=4096, k=50, d=768, c=7168 (XLA:CPU runs
  a scatter on one thread; fewer, cache-resident update blocks cost less per row). Elsewhere one
  scatter per column (fewer, larger ops for the accelerator).
  """
  if init is None:
    init = jnp.zeros((n, rows.shape[1]), jnp.float32)
  (n_rows, d), k = rows.shape, indices.shape[1]
  if jax.default_backend() == "cpu":
    chunk = row_chunk(n_rows, 4 * k * d, cpu_block_bytes())

    def block(s, acc):
      w = jax.lax.dynamic_slice_in_dim(weights, s * chunk, chunk)
      i = jax.lax.dynamic_slice_in_dim(indices, s * chunk, chunk)
      r = jax.lax.dynamic_slice_in_dim(rows, s * chunk, chunk)
      return acc.at[i.reshape(-1)].add((w[:, :, None] * r[:, None, :]).reshape(-1, d))

    return jax.lax.fori_loop(0, n_rows // chunk, block, init)
  w_t, i_t = weights.T, indices.T

  def body(j, acc):
    return acc.at[i_t[j]].add(w_t[j][:, None] * rows)

  return jax.lax.fori_loop(0, k, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def topk_encode(
  x: jax.Array,
  shift: Optional[jax.Array],
  W_enc: jax.Array,
  b_enc: jax.Array,
  mask: Optional[jax.Array],
  k: int,
  dtype: Any,
  top_k: TopKFn = local_top_k,
) -> tuple[jax.Array, jax.Array]:
  """TopK_k(mask * ReLU((x - shift) W_enc + b_enc)) -> (values [N, k], indices [N, k] int32).

  The same function as `top_k(pre_activations(...))`, with a backward pass that only touches the
  k selected latents per row: dW_enc and db_enc are scatter-adds of B*k rows (no dense [B, c]
  cotangent, no B*c*d GEMM). `mask` [c] (or None) restricts the choice, e.g. to dead latents.
  """
  return _topk_encode_fwd(x, shift, W_enc, b_enc, mask, k, dtype, top_k)[0]


def encoder_block_rows(n_rows: int) -> int:
  """The largest power of two <= _ENCODER_BLOCK_ROWS dividing n_rows (n_rows if it is < 64)."""
  block = 1
  while block * 2 <= _ENCODER_BLOCK_ROWS and n_rows % (block * 2) == 0:
    block *= 2
  return block if block >= _MIN_BLOCK_ROWS else n_rows


def _topk_encode_fwd(x, shift, W_enc, b_enc, mask, k, dtype, top_k):
  xc = x if shift is None else x - shift
  W = W_enc.astype(dtype)  # cast once, outside the row blocks

  def block(xb):
    acts = jax.nn.relu(jnp.matmul(xb.astype(dtype), W, preferred_element_type=jnp.float32) + b_enc)
    if mask is not None:
      acts = jnp.where(mask, acts, 0.0)
    return top_k(acts, k)

  n_rows = xc.shape[0]
  rows = encoder_block_rows(n_rows)
  if top_k is local_top_k and rows < n_rows and jax.default_backend() == "cpu":
    # Unsharded, on CPU: loop over row blocks. (A sharded top_k needs the whole [B, c] array;
    # accelerators want the one large GEMM.)
    values, indices = jax.lax.map(block, xc.reshape(n_rows // rows, rows, xc.shape[1]))
    values, indices = values.reshape(n_rows, k), indices.reshape(n_rows, k)
  else:
    values, indices = block(xc)
  indices = indices.astype(jnp.int32)
  return (values, indices), (xc, shift, W_enc, values, indices, mask)


def _topk_encode_bwd(k, dtype, top_k, residuals, cotangents):
  xc, shift, W_enc, values, indices, mask = residuals
  dvalues, _ = cotangents
  # ReLU'(pre) at the selected entries (0 where the value is 0: non-positive or masked out).
  g = jnp.where(values > 0, dvalues, 0.0)
  c = W_enc.shape[1]
  dW_enc = scatter_weighted_rows(g, indices, xc, c).T
  db_enc = jnp.zeros((c,), jnp.float32).at[indices.reshape(-1)].add(g.reshape(-1))
  # d/dx; XLA drops it when the input needs no gradient (training differentiates params only).
  dx = gather_weighted_sum(g, indices, W_enc.T)
  # d/dshift = -sum_b dx[b] = -W_enc db_enc, without the [B, d] gather.
  dshift = None if shift is None else -(W_enc @ db_enc)
  dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
  return dx, dshift, dW_enc, db_enc, dmask


topk_encode.defvjp(_topk_encode_fwd, _topk_encode_bwd)


@jax.custom_vjp
def sparse_decode(values: jax.Array, indices: jax.Array, D: jax.Array) -> jax.Array:
  """sum_j values[:, j] * D[indices[:, j]] ([N, d], no bias); backward costs N*k*d, not N*c*d."""
  return gather_weighted_sum(values, indices, D)


def _sparse_decode_fwd(values, indices, D):
  return gather_weighted_sum(values, indices, D), (values, indices, D)


def _sparse_decode_bwd(residuals, g):
  values, indices, D = residuals
  dindices = jnp.zeros(indices.shape, jax.dtypes.float0)
  return gather_dot(g, indices, D), dindices, scatter_weighted_rows(values, indices, g, D.shape[0])


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def transpose(a: jax.Array) -> jax.Array:
  """a.T; on CPU materialised behind a barrier: XLA:CPU runs only plain row-major (NN) dots on its
  fast GEMM kernel and would otherwise fold the transpose into a slow transposed dot. Other
  backends get the plain transpose (their GEMMs take transposed operands at full speed)."""
  if jax.default_backend() != "cpu":
    return a.T
  return jax.lax.optimization_barrier(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def nn_matmul(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
  """`matmul(a, b, dtype)` whose backward runs NN dots on `dtype` operands (bf16 cotangents
  with bf16 compute; JAX's own VJP would upcast them to float32 and use transposed dots)."""
  return matmul(a, b, dtype)


def _nn_matmul_fwd(a, b, dtype):
  return matmul(a, b, dtype), (a.astype(dtype), b.astype(dtype))


def _nn_matmul_bwd(dtype, residuals, g):
  a, b = residuals
  g = g.astype(dtype)
  da = jnp.matmul(g, transpose(b), preferred_element_type=jnp.float32)  # [M, K]
  db = jnp.matmul(transpose(g), a, preferred_element_type=jnp.float32).T  # ([N, M] @ [M, K]).T
  return da, db


nn_matmul.defvjp(_nn_matmul_fwd, _nn_matmul_bwd)
