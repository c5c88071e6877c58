"""Pooled embeddings of encoder batches, and the progress line of the extraction stages."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import tqdm

from sae_jax import config_utils
from sae_jax.encoders import pooling
from sae_jax.errors import SaeJaxError

POOL_VARIANTS = pooling.VARIANTS + ("embed",)


class Progress:
  """done/total, items/s and ETA: a tqdm bar when stderr is a terminal, else a plain stderr line every
  `every_s` seconds and at the end (a cluster's log file; not absl's log, which the mains set to
  WARNING to keep orbax quiet)."""

  def __init__(self, total: int, what: str, every_s: float = 10.0, done: int = 0):
    self.total, self.what, self.every_s = total, what, every_s
    self.done = done
    self.start_done = done
    self.t0 = self.last = time.perf_counter()
    self.bar = None
    if sys.stderr.isatty():
      self.bar = tqdm.tqdm(total=total, initial=done, desc=what, unit="item")

  @property
  def rate(self) -> float:
    dt = time.perf_counter() - self.t0
    return (self.done - self.start_done) / dt if dt > 0 else 0.0

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
    now = time.perf_counter()
    if self.bar is None and (now - self.last >= self.every_s or self.done >= self.total):
      self.last = now
      rate = self.rate
      eta = (self.total - self.done) / rate if rate > 0 else float("nan")
      print(
        f"extract {self.what}: {self.done}/{self.total} items, {rate:.1f} items/s, ETA {_fmt_s(eta)}",
        file=sys.stderr,
        flush=True,
      )

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _fmt_s(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def check_variants(variants, encoder) -> tuple:
  variants = config_utils.as_tuple(variants)
  if not variants:
    raise SaeJaxError("config.extract.pooling is empty; expected some of " + ", ".join(POOL_VARIANTS))
  for v in variants:
    if v not in POOL_VARIANTS:
      raise SaeJaxError(f"config.extract.pooling: unknown variant {v!r}; expected some of {POOL_VARIANTS}")
    if v == "embed" and encoder.kind != "contrastive":
      raise SaeJaxError(
        f'config.extract.pooling: "embed" (final embeddings) needs a contrastive model '
        f"(CLIP/SigLIP); {encoder.name} is a {encoder.kind} model"
      )
    if v != "embed" and encoder.kind == "contrastive" and not encoder.tokens:
      raise SaeJaxError(
        f"config.extract.pooling: {v!r} pools token states; set "
        f'config.extract.contrastive_tokens=True for {encoder.name} or use "embed"'
      )
  return variants


def pool_batch(out, variants) -> dict[str, np.ndarray]:
  """Pooled [B, d] float32 arrays of one encoder batch for each variant.

  Pooling runs in NumPy on the (zero-copy on CPU) host view of the hidden states: batches have
  variable lengths and jnp would compile every op for every new shape."""
  from sae_jax.encoders import base as enc_base  # torch: the `extract` extra

  res = {}
  hidden = None
  for v in variants:
    if v == "embed":
      res[v] = enc_base.to_numpy(out.embeds)
      continue
    if hidden is None:
      hidden = enc_base.to_numpy(out.hidden)
      mask = out.attention_mask.cpu().numpy()
      types = out.token_types.cpu().numpy()
    res[v] = np.asarray(pooling.pool(v, hidden, mask, types), np.float32)
  return res
