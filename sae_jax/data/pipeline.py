"""grain pipelines that yield whole training batches [batch_size, d].

An element per row would cost a Python call per row in grain, so each element here is a whole
batch: batch i of the stream is a pure function of (seed, i), the iterator state is just the next
index, and orbax checkpoints it with grain's handler so a resumed run reads exactly the batches it
would have.

Sources:
- "synthetic": `PlantedSource.training_batch(i, batch_size)`.
- "shards", `data.shuffle="global"`: a global row shuffle over every row of an activation store, a
  new permutation per epoch; the permutation is a keyed Feistel bijection evaluated on index
  blocks, so it costs O(1) memory however many billions of rows the store holds. Each batch is a
  gather of B rows scattered over the whole store (B random reads from cold storage).
- "shards", `data.shuffle="block"` (`BlockShuffleBatches`): the store is cut into blocks of
  `data.block_rows` contiguous rows; each epoch visits the blocks in a seeded random order, groups
  them into RAM buffers of `data.shuffle_buffer_rows` rows, and shuffles the rows inside each
  buffer. A buffer is read with one contiguous copy per block, then batches are slices of it. The
  trade-off: a batch only mixes rows of one buffer (buffer_rows / block_rows blocks from random
  places of the store), and rows of one image or caption, which extraction writes next to each
  other, stay in the same buffer; a bigger buffer (or smaller block) mixes more and costs RAM
  (about 3 buffers are held) or more, smaller reads.
- "online": an encoder inside the pipeline (`sae_jax.data.online.OnlineBatches`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
from typing import Any, Callable, Optional

import grain
import ml_dtypes
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
    self,
    directory: str,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    native_dtype: bool = False,
  ):
    self.store = shards_lib.ActivationStore(directory)
    self.batch_size = batch_size
    self.seed = seed
    # native_dtype: rows in the store's dtype (bf16 stays bf16 until the device), else float32.
    self.dtype = self.store.np_dtype if native_dtype else np.dtype(np.float32)
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
    return self.store.rows(rows, self.dtype)


class BlockShuffleBatches:
  """Random access to batch i of the block-shuffled stream over an activation store.

  The stream is every row of epoch 0, then every row of epoch 1, ...: global batch i is rows
  [i * B, (i + 1) * B) of it, so every row is visited exactly once per epoch (a batch may span two
  epochs). Epoch e visits the blocks (`block_rows` contiguous rows of one shard; a shard's last
  block may be shorter) in the order `rng(seed, e).permutation`, cut into buffers of
  `buffer_rows // block_rows` blocks, and buffer t's rows in the order `rng(seed, e, t)`. Batch i
  is therefore a pure function of (seed, i), and the grain iterator state (the next batch index)
  is the whole resume state, as for the global shuffle.

  A buffer is filled by `threads` threads, one contiguous copy per block; the next buffer is
  filled in the background while batches are cut from the current one. With several processes,
  each holds only the rows of its slice of every batch (the global order does not depend on the
  process count).
  """

  def __init__(
    self,
    directory: str,
    batch_size: int,
    seed: int,
    block_rows: int,
    buffer_rows: int,
    process_index: int = 0,
    process_count: int = 1,
    threads: int = 2,
    native_dtype: bool = True,
  ):
    if block_rows < 1 or buffer_rows < block_rows:
      raise SaeJaxError(
        f"config.data.block_rows={block_rows} / config.data.shuffle_buffer_rows={buffer_rows}: expected "
        "1 <= block_rows <= shuffle_buffer_rows"
      )
    self.store = shards_lib.ActivationStore(directory)
    self.batch_size, self.seed = int(batch_size), int(seed)
    if len(self.store) < self.batch_size:
      raise SaeJaxError(
        f"config.data.shard_dir={directory}: {len(self.store)} rows, fewer than one "
        f"batch of config.data.batch_size={batch_size}"
      )
    self.local_size = self.batch_size // process_count
    self.local_offset = process_index * self.local_size
    self.process_count = process_count
    self.dtype = self.store.np_dtype if native_dtype else np.dtype(np.float32)
    shard_idx, starts, lens = [], [], []
    for s, array in enumerate(self.store.arrays):
      n = array.shape[0]
      for a in range(0, n, block_rows):
        shard_idx.append(s)
        starts.append(a)
        lens.append(min(block_rows, n - a))
    self.block_shard = np.asarray(shard_idx, np.int64)
    self.block_start = np.asarray(starts, np.int64)
    self.block_len = np.asarray(lens, np.int64)
    self.blocks_per_buffer = max(1, int(buffer_rows) // int(block_rows))
    self.rows_per_epoch = len(self.store)
    self.batches_per_epoch = self.rows_per_epoch // self.batch_size  # whole batches inside one epoch
    self._lock = threading.Lock()
    self._epochs: collections.OrderedDict = collections.OrderedDict()
    self._buffers: collections.OrderedDict = collections.OrderedDict()
    self._loading: dict = {}
    self._keep_buffers = 3  # the current one, the one filled ahead, one a straddling batch still reads
    self._copy_pool = concurrent.futures.ThreadPoolExecutor(max(1, int(threads)))
    self._ahead_pool = concurrent.futures.ThreadPoolExecutor(1)

  def epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(block order of `epoch`, first epoch row of each buffer + the epoch length)."""
    with self._lock:
      if epoch in self._epochs:
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.block_len))
    sizes = np.add.reduceat(self.block_len[order], np.arange(0, len(order), self.blocks_per_buffer))
    layout = (order, np.concatenate([[0], np.cumsum(sizes)]))
    with self._lock:
      self._epochs[epoch] = layout
      while len(self._epochs) > 2:
        self._epochs.popitem(last=False)
    return layout

  def buffer_rows_order(self, epoch: int, t: int) -> np.ndarray:
    """Global store rows of buffer t of `epoch`, in the order the stream visits them."""
    order, _ = self.epoch_layout(epoch)
    blocks = order[t * self.blocks_per_buffer : (t + 1) * self.blocks_per_buffer]
    src = np.concatenate(
      [
        self.store.starts[self.block_shard[b]] + self.block_start[b] + np.arange(self.block_len[b])
        for b in blocks
      ]
    )
    dest = np.random.default_rng([self.seed, epoch, t]).permutation(src.shape[0])
    out = np.empty_like(src)
    out[dest] = src
    return out

  def _fill(self, epoch: int, t: int) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Buffer t of `epoch` as this process holds it: (rows, local position of each buffer slot,
    sorted positions in `rows` of rows with NaN/Inf)."""
    order, bstart = self.epoch_layout(epoch)
    blocks = order[t * self.blocks_per_buffer : (t + 1) * self.blocks_per_buffer]
    lens = self.block_len[blocks]
    total = int(lens.sum())
    # Source row o of the buffer (blocks concatenated) lands in slot dest[o].
    dest = np.random.default_rng([self.seed, epoch, t]).permutation(total)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    local = None
    if self.process_count > 1:
      within = (epoch * self.rows_per_epoch + bstart[t] + np.arange(total)) % self.batch_size
      keep = (within >= self.local_offset) & (within < self.local_offset + self.local_size)
      local = np.cumsum(keep) - 1
      rows = np.empty((int(keep.sum()), self.store.d), self.dtype)
    else:
      rows = np.empty((total, self.store.d), self.dtype)

    step = max(1, (1 << 18) // self.store.d)  # rows per piece: checked while in cache, then placed

    def copy(m: int) -> list:
      b = blocks[m]
      a = int(self.block_start[b])
      block = self.store.arrays[self.block_shard[b]][a : a + int(lens[m])]  # one contiguous read
      block_slots = dest[offsets[m] : offsets[m + 1]]
      bad = []
      for c in range(0, block.shape[0], step):
        src, slots = block[c : c + step], block_slots[c : c + step]
        finite = None if all_finite(src) else np.isfinite(src).all(axis=1)
        if local is not None:
          sel = keep[slots]
          src, slots = src[sel], local[slots[sel]]
          finite = None if finite is None else finite[sel]
        rows[slots] = src
        if finite is not None:
          bad.append(slots[~finite])
      return bad

    bad = [x for part in self._copy_pool.map(copy, range(len(blocks))) for x in part]
    return rows, local, np.sort(np.concatenate(bad)) if bad else np.zeros(0, np.int64)

  def _buffer(self, epoch: int, t: int, ahead: bool = True) -> tuple:
    key = (epoch, t)
    with self._lock:
      if key in self._buffers:
        self._buffers.move_to_end(key)
        return self._buffers[key]
      event = self._loading.get(key)
      owner = event is None
      if owner:
        event = self._loading[key] = threading.Event()
    if not owner:
      event.wait()
      with self._lock:
        if key in self._buffers:
          return self._buffers[key]
      return self._buffer(epoch, t, ahead)  # the loader failed or it was evicted already: load it here
    try:
      value = self._fill(epoch, t)
      with self._lock:
        self._buffers[key] = value
        while len(self._buffers) > self._keep_buffers:
          self._buffers.popitem(last=False)
    finally:
      with self._lock:
        del self._loading[key]
      event.set()
    if ahead:  # only a batch's own request fills ahead, so the background thread runs one buffer ahead
      n_buffers = len(self.epoch_layout(epoch)[1]) - 1
      nxt = (epoch, t + 1) if t + 1 < n_buffers else (epoch + 1, 0)
      self._ahead_pool.submit(self._buffer, *nxt, False)
    return value

  def checked(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(this process's rows of batch i, finite mask [rows] bool): the rows were checked for NaN/Inf
    as their buffer was filled, so a batch needs no second pass."""
    pos = int(i) * self.batch_size + self.local_offset
    need, pieces, masks = self.local_size, [], []
    while need:
      epoch, q = divmod(pos, self.rows_per_epoch)
      _, bstart = self.epoch_layout(epoch)
      t = int(np.searchsorted(bstart, q, side="right")) - 1
      take = min(need, int(bstart[t + 1]) - q)
      rows, local, bad = self._buffer(epoch, t)
      j = q - int(bstart[t])
      first = j if local is None else int(local[j])
      pieces.append(rows[first : first + take])
      masks.append(~np.isin(np.arange(first, first + take), bad))
      pos, need = pos + take, need - take
    if len(pieces) == 1:
      return pieces[0], masks[0]
    return np.concatenate(pieces), np.concatenate(masks)

  def __call__(self, i: int) -> np.ndarray:
    return self.checked(i)[0]


