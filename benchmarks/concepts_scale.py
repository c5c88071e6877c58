"""The concepts stage at dictionary scale: its statistics and pages from the codes vs a brute-force peer.

  python -m benchmarks.concepts_scale                                  # c=32768, N=100k, k=50
  python -m benchmarks.concepts_scale --c=8192 --n=20000 --peer        # + the dense argsort peer

On random Top-k-like codes of N matched pairs (`benchmarks.metrics_scale.make_problem`; 5 captions
per image), 1% sets drawn from random scores and 7 random attributes of 8 values per pair, it times
`concepts.concept_statistics` (sparse columns, streaming top rows of every concept, A- over one
derangement, AUROC labels, nearest concepts of the carded ones) and `concepts_html.write_pages`
(index of c rows, one card with a histogram per carded concept; no thumbnails: no image files).
The encoding is not timed: the stage reads the analysis' codes (analysis.save_codes) when present.
`--peer`: the top rows by a dense [N, c] matrix and a per-column stable argsort, same run; the two
must agree. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _attributes(n: int, rng) -> dict:
  from sae_jax.stages.concepts import Attribute

  out = {}
  for a in range(7):
    labels = rng.random((n // 5, 8)) < 0.2
    out[f"attr{a}"] = Attribute([str(v) for v in range(8)], np.repeat(labels, 5, axis=0)[:n], "pair")
  return out


def run(c: int, n: int, k: int, d: int, peer: bool) -> dict:
  from benchmarks.metrics_scale import make_problem
  from configs import base
  from sae_jax import concept_stats
  from sae_jax.stages import concepts, concepts_html

  D, image, text = make_problem(c, d, k, n)
  rng = np.random.default_rng(1)
  image_ids = np.repeat(np.arange((n + 4) // 5), 5)[:n]
  image = (image[0][image_ids * 5], image[1][image_ids * 5])  # an image repeats once per caption
  conc = {key: rng.random(c) for key in ("energy", "modality_score", "bridge_score", "attribution")}
  sets = {
    name: np.sort(rng.choice(c, max(1, c // 100), replace=False)) for name in ("S_E", "S_A", "S_B", "removed")
  }
  ccfg = base.concepts_section()
  attrs = _attributes(n, rng)
  t0 = time.perf_counter()
  result = concepts.concept_statistics(ccfg, D, (image, text), image_ids, conc, sets, attrs)
  t_stats = time.perf_counter() - t0
  rows = concepts.Rows(np.array([f"caption {i}" for i in range(n)]), image_ids, {})
  with tempfile.TemporaryDirectory() as tmp:
    t1 = time.perf_counter()
    summary = concepts_html.write_pages(os.path.join(tmp, "concepts"), ccfg, result, rows, D)
    t_pages = time.perf_counter() - t1
  out = {
    "bench": "concepts_scale",
    "c": c,
    "n_pairs": n,
    "k": k,
    "cards": summary["n_cards"],
    "label_columns": 7 * 8 * 3 + 2,
    "statistics_s": round(t_stats, 2),
    "pages_s": round(t_pages, 2),
    "total_s": round(t_stats + t_pages, 2),
    "parts_s": {key: round(v, 2) for key, v in result["seconds"].items()},
    "loadavg": os.getloadavg()[0],
  }
  if peer:
    t2 = time.perf_counter()
    ours = concept_stats.top_rows(*text, c, int(ccfg.n_top))
    t_ours = time.perf_counter() - t2
    t3 = time.perf_counter()
    dense = np.zeros((n, c), np.float32)
    np.add.at(dense, (np.repeat(np.arange(n), k), text[1].ravel()), text[0].ravel())
    top = np.argsort(-dense, axis=0, kind="stable")[: int(ccfg.n_top)].T  # ties: the lower row first
    t_peer = time.perf_counter() - t3
    vals = np.take_along_axis(dense.T, top, 1)
    agree = bool(np.all((ours.rows == top) | ((vals <= 0) & (ours.rows < 0))))
    out.update(top_rows_ours_s=round(t_ours, 2), top_rows_argsort_peer_s=round(t_peer, 2), agree=agree)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--c", type=int, default=32768)
  p.add_argument("--n", type=int, default=100_000)
  p.add_argument("--k", type=int, default=50)
  p.add_argument("--d", type=int, default=256, help="decoder width (only the nearest concepts use it)")
  p.add_argument("--peer", action="store_true", help="also the dense argsort peer (needs 4 N c bytes)")
  a = p.parse_args()
  print(json.dumps(run(a.c, a.n, a.k, a.d, a.peer)), flush=True)


if __name__ == "__main__":
  main()
