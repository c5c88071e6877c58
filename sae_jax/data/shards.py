"""The on-disk activation store: a directory of fixed-width `.npy` shards plus `index.json`.

Format `sae_jax.activations.v1` (v2, written by a multi-process extraction, is the same index
with shard names that are paths relative to its directory, into the parts' v1 directories)::

  index.json                    {"format", "d", "dtype", "total_rows", "shards": [{"name", "rows"}], "metadata"}
  shard-00000.npy               [rows, d] activations (np.save; memory-mapped for reading)
  shard-00000.token_types.npy   [rows] uint8, optional (TOKEN_TYPES)
  shard-00000.sample_ids.npy    [rows] int64, optional

A shard's files are written under a temporary name and renamed when complete, and `index.json` is
rewritten atomically after each finished shard: a killed writer leaves only whole shards behind,
and a new writer on the same directory resumes after them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import threading
from typing import Optional, Sequence

import ml_dtypes  # shipped with jax
import numpy as np
from etils import epath

from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError

FORMAT = "sae_jax.activations.v1"
# v2: an index that lists the shards of several directories (an extraction split across processes,
# `sae_jax.stages.extract_parts`): a shard's "name" is its path relative to the index's directory.
FORMAT_V2 = "sae_jax.activations.v2"
INDEX_FILE = "index.json"
TOKEN_TYPES = ("special", "image", "text", "prompt")
_DTYPES = ("float32", "float16", "bfloat16")


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def shard_name(i: int) -> str:
  return f"shard-{i:05d}"


class ShardWriter:
  """Appends rows and cuts them into shards of `rows_per_shard` rows (the last may be shorter)."""

  def __init__(
    self,
    directory: str,
    d: int,
    dtype: str = "float32",
    rows_per_shard: int = 65536,
    metadata: Optional[dict] = None,
  ):
    if dtype not in _DTYPES:
      raise SaeJaxError(f"ShardWriter dtype={dtype!r}: expected one of {_DTYPES}")
    self.directory = directory
    self.d = int(d)
    self.dtype = dtype
    self.rows_per_shard = int(rows_per_shard)
    os.makedirs(directory, exist_ok=True)
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      index = read_index(directory, allow_empty=True)
      if index["format"] != FORMAT:
        raise SaeJaxError(f"{index_path}: a merged {index['format']} index is read-only; use a new directory")
      if index["d"] != self.d or index["dtype"] != dtype:
        raise SaeJaxError(
          f"{index_path}: existing shards have d={index['d']} dtype={index['dtype']}, "
          f"this writer has d={self.d} dtype={dtype}; use a new directory"
        )
      self._shards = list(index["shards"])
      self.metadata = dict(index.get("metadata", {}))
      self.metadata.update(metadata or {})
    else:
      self._shards = []
      self.metadata = dict(metadata or {})
    self._buffers: list[tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]] = []
    self._buffered = 0
    self._write_index()

  @property
  def finished_shards(self) -> int:
    return len(self._shards)

  @property
  def total_rows(self) -> int:
    return sum(s["rows"] for s in self._shards)

  def add(
    self, rows: np.ndarray, token_types: Optional[np.ndarray] = None, sample_ids: Optional[np.ndarray] = None
  ) -> None:
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != self.d:
      raise SaeJaxError(f"ShardWriter.add: rows have shape {rows.shape}, expected [n, {self.d}]")
    if not np.all(np.isfinite(rows.astype(np.float32))):
      raise SaeJaxError("ShardWriter.add: rows contain NaN or Inf")
    n = rows.shape[0]
    for name, extra in (("token_types", token_types), ("sample_ids", sample_ids)):
      if extra is not None and np.shape(extra) != (n,):
        raise SaeJaxError(f"ShardWriter.add: {name} has shape {np.shape(extra)}, expected [{n}]")
    self._buffers.append(
      (
        rows.astype(_np_dtype(self.dtype)),
        None if token_types is None else np.asarray(token_types, np.uint8),
        None if sample_ids is None else np.asarray(sample_ids, np.int64),
      )
    )
    self._buffered += n
    while self._buffered >= self.rows_per_shard:
      self._flush(self.rows_per_shard)

  def close(self) -> dict:
    if self._buffered:
      self._flush(self._buffered)
    self._write_index()
    return read_index(self.directory)

  def _flush(self, n: int) -> None:
    def take(pos):
      parts = [b[pos] for b in self._buffers]
      if any(p is None for p in parts):
        if not all(p is None for p in parts):
          raise SaeJaxError(
            f"ShardWriter: some add() calls gave {('rows', 'token_types', 'sample_ids')[pos]}, "
            "others did not; give it always or never"
          )
        return None
      return np.concatenate(parts)

    rows, types, ids = take(0), take(1), take(2)
    name = shard_name(len(self._shards))
    base = os.path.join(self.directory, name)
    # Extras first, activations last: the index names only shards whose every file is complete.
    if types is not None:
      workdir_lib.atomic_save_npy(base + ".token_types.npy", types[:n])
    if ids is not None:
      workdir_lib.atomic_save_npy(base + ".sample_ids.npy", ids[:n])
    workdir_lib.atomic_save_npy(base + ".npy", rows[:n])
    self._shards.append(
      {"name": name, "rows": int(n), "token_types": types is not None, "sample_ids": ids is not None}
    )
    rest = (rows[n:], None if types is None else types[n:], None if ids is None else ids[n:])
    self._buffers = [rest] if len(rest[0]) else []
    self._buffered = len(rest[0])
    self._write_index()

  def _write_index(self) -> None:
    workdir_lib.atomic_write_json(
      os.path.join(self.directory, INDEX_FILE),
      {
        "format": FORMAT,
        "d": self.d,
        "dtype": self.dtype,
        "total_rows": self.total_rows,
        "shards": self._shards,
        "metadata": self.metadata,
      },
    )


class RemoteNpy:
  """Rows of a 2-D `.npy` file on an object store (`gs://...`, through etils.epath): no memory
  map there, so rows are read on demand, one seek + read per run of consecutive rows (slices and
  sorted index arrays, what `ActivationStore.rows` and the block shuffle ask for). Contiguous
  reads are what object stores serve well: train from remote shards with data.shuffle="block"."""

  def __init__(self, path: str, dtype: Optional[np.dtype] = None):
    self.path = epath.Path(path)
    try:
      with self.path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (
          np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, self.file_dtype = read_header(f)
        self.offset = f.tell()
    except ValueError as e:
      raise SaeJaxError(f"activation shards: {path} is truncated or not an .npy file ({e})") from None
    if len(shape) != 2 or fortran:
      raise SaeJaxError(
        f"activation shards: {path} holds a {shape} array (fortran={fortran}); expected rows [n, d]"
      )
    self.shape = tuple(int(x) for x in shape)
    self.dtype = np.dtype(dtype) if dtype is not None else self.file_dtype
    self.row_bytes = self.file_dtype.itemsize * self.shape[1]
    self._local = threading.local()  # one open file per reader thread

  def __len__(self) -> int:
    return self.shape[0]

  def _read(self, start: int, stop: int) -> np.ndarray:
    f = getattr(self._local, "file", None)
    if f is None:
      f = self._local.file = self.path.open("rb")
    f.seek(self.offset + start * self.row_bytes)
    data = f.read((stop - start) * self.row_bytes)
    if len(data) != (stop - start) * self.row_bytes:
      raise SaeJaxError(f"activation shards: {self.path} is truncated (rows {start}..{stop} not there)")
    return np.frombuffer(data, self.file_dtype).view(self.dtype).reshape(stop - start, self.shape[1])

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(self.shape[0])
      if step != 1:
        raise SaeJaxError(f"{self.path}: strided reads are not supported")
      return self._read(start, max(start, stop))
    idx = np.asarray(key, np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
      raise IndexError(f"{self.path}: row index out of range [0, {self.shape[0]})")
    uniq, inverse = np.unique(idx, return_inverse=True)
    cuts = np.nonzero(np.diff(uniq) != 1)[0] + 1
    runs = [self._read(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, cuts) if r.size]
    rows = np.concatenate(runs) if runs else np.zeros((0, self.shape[1]), self.dtype)
    return rows[inverse]


def shard_path(directory: str, name: str) -> str:
  """`directory/name.npy`; v2 names climb out of the directory (`../process-*/shards/...`), which
  object stores do not resolve: normalised here for gs://-style paths too."""
  if not workdir_lib.is_remote(directory):
    return os.path.join(directory, name + ".npy")
  scheme, rest = str(directory).split("://", 1)
  return f"{scheme}://{posixpath.normpath(posixpath.join(rest, name + '.npy'))}"


