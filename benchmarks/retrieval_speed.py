"""Exact top-10 cosine search: sae_jax.retrieval.topk_search against faiss-cpu IndexFlatIP.

Prints one JSON line per case with queries/s of both, in the same process on the same data
(float32, L2-normalised, d=768 by default). Timings exclude JIT compilation (one warm-up call on a
small query slice with the same block shapes) and the one-off host->device copy of the candidates
(reported separately as `jax_put_s`); faiss `add` time is reported as `faiss_add_s`.
The two methods run interleaved over chunks of queries (alternating which goes first), so a busy
machine slows both alike; the 1-minute load average is recorded before and after each chunk.

  python -m benchmarks.retrieval_speed                        # 5k queries over 25k and 1M
  python -m benchmarks.retrieval_speed --candidates=25000 --block_sizes=4096,8192,16384
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("d", 768, "embedding width")
flags.DEFINE_integer("queries", 5000, "number of queries")
flags.DEFINE_list("candidates", ["25000", "1000000"], "candidate pool sizes")
flags.DEFINE_integer("k", 10, "neighbours per query")
flags.DEFINE_list("block_sizes", ["8192"], "candidate block sizes to try for the JAX kernel")
flags.DEFINE_list("query_block_sizes", ["1024"], "query block sizes to try")
flags.DEFINE_integer("group_size", 32, "group size of the exact two-stage block selection")
flags.DEFINE_integer("repeats", 1, "passes over the queries (times are summed)")
flags.DEFINE_integer("chunk", 1024, "queries per interleaved chunk (rounded to whole query blocks)")
flags.DEFINE_string(
  "xla_flags",
  "",
  "extra XLA_FLAGS for the JAX side, e.g. --xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
)
flags.DEFINE_bool("faiss", True, "also time faiss-cpu IndexFlatIP")
flags.DEFINE_bool("check", True, "check that both return the same ids (up to near-ties)")
flags.DEFINE_integer("seed", 0, "data seed")


def _data(n, d, seed):
  import numpy as np

  rng = np.random.default_rng(seed)
  x = np.empty((n, d), np.float32)
  step = 100_000
  for s in range(0, n, step):  # chunked to keep the float64 temporaries small
    blk = rng.standard_normal((min(step, n - s), d), dtype=np.float32)
    x[s : s + blk.shape[0]] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
  return x


def _load():
  try:
    return float(open("/proc/loadavg").read().split()[0])
  except OSError:
    return None


def main(argv):
  del argv
  if FLAGS.xla_flags:  # must be set before jax initialises its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS.xla_flags).strip()
  import jax
  import numpy as np

  from sae_jax import retrieval

  q = _data(FLAGS.queries, FLAGS.d, FLAGS.seed)
  for nc_s in FLAGS.candidates:
    nc = int(nc_s)
    c = _data(nc, FLAGS.d, FLAGS.seed + 1)
    t = time.perf_counter()
    cj = jax.block_until_ready(jax.device_put(c))
    put_s = time.perf_counter() - t
    index = None
    faiss_add_s = None
    if FLAGS.faiss:
      import faiss

      index = faiss.IndexFlatIP(FLAGS.d)
      t = time.perf_counter()
      index.add(c)
      faiss_add_s = time.perf_counter() - t
    for bs in FLAGS.block_sizes:
      for qbs in FLAGS.query_block_sizes:
        kw = dict(block_size=int(bs), query_block_size=int(qbs), group_size=FLAGS.group_size, normalize=False)
        chunk = max(int(qbs), (FLAGS.chunk // int(qbs)) * int(qbs))  # whole query blocks
        # Warm-up (excluded): compiles the query-block program; faiss gets the same warm-up.
        jax.block_until_ready(retrieval.topk_search(q[: int(qbs)], cj, FLAGS.k, **kw))
        if index is not None:
          index.search(q[: int(qbs)], FLAGS.k)
        loads = [_load()]
        t_jax = t_faiss = 0.0
        ids_j, sc_j, ids_f, sc_f = [], [], [], []
        for rep in range(FLAGS.repeats):
          for n_chunk, s0 in enumerate(range(0, FLAGS.queries, chunk)):
            qc = q[s0 : s0 + chunk]
            # Alternate which method runs first so both see the same machine conditions.
            order = ("jax", "faiss") if (n_chunk + rep) % 2 == 0 else ("faiss", "jax")
            for m in order:
              if m == "jax":
                t = time.perf_counter()
                js, ji = jax.block_until_ready(retrieval.topk_search(qc, cj, FLAGS.k, **kw))
                t_jax += time.perf_counter() - t
                if rep == 0:
                  ids_j.append(np.asarray(ji))
                  sc_j.append(np.asarray(js))
              elif index is not None:
                t = time.perf_counter()
                fs, fi = index.search(qc, FLAGS.k)
                t_faiss += time.perf_counter() - t
                if rep == 0:
                  ids_f.append(fi)
                  sc_f.append(fs)
            loads.append(_load())
        n_total = FLAGS.queries * FLAGS.repeats
        jax_qps = n_total / t_jax
        faiss_qps = n_total / t_faiss if index is not None else None
        rec = {
          "case": f"top{FLAGS.k} d={FLAGS.d} {FLAGS.queries} queries x {nc} candidates",
          "n_queries": FLAGS.queries,
          "n_candidates": nc,
          "d": FLAGS.d,
          "k": FLAGS.k,
          "jax_qps": round(jax_qps, 1),
          "faiss_qps": None if faiss_qps is None else round(faiss_qps, 1),
          "ratio_jax_over_faiss": None if faiss_qps is None else round(jax_qps / faiss_qps, 3),
          "jax_s": round(t_jax, 2),
          "faiss_s": None if faiss_qps is None else round(t_faiss, 2),
          "block_size": int(bs),
          "query_block_size": int(qbs),
          "group_size": FLAGS.group_size,
          "chunk": chunk,
          "repeats": FLAGS.repeats,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "jax_put_s": round(put_s, 3),
          "faiss_add_s": None if faiss_add_s is None else round(faiss_add_s, 3),
          "faiss_threads": None if index is None else faiss.omp_get_max_threads(),
          "backend": jax.default_backend(),
          "devices": len(jax.devices()),
          "cpu_count": os.cpu_count(),
          "loadavg_1m": loads,
        }
        if FLAGS.check and ids_f:
          ji, js = np.concatenate(ids_j), np.concatenate(sc_j)
          fi, fs = np.concatenate(ids_f), np.concatenate(sc_f)
          same = ji == fi
          near = np.abs(js - fs) <= 1e-5  # a differing id is fine only at a float32 near-tie
          rec["ids_equal_frac"] = round(float(same.mean()), 6)
          rec["mismatch_outside_ties"] = int(np.sum(~same & ~near))
          rec["max_abs_score_diff"] = float(np.max(np.abs(js - fs)))
        print(json.dumps(rec), flush=True)
    del cj, c, index


if __name__ == "__main__":
  app.run(main)