def batch_fn(
  config: Any, process_index: int = 0, process_count: int = 1, training: bool = False
) -> Callable[[int], np.ndarray]:
  """The function i -> this process's rows of global batch i, [batch_size / process_count, d].

  `training`: the stream the steps train on, in the shards' own dtype (bf16 crosses to the device
  as bf16, `DeviceFeed` casts it there) and with `data.shuffle`. Otherwise (the few batches of
  init and evaluation, far from the training stream) float32 rows, shards read by the exact
  shuffle, which needs no RAM buffer.
  """
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
    if data.shuffle not in ("global", "block"):
      raise SaeJaxError(f"config.data.shuffle={data.shuffle!r}: expected 'global' or 'block'")
    if data.shuffle == "global" or not training:
      return ShardBatches(data.shard_dir, bs, int(data.shuffle_seed), process_index, process_count, training)
    return BlockShuffleBatches(
      data.shard_dir,
      bs,
      int(data.shuffle_seed),
      int(data.block_rows),
      int(data.shuffle_buffer_rows),
      process_index,
      process_count,
      int(data.reader_threads),
      True,
    )
  if data.source == "online":
    from sae_jax.data import online  # needs torch/transformers (the `extract` extra)

    # Each process encodes only its share of each window and serves its rows of every batch.
    return online.online_batch_fn(config, process_index=process_index, process_count=process_count)
  raise SaeJaxError(f"config.data.source={data.source!r}: expected 'synthetic', 'shards' or 'online'")


