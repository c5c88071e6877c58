"""Sparse codes of any number of rows from a trained SAE, shared by the analysis and retrieval stages.

`sae.encode` is jitted once for a fixed [block, d] input and applied block by block, the last block
zero-padded, so N rows cost one compilation whatever N is and memory stays at one block.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import sae as sae_lib
from sae_jax.errors import SaeJaxError


class BlockEncoder:
  """`sae.encode(params, x, spec.k, spec)` over rows of x [N, d] in blocks of `block` rows."""

  def __init__(self, params: dict[str, Any], spec: sae_lib.SAESpec, block: int):
    if int(block) < 1:
      raise SaeJaxError(f"block encoder: block size {block}: expected >= 1")
    self.params = {name: jnp.asarray(v) for name, v in params.items()}
    self.spec = spec
    self.block = int(block)
    self._fn = jax.jit(lambda p, x: tuple(sae_lib.encode(p, x, spec.k, spec)))

  def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values float32 [N, k], indices int32 [N, k]) of the rows of x [N, d]."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
      raise SaeJaxError(f"block encoder: expected rows [N, d], got shape {x.shape}")
    n, d = x.shape
    values, indices = [], []
    for s in range(0, n, self.block):
      chunk = x[s : s + self.block]
      m = chunk.shape[0]
      if m < self.block:  # pad to the compiled shape; padded rows are dropped below
        chunk = np.concatenate([chunk, np.zeros((self.block - m, d), np.float32)])
      v, i = self._fn(self.params, chunk)
      values.append(np.asarray(v)[:m])
      indices.append(np.asarray(i)[:m])
    if not values:
      k = self.spec.k
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    out_v, out_i = np.concatenate(values), np.concatenate(indices)
    chex.assert_shape([out_v, out_i], (n, self.spec.k))
    return out_v, out_i


def encode_rows(params: dict[str, Any], spec: sae_lib.SAESpec, x: np.ndarray, block: int) -> tuple:
  """Sparse codes of x [N, d] with a block of min(block, N) rows (one compilation, no wasted padding
  when N is small)."""
  n = np.shape(x)[0]
  return BlockEncoder(params, spec, max(1, min(int(block), n)))(x)
