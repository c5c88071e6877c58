"""Concept metrics at dictionary scale: sparse streaming (sae_jax.metrics) vs the dense formulation.

  python -m benchmarks.metrics_scale                      # full size + equal-size comparison
  python -m benchmarks.metrics_scale --measure=sparse --c=4096 --d=1024 --n=10000

Each measurement runs in a fresh subprocess (so peak RSS is its own) on random matched pairs:
a unit-norm dictionary D [c, d] and Top-k-like codes (k distinct concepts per row, values in
[0, 1)). It times, from the codes to the numbers, every per-concept metric (energy overall / image /
text, modality score, attribution, bridge diag/row/col/sym) and Table 1 (top-1% sets, Jaccard,
triple overlap); wall time includes jit compilation. The dense formulation builds dense codes
[N, c], M = D D^T, M z for all rows, and B = (Z_iota^T Z_tau / N) * M, as the formulas read.
One JSON line per measurement, then the ratio at equal size and the extrapolation of the dense
formulation to the full size (its cost is c^2 (d + 3N) multiply-adds and 4 (2Nc + 3c^2) bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _current_rss_gib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def make_problem(c: int, d: int, k: int, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  D = np.empty((c, d), np.float32)
  for s in range(0, c, 1024):  # in place, without a second c x d temporary
    block = rng.standard_normal((min(1024, c - s), d), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    D[s : s + block.shape[0]] = block

  def codes():
    idx = rng.integers(0, c, (n, k), dtype=np.int32)
    for _ in range(8):  # redraw repeated concepts in a row (rare) so each row has k distinct ones
      idx.sort(axis=1)
      dup = np.zeros_like(idx, bool)
      dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
      if not dup.any():
        break
      idx[dup] = rng.integers(0, c, int(dup.sum()), dtype=np.int32)
    return rng.random((n, k), dtype=np.float32), idx

  return D, codes(), codes()


def run_sparse(D, image, text, compute_dtype: str) -> dict:
  from sae_jax import metrics

  cm = metrics.compute_concept_metrics(D, image, text, compute_dtype=compute_dtype)
  scores = {r: cm.bridge_score(r) for r in ("diag", "row", "col", "sym")}
  row = metrics.table1(cm.energy, cm.attribution, scores["diag"], 0.01)
  return {"table1": row, "n_silent": cm.n_silent, "checksum_attr": float(cm.attribution.sum())}


def run_dense(D, image, text) -> dict:
  """The formulas as written, with dense codes and explicit M and B (float32 NumPy/BLAS)."""
  from sae_jax import metrics

  c = D.shape[0]
  n = image[0].shape[0]

  def dense(code):
    z = np.zeros((n, c), np.float32)
    np.add.at(z, (np.repeat(np.arange(n), code[0].shape[1]), code[1].reshape(-1)), code[0].reshape(-1))
    return z

  zi, zt = dense(image), dense(text)
  e_img, e_txt = zi.mean(0), zt.mean(0)
  energy = (e_img + e_txt) / 2
  with np.errstate(invalid="ignore", divide="ignore"):
    ms = e_txt / (e_img + e_txt)
  M = D @ D.T
  A = (zi * (zt @ M) + zt * (zi @ M)).mean(0)
  B = (zi.T @ zt / n) * M
  diag, rows, cols = np.diag(B).copy(), B.sum(1), B.sum(0)
  row = metrics.table1(energy, A, diag, 0.01)
  return {
    "table1": row,
    "n_silent": int(np.isnan(ms).sum()),
    "checksum_attr": float(A.sum()),
    "sym_minus_attr": float(np.abs(rows + cols - A).max()),
  }


def worker(args) -> None:
  D, image, text = make_problem(args.c, args.d, args.k, args.n, args.seed)
  inputs = _current_rss_gib()
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  if args.measure == "sparse":
    out = run_sparse(D, image, text, args.compute_dtype)
  elif args.measure == "bridge":
    from sae_jax import metrics

    res = metrics.bridge_blockwise(
      D, image, text, top_k=100, tile=args.tile, compute_dtype=args.compute_dtype
    )
    out = {
      "top_pair": [int(res.pairs_i[0]), int(res.pairs_j[0]), float(res.pairs_value[0])],
      "tile": args.tile,
      "max_reduction_mean": float(res.max_score.mean()),
    }
  else:
    out = run_dense(D, image, text)
  wall = time.perf_counter() - t0
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  warm = {}
  if args.measure == "sparse" and args.warm:  # the same again in this process: jit cache is warm
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    run_sparse(D, image, text, args.compute_dtype)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    warm = {
      "warm_wall_s": round(time.perf_counter() - t1, 3),
      "warm_cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3),
    }
  print(
    json.dumps(
      {
        "measure": args.measure,
        "c": args.c,
        "d": args.d,
        "k": args.k,
        "n": args.n,
        "compute_dtype": args.compute_dtype if args.measure != "dense" else "float32",
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_gib": round(_rss_gib(), 3),
        "inputs_rss_gib": round(inputs, 3),
        **warm,
        **out,
      }
    )
  )


def dense_cost(c: int, d: int, n: int) -> tuple[float, float]:
  """(multiply-adds, bytes of the dense arrays) of the dense formulation."""
  return c * c * (d + 3 * n), 4.0 * (2 * n * c + 3 * c * c)


def spawn(**kw) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.metrics_scale", "--worker"] + [f"--{k}={v}" for k, v in kw.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  if out.returncode != 0:
    raise SystemExit(f"worker {kw} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument(
    "--measure",
    default="all",
    choices=("all", "sparse", "dense", "bridge"),
    help="bridge: blockwise B (top-100 pairs + the `max` reduction), not in `all`",
  )
  p.add_argument("--tile", type=int, default=1024, help="concept rows per B tile (--measure=bridge)")
  p.add_argument("--c", type=int, default=32768)
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--k", type=int, default=50)
  p.add_argument("--n", type=int, default=100_000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--equal", default="8192,2048,20000", help="c,d,N of the equal-size comparison")
  p.add_argument("--check", default="4096,1024,10000", help="c,d,N of a second dense size (scaling check)")
  p.add_argument("--warm", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--also_bf16", action="store_true", help="also time the sparse path with a bf16 D")
  args = p.parse_args()
  if args.worker:
    return worker(args)
  if args.measure != "all":
    print(
      json.dumps(
        spawn(
          measure=args.measure,
          c=args.c,
          d=args.d,
          k=args.k,
          n=args.n,
          seed=args.seed,
          compute_dtype=args.compute_dtype,
          tile=args.tile,
        )
      )
    )
    return
  load = os.getloadavg()[0]
  print(json.dumps({"measure": "host", "cpus": os.cpu_count(), "loadavg_1m": round(load, 2)}), flush=True)
  full = spawn(
    measure="sparse", c=args.c, d=args.d, k=args.k, n=args.n, seed=args.seed, compute_dtype="float32"
  )
  print(json.dumps(full), flush=True)
  if args.also_bf16:
    print(
      json.dumps(
        spawn(
          measure="sparse", c=args.c, d=args.d, k=args.k, n=args.n, seed=args.seed, compute_dtype="bfloat16"
        )
      ),
      flush=True,
    )
  ec, ed, en = (int(x) for x in args.equal.split(","))
  cc, cd, cn = (int(x) for x in args.check.split(","))
  sp_eq = spawn(measure="sparse", c=ec, d=ed, k=args.k, n=en, seed=args.seed, compute_dtype="float32", warm=1)
  print(json.dumps(sp_eq), flush=True)
  de_eq = spawn(measure="dense", c=ec, d=ed, k=args.k, n=en, seed=args.seed)
  print(json.dumps(de_eq), flush=True)
  same = {
    key: abs(sp_eq["table1"][key] - de_eq["table1"][key]) < 1e-12
    for key in ("J(S_E,S_A)", "J(S_E,S_B)", "J(S_A,S_B)", "triple_overlap")
  }
  print(
    json.dumps(
      {
        "measure": "ratio_equal_size",
        "c": ec,
        "d": ed,
        "n": en,
        "dense_over_sparse_wall": round(de_eq["wall_s"] / sp_eq["wall_s"], 2),
        "dense_over_sparse_cpu": round(de_eq["cpu_s"] / sp_eq["cpu_s"], 2),
        "dense_over_sparse_wall_warm_jit": round(de_eq["wall_s"] / sp_eq["warm_wall_s"], 2),
        "dense_over_sparse_peak_rss": round(de_eq["peak_rss_gib"] / sp_eq["peak_rss_gib"], 2),
        "table1_identical": all(same.values()),
        "attribution_sum_rel_diff": abs(sp_eq["checksum_attr"] - de_eq["checksum_attr"])
        / abs(de_eq["checksum_attr"]),
      }
    ),
    flush=True,
  )
  de_ck = spawn(measure="dense", c=cc, d=cd, k=args.k, n=cn, seed=args.seed)
  print(json.dumps(de_ck), flush=True)
  f_eq, b_eq = dense_cost(ec, ed, en)
  f_ck, _ = dense_cost(cc, cd, cn)
  f_full, b_full = dense_cost(args.c, args.d, args.n)
  predicted_ck = de_eq["wall_s"] * f_ck / f_eq
  dense_full = de_eq["wall_s"] * f_full / f_eq
  print(
    json.dumps(
      {
        "measure": "dense_extrapolated_to_full",
        "c": args.c,
        "d": args.d,
        "n": args.n,
        "scaling_check": {
          "c": cc,
          "d": cd,
          "n": cn,
          "measured_s": de_ck["wall_s"],
          "predicted_s": round(predicted_ck, 3),
        },
        "dense_wall_s": round(dense_full, 1),
        "dense_arrays_gib": round(b_full / 2**30, 1),
        "sparse_wall_s": full["wall_s"],
        "sparse_peak_rss_gib": full["peak_rss_gib"],
        "dense_over_sparse_wall": round(dense_full / full["wall_s"], 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