def _open_rows(path: str, dtype: Optional[np.dtype] = None):
  """The rows of a shard file: a memory map (local) or a `RemoteNpy` (gs://...)."""
  if workdir_lib.is_remote(path):
    return RemoteNpy(path, dtype)
  array = np.load(path, mmap_mode="r")
  return array.view(dtype) if dtype is not None else array


def read_index(directory: str, allow_empty: bool = False) -> dict:
  """Reads and validates `index.json`; every named shard must exist with the promised shape.
  `directory` may be local or remote (`gs://...`)."""
  path = os.path.join(directory, INDEX_FILE)
  if not epath.Path(directory).is_dir():
    raise SaeJaxError(f"activation shards: directory {directory} does not exist")
  if not epath.Path(path).exists():
    raise SaeJaxError(
      f"activation shards: {path} is missing (not a shard directory, or extraction "
      "has not finished a shard yet)"
    )
  try:
    index = json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise SaeJaxError(f"{path}: not valid JSON ({e})") from None
  for key in ("format", "d", "dtype", "shards"):
    if key not in index:
      raise SaeJaxError(f"{path}: missing field {key!r}")
  if index["format"] not in (FORMAT, FORMAT_V2):
    raise SaeJaxError(f"{path}: format {index['format']!r}, expected {FORMAT!r} or {FORMAT_V2!r}")
  if not index["shards"] and not allow_empty:
    raise SaeJaxError(f"{path}: the directory holds no finished shard")
  for s in index["shards"]:
    f = shard_path(directory, s["name"])
    if not epath.Path(f).exists():
      raise SaeJaxError(f"activation shards: {f} is listed in {INDEX_FILE} but missing")
    try:
      arr = _open_rows(f)
    except ValueError as e:
      raise SaeJaxError(f"activation shards: {f} is truncated or not an .npy file ({e})") from None
    if arr.shape != (s["rows"], index["d"]):
      raise SaeJaxError(
        f"activation shards: {f} has shape {arr.shape}, index says ({s['rows']}, {index['d']})"
      )
  index["total_rows"] = sum(s["rows"] for s in index["shards"])
  return index


