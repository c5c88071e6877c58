"""Figures of the retrieval stage: Figure 4 (masking ablation bars) and the removal rank sweep."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sae_jax.workdir import atomic_savefig  # noqa: E402

MASK_VARIANTS = (("mean", "Base"), ("mean_no_image", "w/o image"), ("mean_no_prompt", "w/o prompt"))


def fig_masking(
  results: Mapping,
  path: str,
  tasks: Sequence[str] | None = None,
  variants: Sequence[tuple[str, str]] = MASK_VARIANTS,
  metrics: Sequence[str] = ("R@1", "R@5", "R@10"),
  task_labels: Mapping | None = None,
):
  """Paper Figure 4: per task, grouped bars of Recall@K for Base / w/o image / w/o prompt.

  Variants missing from `results` are left out of the legend (the title says which ones are).
  Returns the list of (task, variant) pairs drawn.
  """
  tasks = [t for t in (tasks or list(results)) if t in results]
  masked = [t for t in tasks if any(v in results[t] for v, _ in variants[1:])]
  # Tasks with a masking ablation (the paper shows CIRR and OVEN); else every task with a base.
  tasks = masked or [t for t in tasks if any(v in results[t] for v, _ in variants)]
  drawn = []
  n = max(1, len(tasks))
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    present = [(v, lab) for v, lab in variants if v in results[task]]
    width = 0.8 / max(1, len(present))
    x = np.arange(len(metrics))
    for j, (v, lab) in enumerate(present):
      vals = [results[task][v][m] for m in metrics]
      bars = ax.bar(x + (j - (len(present) - 1) / 2) * width, vals, width, label=lab)
      ax.bar_label(bars, fmt="%.1f", fontsize=7)
      drawn.append((task, v))
    ax.set_xticks(x, metrics)
    ax.set_ylabel("Recall (%)")
    ax.set_title((task_labels or {}).get(task, task), fontsize=9)
    ax.legend(fontsize=8)
  if not tasks:
    axes[0][0].text(0.5, 0.5, "no masking variants evaluated", ha="center", va="center")
    axes[0][0].set_axis_off()
  fig.suptitle(
    "Retrieval with token positions masked before mean pooling (paper Figure 4): "
    "Base / w/o image / w/o prompt",
    fontsize=10,
  )
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  atomic_savefig(fig, path, dpi=120)
  plt.close(fig)
  return drawn


def fig_rank_sweep(sweep: Mapping, path: str, title: str = ""):
  """Recall@K against the removal rank r (r = 0 is the base embedding)."""
  ranks = [int(r) for r in sweep["ranks"]]
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for m in sweep["metrics"]:
    ax.plot(ranks, sweep["metrics"][m], marker="o", label=m)
  if sweep.get("oracle"):
    for j, (m, val) in enumerate(sweep["oracle"].items()):
      ax.axhline(val, ls="--", lw=0.8, color="gray", label="oracle" if j == 0 else None)
  ax.set_xlabel("removal rank r")
  ax.set_ylabel("Recall (%)")
  ax.set_title(
    "Removing the top right singular vectors of the high-attribution atoms (Eq. 8-10)\n" + title, fontsize=9
  )
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  atomic_savefig(fig, path, dpi=120)
  plt.close(fig)