def data_width(config: Any) -> int:
  """Width of the rows the configured source yields (checked against config.sae.d)."""
  if config.data.source == "synthetic":
    return int(config.data.synthetic.d)
  if config.data.source == "shards":
    return int(shards_lib.read_index(config.data.shard_dir)["d"])
  return int(config.sae.d)


def _read_options(config: Any) -> grain.ReadOptions:
  # An online encoder is not run in several threads at once; shards are read by data.reader_threads.
  threads = int(config.data.reader_threads) if config.data.source == "shards" else 1
  return grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=int(config.data.prefetch))


def make_dataset(config: Any, fn: Optional[Callable[[int], np.ndarray]] = None) -> grain.IterDataset:
  """An endless grain IterDataset of batches (of `fn`, default the whole global batch)."""
  fn = fn or batch_fn(config)
  # range(2**62): effectively endless, still a MapDataset with random access for resumption.
  ds = grain.MapDataset.range(2**62).map(fn)
  return ds.to_iter_dataset(_read_options(config))


def make_checked_dataset(config: Any, fn: Callable[[int], np.ndarray], d: int) -> grain.IterDataset:
  """Like `make_dataset`, elements (batch, valid mask [B] float32) checked by `check_batch` in
  grain's reader threads; batch i's message names it as `batch i` (the step that trains on it)."""
  policy, source = str(config.data.nonfinite), config.data.source

  def read(i: int) -> tuple[np.ndarray, np.ndarray]:
    where = f"config.data.source={source!r} batch {i}"
    if isinstance(fn, BlockShuffleBatches):  # checked while its buffer was filled
      batch, finite = fn.checked(i)
      _check_shape(batch, d, where)
      return apply_nonfinite_policy(batch, finite, policy, where)
    return check_batch(fn(i), d, policy, where)

  ds = grain.MapDataset.range(2**62).map(read)
  return ds.to_iter_dataset(_read_options(config))


