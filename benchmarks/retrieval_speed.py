"""Exact top-10 cosine search: sae_jax.retrieval.topk_search against faiss-cpu IndexFlatIP.

Prints one JSON line per case with queries/s of both, in the same process on the same data
(float32, L2-normalised, d=768 by default). Timings exclude JIT compilation (one warm-up call on a
small query slice with the same block shapes) and the one-off host->device copy of the candidates
(reported separately as `jax_put_s`); faiss `add` time is reported as `faiss_add_s`.

  python -m benchmarks.retrieval_speed                        # 5k queries over 25k and 1M
  python -m benchmarks.retrieval_speed --candidates=25000 --block_sizes=4096,8192,16384
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('d', 768, 'embedding width')
flags.DEFINE_integer('queries', 5000, 'number of queries')
flags.DEFINE_list('candidates', ['25000', '1000000'], 'candidate pool sizes')
flags.DEFINE_integer('k', 10, 'neighbours per query')
flags.DEFINE_list('block_sizes', ['8192'], 'candidate block sizes to try for the JAX kernel')
flags.DEFINE_list('query_block_sizes', ['1024'], 'query block sizes to try')
flags.DEFINE_integer('group_size', 32, 'group size of the exact two-stage block selection')
flags.DEFINE_integer('repeats', 1, 'timed repeats per method (best is reported)')
flags.DEFINE_bool('faiss', True, 'also time faiss-cpu IndexFlatIP')
flags.DEFINE_bool('check', True, 'check that both return the same ids (up to near-ties)')
flags.DEFINE_integer('seed', 0, 'data seed')


def _data(n, d, seed):
  import numpy as np
  rng = np.random.default_rng(seed)
  x = np.empty((n, d), np.float32)
  step = 100_000
  for s in range(0, n, step):  # chunked to keep the float64 temporaries small
    blk = rng.standard_normal((min(step, n - s), d), dtype=np.float32)
    x[s:s + blk.shape[0]] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
  return x


def _best(fn, repeats):
  best = None
  out = None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    best = dt if best is None else min(best, dt)
  return best, out


def main(argv):
  del argv
  import jax
  import numpy as np
  from sae_jax import retrieval

  q = _data(FLAGS.queries, FLAGS.d, FLAGS.seed)
  for nc_s in FLAGS.candidates:
    nc = int(nc_s)
    c = _data(nc, FLAGS.d, FLAGS.seed + 1)
    t = time.perf_counter()
    qj = jax.device_put(q)
    cj = jax.block_until_ready(jax.device_put(c))
    put_s = time.perf_counter() - t
    faiss_qps = None
    faiss_ids = None
    faiss_add_s = None
    if FLAGS.faiss:
      import faiss
      index = faiss.IndexFlatIP(FLAGS.d)
      t = time.perf_counter()
      index.add(c)
      faiss_add_s = time.perf_counter() - t
      dt, (fs, fi) = _best(lambda: index.search(q, FLAGS.k), FLAGS.repeats)
      faiss_qps = FLAGS.queries / dt
      faiss_ids, faiss_scores = fi, fs
      del index
    for bs in FLAGS.block_sizes:
      for qbs in FLAGS.query_block_sizes:
        kw = dict(block_size=int(bs), query_block_size=int(qbs), group_size=FLAGS.group_size,
                  normalize=False)
        # Warm-up compiles the same shapes (query blocks and candidate blocks are identical).
        jax.block_until_ready(retrieval.topk_search(qj[:int(qbs)], cj, FLAGS.k, **kw))
        run = lambda: jax.block_until_ready(retrieval.topk_search(qj, cj, FLAGS.k, **kw))
        dt, (js, ji) = _best(run, FLAGS.repeats)
        rec = {
            'case': f'top{FLAGS.k} d={FLAGS.d} {FLAGS.queries} queries x {nc} candidates',
            'n_queries': FLAGS.queries, 'n_candidates': nc, 'd': FLAGS.d, 'k': FLAGS.k,
            'jax_qps': round(FLAGS.queries / dt, 1), 'jax_s': round(dt, 3),
            'faiss_qps': None if faiss_qps is None else round(faiss_qps, 1),
            'ratio_jax_over_faiss': None if faiss_qps is None else round(FLAGS.queries / dt / faiss_qps, 3),
            'block_size': int(bs), 'query_block_size': int(qbs), 'group_size': FLAGS.group_size,
            'jax_put_s': round(put_s, 3), 'faiss_add_s': None if faiss_add_s is None else round(faiss_add_s, 3),
            'backend': jax.default_backend(), 'devices': len(jax.devices()),
            'cpu_count': os.cpu_count(), 'machine': platform.processor() or platform.machine(),
        }
        if FLAGS.check and faiss_ids is not None:
          ji = np.asarray(ji)
          js = np.asarray(js)
          same = ji == faiss_ids
          # A mismatch is acceptable only where the two scores are within float32 rounding.
          near = np.abs(js - faiss_scores) <= 1e-5
          rec['ids_equal_frac'] = round(float(same.mean()), 6)
          rec['mismatch_outside_ties'] = int(np.sum(~same & ~near))
          rec['max_abs_score_diff'] = float(np.max(np.abs(js - faiss_scores)))
        print(json.dumps(rec), flush=True)
    del cj, c


if __name__ == '__main__':
  app.run(main)
