"""Shard reading at scale: rows/s of the training input pipeline against the SAE step's rows/s.

  python -m benchmarks.data_throughput --reps=5            # d=4096, 65536 rows per store, ~6 min on 2 cores
  python -m benchmarks.data_throughput --rows=32768 --dtypes=bfloat16 --shuffles=block --caches=warm

For each shard dtype (float32, bfloat16) x shuffle (global = exact Feistel shuffle with a per-row
gather, block = `data.shuffle="block"`) x page cache (warm: every file read once before timing;
cold: the store's pages dropped from the page cache with posix_fadvise(DONTNEED) before timing,
which needs no root; the files are re-read from the disk), one JSON line with rows/s of what the
trainer consumes: `pipeline.make_checked_dataset` (grain, `--threads` reader threads, the
finiteness check) over `pipeline.batch_fn(..., training=True)`, host batches ready, median over
`--reps` passes of one epoch (warm: after one untimed epoch; cold: right after the drop); the
repetitions interleave all cases (alternating their order), so other jobs' load falls on all
alike. Then one line with the rows/s of the jitted train step
(`sae_jax.training.step.jit_train_step`) at the same d (c, k and batch from the flags) on this
machine's default device, and the ratio reader / step.
Files larger than free memory (the other way to get cold reads) are not written: it would take
tens of GB here. `load_avg_1m` is printed with each line: on a shared machine the figures are
pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np


def _write_store(directory: str, rows: int, d: int, dtype: str) -> None:
  from sae_jax.data import shards as shards_lib

  w = shards_lib.ShardWriter(directory, d=d, dtype=dtype, rows_per_shard=16384)
  rng = np.random.default_rng(0)
  chunk = rng.standard_normal((4096, d)).astype(np.float32)
  for s in range(0, rows, 4096):
    w.add(chunk[: min(4096, rows - s)] + np.float32(s))
  w.close()


def _drop_cache(directory: str) -> None:
  for name in os.listdir(directory):
    fd = os.open(os.path.join(directory, name), os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _config(directory: str, shuffle: str, a):
  from configs import base

  config = base.get_config()
  config.data.source, config.data.shard_dir = "shards", directory
  config.data.batch_size, config.data.shuffle = a.batch_size, shuffle
  config.data.block_rows, config.data.shuffle_buffer_rows = a.block_rows, a.buffer_rows
  config.data.reader_threads, config.data.prefetch = a.threads, a.prefetch
  return config


def time_reader(directory: str, dtype: str, shuffle: str, cache: str, a) -> float:
  """Seconds for one epoch of host-ready (checked) batches through a fresh pipeline."""
  from sae_jax.data import pipeline

  config = _config(directory, shuffle, a)
  per_epoch = a.rows // a.batch_size
  fn = pipeline.batch_fn(config, 0, 1, True)
  it = iter(pipeline.make_checked_dataset(config, fn, a.d))
  if cache == "cold":
    _drop_cache(directory)
  else:
    for _ in range(per_epoch):  # the page cache and the reader's first buffers
      next(it)
  t0 = time.perf_counter()
  for _ in range(per_epoch):
    batch, _ = next(it)
  seconds = time.perf_counter() - t0
  assert batch.dtype.name == dtype, batch.dtype
  return seconds


def reader_line(dtype: str, shuffle: str, cache: str, times: list, loads: list, a) -> dict:
  rows = (a.rows // a.batch_size) * a.batch_size
  rows_per_s = rows / float(np.median(times))
  return {
    "bench": "shard_reader_rows_per_s",
    "dtype": dtype,
    "shuffle": shuffle,
    "page_cache": cache,
    "d": a.d,
    "batch_size": a.batch_size,
    "store_rows": a.rows,
    "block_rows": a.block_rows if shuffle == "block" else None,
    "buffer_rows": a.buffer_rows if shuffle == "block" else None,
    "reader_threads": a.threads,
    "reps": len(times),
    "rows_per_s": round(rows_per_s),
    "gb_per_s": round(rows_per_s * a.d * (4 if dtype == "float32" else 2) / 1e9, 2),
    "min_rows_per_s": round(rows / float(np.max(times))),
    "max_rows_per_s": round(rows / float(np.min(times))),
    "target_rows_per_s": 300_000 if (dtype, shuffle, cache) == ("bfloat16", "block", "warm") else None,
    "load_avg_1m": [round(x, 2) for x in (min(loads), max(loads))],
    "cpus": os.cpu_count(),
  }


def bench_step(a) -> dict:
  import jax

  from benchmarks import sae_step
  from configs import base

  cfg = base.get_config()
  cfg.sae.d, cfg.sae.c, cfg.sae.k, cfg.data.batch_size = a.d, a.c, a.k, a.step_batch
  step, state, put_batch = sae_step.fresh_step(cfg)
  batch, valid = put_batch(np.random.default_rng(0).standard_normal((a.step_batch, a.d)).astype(np.float32))
  state, m = step(state, batch, valid)
  jax.block_until_ready(m)
  times = []
  for _ in range(a.step_reps):
    t0 = time.perf_counter()
    state, m = step(state, batch, valid)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return {
    "bench": "sae_step_rows_per_s",
    "d": a.d,
    "c": a.c,
    "k": a.k,
    "batch_size": a.step_batch,
    "reps": a.step_reps,
    "rows_per_s": round(a.step_batch / float(np.median(times))),
    "device": str(jax.devices()[0].device_kind),
    "load_avg_1m": round(os.getloadavg()[0], 2),
    "cpus": os.cpu_count(),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--rows", type=int, default=65536, help="rows per store (one epoch)")
  p.add_argument("--batch_size", type=int, default=4096)
  p.add_argument("--block_rows", type=int, default=1024)
  p.add_argument("--buffer_rows", type=int, default=16384)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--prefetch", type=int, default=2)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--shuffles", default="global,block")
  p.add_argument("--caches", default="warm,cold")
  p.add_argument("--c", type=int, default=8192, help="step: dictionary size")
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--step_batch", type=int, default=1024)
  p.add_argument("--step_reps", type=int, default=3)
  p.add_argument("--no_step", action="store_true")
  p.add_argument("--dir", default="", help="where the stores are written (default: a temporary directory)")
  a = p.parse_args()
  root = a.dir or tempfile.mkdtemp(prefix="sae_data_throughput_")
  reader_rates = {}
  dtypes, shuffles, caches = a.dtypes.split(","), a.shuffles.split(","), a.caches.split(",")
  cases = [(t, s, c) for t in dtypes for s in shuffles for c in caches]
  times = {case: [] for case in cases}
  loads = {case: [] for case in cases}
  try:
    for dtype in dtypes:
      _write_store(os.path.join(root, dtype), a.rows, a.d, dtype)
    # Repetitions interleave the cases, so load from other jobs falls on all of them alike.
    for rep in range(a.reps):
      for case in cases if rep % 2 == 0 else cases[::-1]:
        times[case].append(time_reader(os.path.join(root, case[0]), *case, a))
        loads[case].append(os.getloadavg()[0])
  finally:
    if not a.dir:
      shutil.rmtree(root, ignore_errors=True)
  for case in cases:
    result = reader_line(*case, times[case], loads[case], a)
    reader_rates[case] = result["rows_per_s"]
    print(json.dumps(result), flush=True)
  if not a.no_step:
    result = bench_step(a)
    result["reader_rows_per_s_over_step"] = {
      "/".join(key): round(rate / result["rows_per_s"], 1) for key, rate in reader_rates.items()
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
