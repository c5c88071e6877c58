"""grain pipelines that yield whole training batches [batch_size, d] float32.

An element per row would cost a Python call per row in grain, so each element here is a whole
batch: batch i of the stream is a pure function of (seed, i), the iterator state is just the next
index, and orbax checkpoints it with grain's handler so a resumed run reads exactly the batches it
would have.

Sources:
- "synthetic": `PlantedSource.training_batch(i, batch_size)`.
- "shards": a global row shuffle over every row of an activation store, a new permutation per
  epoch; the permutation is a keyed Feistel bijection evaluated on index blocks, so it costs O(1)
  memory however many billions of rows the store holds.
- "online": an encoder inside the pipeline (`sae_jax.data.online.OnlineBatches`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import grain
import numpy as np

from sae_jax.data import shards as shards_lib
from sae_jax.data.synthetic import PlantedSource
from sae_jax.errors import SaeJaxError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
  """splitmix64-style round function on uint64 arrays."""
  with np.errstate(over="ignore"):
    z = (x + np.uint64(key)) & _MASK64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def feistel_permutation(positions: np.ndarray, n: int, seed, rounds: int = 4) -> np.ndarray:
  """A pseudo-random bijection of [0, n) applied to `positions` (vectorised, O(1) memory).

  A balanced Feistel network permutes [0, 4^h) with 4^h >= n; values that land outside [0, n)
  are pushed through again (cycle walking), which keeps it a bijection of [0, n).
  """
  if n <= 1:
    return np.zeros_like(positions, dtype=np.int64)
  half_bits = max(1, int(np.ceil(np.log2(n) / 2)))
  mask = np.uint64((1 << half_bits) - 1)
  seed = [int(s) for s in np.atleast_1d(seed)]
  keys = [int(k) for k in np.random.default_rng([*seed, 7]).integers(0, 2**63, rounds)]

  def once(v):
    left, right = v >> np.uint64(half_bits), v & mask
    for key in keys:
      left, right = right, left ^ (_mix(right, key) & mask)
    return (left << np.uint64(half_bits)) | right

  out = once(np.asarray(positions, np.uint64))
  todo = out >= np.uint64(n)
  while np.any(todo):
    out[todo] = once(out[todo])
    todo = out >= np.uint64(n)
  return out.astype(np.int64)


class ShardBatches:
  """Random access to batch i of the shuffled stream over an activation store."""

  def __init__(
    self, directory: str, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
  ):
    self.store = shards_lib.ActivationStore(directory)
    self.batch_size = batch_size
    self.seed = seed
    # Each process reads only the rows of its own slice of the global batch.
    self.local_size = batch_size // process_count
    self.local_offset = process_index * self.local_size
    self.batches_per_epoch = len(self.store) // batch_size
    if self.batches_per_epoch == 0:
      raise SaeJaxError(
        f"config.data.shard_dir={directory}: {len(self.store)} rows, fewer than one "
        f"batch of config.data.batch_size={batch_size}"
      )

  def __call__(self, i: int) -> np.ndarray:
    epoch, j = divmod(int(i), self.batches_per_epoch)
    start = j * self.batch_size + self.local_offset
    positions = np.arange(start, start + self.local_size, dtype=np.int64)
    rows = feistel_permutation(positions, len(self.store), seed=(self.seed, epoch))
    return self.store.rows(rows)


def batch_fn(config: Any, process_index: int = 0, process_count: int = 1) -> Callable[[int], np.ndarray]:
  """The function i -> this process's rows of global batch i, [batch_size / process_count, d]."""
  data = config.data
  bs = int(data.batch_size)
  if bs % process_count:
    raise SaeJaxError(f"config.data.batch_size={bs} is not divisible by the {process_count} processes")
  per = bs // process_count
  if data.source == "synthetic":
    source = PlantedSource(data.synthetic)
    return lambda i: source.training_batch(i, bs)[process_index * per : (process_index + 1) * per]
  if data.source == "shards":
    if not data.shard_dir:
      raise SaeJaxError("config.data.source='shards' needs config.data.shard_dir")
    return ShardBatches(data.shard_dir, bs, int(data.shuffle_seed), process_index, process_count)
  if data.source == "online":
    from sae_jax.data import online  # needs torch/transformers (the `extract` extra)

    batches = online.online_batch_fn(config)
    if process_count == 1:
      return batches
    # Every process encodes the same window (a pure function of the batch index) and keeps its rows.
    return lambda i: batches(i)[process_index * per : (process_index + 1) * per]
  raise SaeJaxError(f"config.data.source={data.source!r}: expected 'synthetic', 'shards' or 'online'")


def data_width(config: Any) -> int:
  """Width of the rows the configured source yields (checked against config.sae.d)."""
  if config.data.source == "synthetic":
    return int(config.data.synthetic.d)
  if config.data.source == "shards":
    return int(shards_lib.read_index(config.data.shard_dir)["d"])
  return int(config.sae.d)


def make_dataset(config: Any, fn: Optional[Callable[[int], np.ndarray]] = None) -> grain.IterDataset:
  """An endless grain IterDataset of batches (of `fn`, default the whole global batch)."""
  fn = fn or batch_fn(config)
  # range(2**62): effectively endless, still a MapDataset with random access for resumption.
  ds = grain.MapDataset.range(2**62).map(fn)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=int(config.data.prefetch)))


def check_batch(batch: np.ndarray, d: int, policy: str, where: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates a host batch; returns (batch with bad rows zeroed, valid mask [B] float32)."""
  if batch.ndim != 2 or batch.shape[1] != d:
    raise SaeJaxError(f"{where}: batch has shape {batch.shape}, expected [batch, config.sae.d={d}]")
  finite = np.isfinite(batch).all(axis=1)
  if finite.all():
    return batch, np.ones(batch.shape[0], np.float32)
  bad = int((~finite).sum())
  if policy == "error":
    raise SaeJaxError(
      f"{where}: {bad} row(s) contain NaN/Inf (first at row {int(np.argmin(finite))}); "
      "set config.data.nonfinite='skip' to mask and count them"
    )
  if policy != "skip":
    raise SaeJaxError(f"config.data.nonfinite={policy!r}: expected 'error' or 'skip'")
  return np.where(finite[:, None], batch, 0.0).astype(batch.dtype), finite.astype(np.float32)
