"""Figures of the retrieval stage: Figure 4 (masking ablation bars), the removal rank sweep and the
removed concepts among all concepts."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from sae_jax.errors import SaeJaxError  # noqa: E402
from sae_jax.workdir import atomic_savefig  # noqa: E402

MASK_VARIANTS = (("mean", "Base"), ("mean_no_image", "w/o image"), ("mean_no_prompt", "w/o prompt"))


def masking_tasks(results: Mapping, variants: Sequence[tuple[str, str]] = MASK_VARIANTS) -> list[str]:
  """Tasks of `results` with at least one masked variant (Figure 4 is drawn only for these)."""
  return [t for t in results if any(v in results[t] for v, _ in variants[1:])]


def draw_masking(
  results: Mapping,
  tasks: Sequence[str] | None = None,
  variants: Sequence[tuple[str, str]] = MASK_VARIANTS,
  metrics: Sequence[str] | None = None,
  task_labels: Mapping | None = None,
  title: str = "Token positions masked before mean pooling (paper Figure 4)",
) -> tuple[matplotlib.figure.Figure, list]:
  """Paper Figure 4: per task with a masked variant, grouped bars of Recall@K for Base / w/o image /
  w/o prompt (`metrics`: default every R@K the results hold, in increasing K; a K a task could not
  report is left out of its panel). Variants missing from `results` are left out. A bar whose
  record holds its interval (`R@K_ci95`) carries it as an error bar.

  Returns (figure, the (task, variant) pairs drawn); raises when no task has a masked variant (an
  empty figure would say nothing: callers check `masking_tasks` first).
  """
  masked = masking_tasks(results, variants)
  tasks = [t for t in (tasks or masked) if t in masked]
  if not tasks:
    raise SaeJaxError("fig_masking: no task has a mean_no_image / mean_no_prompt variant to compare")
  if metrics is None:
    ks = {
      int(m[2:])
      for t in tasks
      for r in results[t].values()
      for m in r
      if m.startswith("R@") and m[2:].isdigit()
    }
    metrics = [f"R@{k}" for k in sorted(ks)]
  drawn = []
  n = len(tasks)
  fig, axes = plt.subplots(1, n, figsize=(max(4.2 * n, 6.0), 3.6), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    present = [(v, lab) for v, lab in variants if v in results[task]]
    shown = [m for m in metrics if all(m in results[task][v] for v, _ in present)]
    width = 0.8 / max(1, len(present))
    x = np.arange(len(shown))
    for j, (v, lab) in enumerate(present):
      rec = results[task][v]
      vals = [rec[m] for m in shown]
      cis = [rec.get(f"{m}_ci95") for m in shown]
      yerr = None
      if shown and all(ci is not None for ci in cis):
        yerr = np.array(
          [
            [max(0.0, val - ci[0]) for val, ci in zip(vals, cis)],
            [max(0.0, ci[1] - val) for val, ci in zip(vals, cis)],
          ]
        )
      bars = ax.bar(
        x + (j - (len(present) - 1) / 2) * width, vals, width, label=lab, yerr=yerr, capsize=2, ecolor="0.3"
      )
      ax.bar_label(bars, fmt="%.1f", fontsize=7)
      drawn.append((task, v))
    ax.set_xticks(x, shown)
    ax.set_ylabel("Recall (%)")
    ax.set_title((task_labels or {}).get(task, task), fontsize=9)
    ax.legend(fontsize=8)
  fig.suptitle(f"{title}\nBase / w/o image / w/o prompt", fontsize=10)
  fig.tight_layout()
  return fig, drawn


def fig_masking(results: Mapping, path: str, **kwargs) -> list:
  """`draw_masking` written to `path` (atomically); returns the (task, variant) pairs drawn."""
  fig, drawn = draw_masking(results, **kwargs)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  atomic_savefig(fig, path, dpi=120)
  plt.close(fig)
  return drawn


def draw_rank_sweep(sweep: Mapping, title: str = "") -> matplotlib.figure.Figure:
  """Recall@K against the removal rank r (r = 0 is the base embedding); dashed lines, one per metric in
  its colour, are the oracle removal of the planted distractors when the sweep has them."""
  ranks = [int(r) for r in sweep["ranks"]]
  fig, ax = plt.subplots(figsize=(5.6, 3.8))
  for m in sweep["metrics"]:
    ax.plot(ranks, sweep["metrics"][m], marker="o", label=m)
  colors = {m: line.get_color() for m, line in zip(sweep["metrics"], ax.get_lines())}
  for m, val in (sweep.get("oracle") or {}).items():
    # The planted distractor subspace removed exactly (synthetic source only), per metric.
    ax.axhline(val, ls="--", lw=0.9, color=colors.get(m, "gray"), label=f"{m}, oracle removal")
  ax.set_xlabel("removal rank r")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # ranks are whole numbers
  ax.set_ylabel("Recall (%)")
  ax.set_title("Recall after removing the top-r attribution directions\n" + title, fontsize=9, wrap=True)
  ax.legend(fontsize=7, ncol=2 if sweep.get("oracle") else 1)
  fig.tight_layout()
  return fig


def fig_rank_sweep(sweep: Mapping, path: str, title: str = "") -> None:
  """`draw_rank_sweep` written to `path` (atomically)."""
  fig = draw_rank_sweep(sweep, title)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  atomic_savefig(fig, path, dpi=120)
  plt.close(fig)


def draw_removal_concepts(diagnostics: Mapping, removed: Mapping) -> matplotlib.figure.Figure:
  """Every concept by what it adds to matched pairs (attribution A⁺, x) and to unmatched pairs
  (negatives A⁻, y; energy, else the concept id, when A⁻ is missing), the concepts of each removal in `removed`
  ({name: [concept ids]}) marked. Distractors sit near the diagonal A⁻ = A⁺, content below it."""
  if "attribution" not in diagnostics:
    raise SaeJaxError(f"removed-concepts figure: no attribution among {sorted(diagnostics)}")
  y_key = next((k for k in ("negatives", "energy") if k in diagnostics), "concept")
  x = np.asarray(diagnostics["attribution"], np.float64)
  y = (
    np.asarray(diagnostics[y_key], np.float64) if y_key != "concept" else np.arange(x.size, dtype=np.float64)
  )
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  ax.scatter(x, y, s=8, c="0.7", label=f"all {x.size} concepts", zorder=1)
  markers = ("o", "s", "^", "D", "v", "P", "X", "*")
  for j, (name, atoms) in enumerate(removed.items()):
    a = np.asarray(atoms, np.int64)
    ax.scatter(
      x[a],
      y[a],
      s=40,
      facecolors="none",
      edgecolors=f"C{j}",
      marker=markers[j % len(markers)],
      label=f"{name} ({a.size})",
      zorder=2,
    )
  if y_key == "negatives":
    lim = [min(x.min(), y.min()), max(x.max(), y.max())]
    ax.plot(lim, lim, ls=":", c="k", lw=0.8, label="A⁻ = A⁺", zorder=0)
  ax.set_xlabel("attribution A⁺ (matched pairs, Eq. 6)")
  ax.set_ylabel(
    {"negatives": "negatives A⁻ (unmatched pairs)", "energy": "energy (Eq. 3)", "concept": "concept id"}[
      y_key
    ]
  )
  ax.set_title("Removed concepts among all concepts")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  return fig


def fig_removal_concepts(diagnostics: Mapping, removed: Mapping, path: str) -> None:
  fig = draw_removal_concepts(diagnostics, removed)
  atomic_savefig(fig, path, dpi=120)
  plt.close(fig)