@dataclasses.dataclass
class ActivationStore:
  """Random access to rows of a shard directory: memory maps, or `RemoteNpy` reads on gs://."""

  directory: str

  def __post_init__(self):
    self.index = read_index(self.directory)
    self.d = int(self.index["d"])
    self.dtype = self.index["dtype"]
    self.np_dtype = _np_dtype(self.dtype)
    # One memory map per shard, in index order; `starts[s]` is shard s's first global row.
    # np.save writes bfloat16 as raw 2-byte voids: view them back as ml_dtypes.bfloat16.
    self.arrays = [
      _open_rows(shard_path(self.directory, s["name"]), self.np_dtype) for s in self.index["shards"]
    ]
    self.starts = np.cumsum([0] + [a.shape[0] for a in self.arrays])
    self.total_rows = int(self.starts[-1])

  def __len__(self) -> int:
    return self.total_rows

  def rows(self, indices: Sequence[int] | np.ndarray, dtype: Optional[np.dtype] = np.float32) -> np.ndarray:
    """Rows at global `indices` (any order), [len(indices), d] in `dtype` (None: the store's)."""
    indices = np.asarray(indices, np.int64)
    out = np.empty((indices.shape[0], self.d), self.np_dtype if dtype is None else dtype)
    shard_of = np.searchsorted(self.starts, indices, side="right") - 1
    for s in np.unique(shard_of):
      sel = np.nonzero(shard_of == s)[0]
      local = indices[sel] - self.starts[s]
      order = np.argsort(local)  # sorted reads are page-cache friendly
      out[sel[order]] = self.arrays[s][local[order]]
    return out
