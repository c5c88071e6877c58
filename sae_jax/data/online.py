"""Online activations: the encoder runs inside the input pipeline, through a windowed shuffle buffer.

The paper (Appendix A) encodes a small part of the dataset at a time and samples SAE batches from a
shuffled buffer of its activations. Here the stream is cut into windows: window w encodes
`items_per_window` samples (images and captions mixed, in a seeded per-epoch order), shuffles all
their token rows, and serves `K = config.extract.online_buffer_batches` batches of
`config.data.batch_size` rows from them (rows beyond K*B are dropped; a window short of rows wraps
around its own shuffled rows). So batch i is a pure function of (seed, i): `OnlineBatches(config)`
is a callable i -> [batch, d] float32 that plugs into `sae_jax.data.pipeline.make_dataset(config, fn)`
(a grain MapDataset over batch indices), and the grain iterator state (the next index) is the whole
resume state: a restored run recomputes only the current window.

With `config.extract.shard_rows="pooled"` a decoder's rows are one pooled vector per sample (the
first of `config.extract.pooling`), as the offline shards are: an SAE then trains on rows like the
pooled embeddings it is analysed on.

`items_per_window` is `config.extract.online_window_items`, or (0) chosen so that a window holds
about 1.2 * K * B rows, from the rows per sample of a fixed probe of the first 16 samples.

With several processes (hosts), process p encodes only its share of each window (the window's
samples p, p + P, ...), shuffles its own rows and serves its B / P rows of each global batch: the
encoder work is split, not repeated.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from absl import logging

from sae_jax import encoders
from sae_jax.data import coco, paired
from sae_jax.data import shards as shards_lib
from sae_jax.errors import SaeJaxError
from sae_jax.stages.pooled import check_variants, pool_batch


class OnlineBatches:
  """batch index -> [batch_size, d] float32 rows of encoder activations (see module docstring)."""

  def __init__(self, config, encoder=None, source=None, process_index: int = 0, process_count: int = 1):
    ex, data = config.extract, config.data
    self.batch_size = int(data.batch_size)
    if self.batch_size % process_count:
      raise SaeJaxError(
        f"config.data.batch_size={self.batch_size} is not divisible by the {process_count} processes"
      )
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_size = self.batch_size // self.process_count
    self.batches_per_window = max(1, int(ex.online_buffer_batches))
    self.seed = int(data.shuffle_seed)
    self.encoder_batch = max(1, int(ex.batch_size))
    self.source = source if source is not None else paired.open_source(ex)
    self.encoder = encoder if encoder is not None else encoders.load_encoder(ex)
    self.d = int(self.encoder.d)
    keep = tuple(ex.shard_token_types)
    self.keep_types = np.array([shards_lib.TOKEN_TYPES.index(t) for t in keep], np.uint8)
    if str(ex.shard_rows) not in ("tokens", "pooled"):
      raise SaeJaxError(f'config.extract.shard_rows={ex.shard_rows!r}: expected "tokens" or "pooled"')
    # The pooling variant whose vectors are the rows (None: token rows); a contrastive model's
    # "embed" rows are one per sample already.
    self.pooled_variant = None
    if str(ex.shard_rows) == "pooled":
      first = check_variants(ex.pooling, self.encoder)[0]
      self.pooled_variant = None if first == "embed" else first
    self.items = [("image", r) for r in self.source.images] + [("text", c) for c in self.source.captions]
    self.skipped_corrupt = 0
    n_win = int(ex.online_window_items)
    if n_win <= 0:
      probe = self._encode([self.items[i] for i in self._order(0)[:16]])[0]
      per_item = max(probe.shape[0] / min(16, len(self.items)), 1e-9)
      n_win = math.ceil(1.2 * self.batches_per_window * self.batch_size / per_item)
    self.items_per_window = max(1, min(n_win, len(self.items)))
    self.windows_per_epoch = math.ceil(len(self.items) / self.items_per_window)
    self._cache: tuple[int, Optional[np.ndarray]] = (-1, None)
    logging.info(
      "online: %d samples, %d per window, %d batches of %d per window, d=%d",
      len(self.items),
      self.items_per_window,
      self.batches_per_window,
      self.batch_size,
      self.d,
    )

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch, 11]).permutation(len(self.items))

  def _encode(self, items) -> tuple[np.ndarray, np.ndarray]:
    rows, types = [], []
    for kind in ("image", "text"):
      group = [x for k, x in items if k == kind]
      for s in range(0, len(group), self.encoder_batch):
        part = group[s : s + self.encoder_batch]
        if kind == "image":
          imgs = []
          for ref in part:
            try:
              imgs.append(coco.load_image(ref))
            except coco.ImageLoadError as e:
              logging.warning("online: skipping %s", e)
              self.skipped_corrupt += 1
          if not imgs:
            continue
          out = self.encoder.encode(images=imgs)
        else:
          out = self.encoder.encode(texts=[c.text for c in part])
        if self.pooled_variant is not None:
          r = pool_batch(out, (self.pooled_variant,))[self.pooled_variant]
          t = np.full(r.shape[0], shards_lib.TOKEN_TYPES.index(kind), np.uint8)
        else:
          r, t, _ = self.encoder.rows(out)
        sel = np.isin(t, self.keep_types)
        rows.append(r[sel])
        types.append(t[sel])
    if not rows:
      return np.zeros((0, self.d), np.float32), np.zeros((0,), np.uint8)
    return np.concatenate(rows).astype(np.float32, copy=False), np.concatenate(types)

  def window_items(self, w: int) -> np.ndarray:
    """Indices into `items` that this process encodes for window w (its share of the window)."""
    epoch, j = divmod(int(w), self.windows_per_epoch)
    idx = self._order(epoch)[j * self.items_per_window : (j + 1) * self.items_per_window]
    return idx[self.process_index :: self.process_count]

  def window(self, w: int) -> np.ndarray:
    """This process's K shuffled batches [K, batch_size / process_count, d] of window w."""
    if self._cache[0] == w:
      return self._cache[1]
    rows, _ = self._encode([self.items[i] for i in self.window_items(w)])
    if rows.shape[0] == 0:
      raise SaeJaxError(
        f"online: window {w} produced no activation rows on process {self.process_index} "
        "(all images unreadable, or fewer samples per window than processes?)"
      )
    need = self.batches_per_window * self.local_size
    # One process keeps the key it always had, so single-process streams do not change.
    key = [self.seed, int(w), 13] + ([self.process_index] if self.process_count > 1 else [])
    rng = np.random.default_rng(key)
    picks = [rng.permutation(rows.shape[0]) for _ in range(math.ceil(need / rows.shape[0]))]
    order = np.concatenate(picks)[:need]
    batches = rows[order].reshape(self.batches_per_window, self.local_size, self.d)
    self._cache = (int(w), batches)
    return batches

  def __call__(self, i: int) -> np.ndarray:
    w, k = divmod(int(i), self.batches_per_window)
    return self.window(w)[k]


def online_batch_fn(
  config, encoder=None, source=None, process_index: int = 0, process_count: int = 1
) -> OnlineBatches:
  """For `config.data.source == "online"`: the function i -> this process's rows of batch i, like
  pipeline.batch_fn."""
  return OnlineBatches(config, encoder, source, process_index, process_count)
