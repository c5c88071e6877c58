"""Sparse codes of the analysed pairs, streamed block by block into the concept sums
(`stream_codes`), with the token-code pooling of `analysis.codes="pool_token_codes"`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from sae_jax import metrics
from sae_jax import workdir as workdir_lib
from sae_jax.block_encoder import BlockEncoder
from sae_jax.errors import SaeJaxError
from sae_jax.progress import Progress
from sae_jax.stages.block_progress import BlockProgress

CODES_MODES = ("encode_pooled", "pool_token_codes")


def pool_token_codes(
  values: np.ndarray,
  indices: np.ndarray,
  segment: np.ndarray,
  n_segments: int,
  c: int,
  width: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Mean of the sparse token codes of each segment (sample): values/indices [n_segments, width].

  The support of a pooled row is the union of its tokens' supports (at most tokens * k); entries are
  sorted by value, zero-padded to `width` (default: the widest row). Segments without tokens stay 0.
  """
  values = np.asarray(values, np.float32)
  indices = np.asarray(indices, np.int64)
  segment = np.asarray(segment, np.int64)
  k = values.shape[1]
  tokens = np.bincount(segment, minlength=n_segments).astype(np.float64)
  keys = np.repeat(segment, k) * c + indices.reshape(-1)
  uniq, inv = np.unique(keys, return_inverse=True)
  sums = np.bincount(inv, weights=values.reshape(-1).astype(np.float64), minlength=uniq.size)
  seg, conc = uniq // c, uniq % c
  vals = sums / np.maximum(tokens[seg], 1.0)
  keep = vals != 0
  seg, conc, vals = seg[keep], conc[keep], vals[keep]
  order = np.lexsort((conc, -vals, seg))
  seg, conc, vals = seg[order], conc[order], vals[order]
  counts = np.bincount(seg, minlength=n_segments)
  w = int(width) if width else max(1, int(counts.max(initial=0)))
  start = np.concatenate([[0], np.cumsum(counts)[:-1]])
  pos = np.arange(seg.size) - start[seg]
  sel = pos < w
  out_v = np.zeros((n_segments, w), np.float32)
  out_i = np.zeros((n_segments, w), np.int32)
  out_v[seg[sel], pos[sel]] = vals[sel]
  out_i[seg[sel], pos[sel]] = conc[sel]
  return out_v, out_i


def synthetic_tokens(x: np.ndarray, tokens: int, noise: float, rng: np.random.Generator) -> np.ndarray:
  """`tokens` rows per sample whose mean is exactly the sample's embedding: [n * tokens, d]."""
  eps = rng.standard_normal((x.shape[0], tokens, x.shape[1])).astype(np.float32) * noise
  eps -= eps.mean(axis=1, keepdims=True)
  return (x[:, None, :] + eps).reshape(-1, x.shape[1])


def stream_codes(
  pairs: Any,
  loaded: workdir_lib.LoadedSAE,
  acfg: Any,
  acc: metrics.ConceptAccumulator,
  keep_codes: bool = True,
  progress: Optional[BlockProgress] = None,
) -> tuple[Any, Any, dict]:
  """Sparse codes of both sides, streamed into `acc` block by block; returns the codes too
  (None, None when not `keep_codes`: then nothing of size N beyond the embeddings is held).

  With `progress`, each block's codes are saved as it finishes (and read back, not recomputed, on a
  resumed run); the sums see the same blocks in the same order either way."""
  saved = progress.arrays if progress is not None else (lambda name, compute, where: compute())

  def block_codes(b: int, compute: Callable[[], tuple]) -> tuple[tuple, tuple]:
    def arrays() -> dict:
      (iv, ii), (tv, ti) = compute()
      return {"image_values": iv, "image_indices": ii, "text_values": tv, "text_indices": ti}

    if b == 0:
      bar["progress"] = Progress(n_blocks, "analysis codes", float(acfg.log_every_s), unit="blocks")
    z = saved(f"codes-{b:06d}", arrays, f"block {b + 1} of {n_blocks}")
    bar["progress"].update(1)
    return (z["image_values"], z["image_indices"]), (z["text_values"], z["text_indices"])

  bar: dict = {}  # the progress line, made at the first block (when n_blocks is known)
  spec = loaded.spec
  mode = str(acfg.codes)
  if mode not in CODES_MODES:
    raise SaeJaxError(f"config.analysis.codes={mode!r}: expected one of {CODES_MODES}")
  block = int(acfg.block_size)
  c = loaded.params["D"].shape[0]
  n = pairs.image.shape[0]
  info: dict = {"codes": mode}
  out: dict = {"image": [], "text": []}

  def add(image_code: tuple, text_code: tuple) -> None:
    acc.update(image_code, text_code)
    if keep_codes:
      out["image"].append(image_code)
      out["text"].append(text_code)

  if mode == "encode_pooled":
    enc = BlockEncoder(loaded.params, spec, min(block, n))
    n_blocks = -(-n // block)
    for b, s in enumerate(range(0, n, block)):
      add(*block_codes(b, lambda s=s: (enc(pairs.image[s : s + block]), enc(pairs.text[s : s + block]))))
  else:
    if pairs.source != "synthetic":
      raise SaeJaxError(
        "config.analysis.codes='pool_token_codes' needs token-level activations per "
        "sample; this version supports it for the synthetic source only (the pooled "
        "file holds one row per sample): use codes='encode_pooled'"
      )
    tokens = int(acfg.tokens_per_sample)
    noise = float(acfg.token_noise)
    if tokens < 1:
      raise SaeJaxError(f"config.analysis.tokens_per_sample={tokens}: expected >= 1")
    info.update(tokens_per_sample=tokens, token_noise=noise)
    rng = np.random.default_rng([int(acfg.pair_seed), 7])
    step = max(1, block // tokens)
    enc = BlockEncoder(loaded.params, spec, min(step, n) * tokens)
    width = min(c, tokens * spec.k)
    n_blocks = -(-n // step)
    for b, s in enumerate(range(0, n, step)):
      # The token noise is drawn here, saved block or not: the generator stays where a full run has it.
      toks = [
        synthetic_tokens(x, tokens, noise, rng) for x in (pairs.image[s : s + step], pairs.text[s : s + step])
      ]

      def compute(toks=toks) -> tuple:
        sides = []
        for t in toks:
          v, i = enc(t)
          rows = t.shape[0] // tokens
          sides.append(pool_token_codes(v, i, np.repeat(np.arange(rows), tokens), rows, c, width))
        return tuple(sides)

      add(*block_codes(b, compute))
  if "progress" in bar:
    bar["progress"].close()
  if not keep_codes:
    return None, None, info
  cat = lambda parts: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  return cat(out["image"]), cat(out["text"]), info