def all_finite(batch: np.ndarray) -> bool:
  """True when no element is NaN/Inf: a max over the magnitude bits, chunked to stay in cache
  (several times faster than np.isfinite on bf16, which ml_dtypes runs element by element)."""
  dtype = batch.dtype
  if dtype == np.float32:
    bits, mag, limit = batch.view(np.uint32).reshape(-1), np.uint32(0x7FFFFFFF), 0x7F800000
  elif dtype == np.dtype(ml_dtypes.bfloat16):
    bits, mag, limit = batch.view(np.uint16).reshape(-1), np.uint16(0x7FFF), 0x7F80
  elif dtype == np.float16:
    bits, mag, limit = batch.view(np.uint16).reshape(-1), np.uint16(0x7FFF), 0x7C00
  else:
    return bool(np.isfinite(batch).all())
  chunk = 1 << 18
  for a in range(0, bits.shape[0], chunk):
    if int(np.bitwise_and(bits[a : a + chunk], mag).max()) >= limit:
      return False
  return True


def _check_shape(batch: np.ndarray, d: int, where: str) -> None:
  if batch.ndim != 2 or batch.shape[1] != d:
    raise SaeJaxError(f"{where}: batch has shape {batch.shape}, expected [batch, config.sae.d={d}]")


def check_batch(batch: np.ndarray, d: int, policy: str, where: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates a host batch; returns (batch with bad rows zeroed, valid mask [B] float32)."""
  _check_shape(batch, d, where)
  if batch.flags.c_contiguous and all_finite(batch):
    return batch, np.ones(batch.shape[0], np.float32)
  return apply_nonfinite_policy(batch, np.isfinite(batch).all(axis=1), policy, where)


def apply_nonfinite_policy(
  batch: np.ndarray, finite: np.ndarray, policy: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
  """`config.data.nonfinite` on a batch whose finite rows are `finite` [B] bool: 'error' raises,
  'skip' returns (batch with bad rows zeroed, valid mask [B] float32)."""
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


class DeviceFeed:
  """Iterator over device batches that keeps `ahead` batches transferred ahead of the one in use.

  Wraps a grain iterator of host elements; `put` transfers one element (e.g. to sharded global
  arrays). The checkpointed state is the grain state of the next batch the caller has not taken,
  not of the batches already transferred ahead, so a restored run reads exactly the batches an
  uninterrupted one would. It implements the iterator protocol grain's orbax handler saves
  (`get_state` -> bytes, `set_state`, `start_prefetch`).
  """

  def __init__(self, iterator: Any, put: Callable[[Any], Any], ahead: int = 2):
    self._it, self._put, self._ahead = iterator, put, max(0, int(ahead))
    self._queue: collections.deque = collections.deque()

  def _pull(self) -> None:
    state = self._it.get_state()
    self._queue.append((state, self._put(next(self._it))))

  def __iter__(self) -> "DeviceFeed":
    return self

  def __next__(self) -> Any:
    while len(self._queue) < self._ahead + 1:
      self._pull()
    _, value = self._queue.popleft()
    return value

  def get_state(self) -> bytes:
    state = self._queue[0][0] if self._queue else self._it.get_state()
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    self._queue.clear()
    self._it.set_state(json.loads(state.decode() if isinstance(state, bytes) else state))

  def start_prefetch(self) -> None:
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()
