"""Figures of the paper's Section 3: modality-score KDE (Figure 2), cumulative energy (Figure 3).

Both take plain arrays, one entry per run, so several SAEs (models) can be drawn side by side.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from sae_jax import metrics  # noqa: E402
from sae_jax.workdir import atomic_savefig  # noqa: E402

IMAGE_COLOR = "#2b6cb0"
TEXT_COLOR = "#c53030"


def reflected_kde(scores: np.ndarray, grid: np.ndarray, bandwidth: Optional[float] = None) -> np.ndarray:
  """Gaussian KDE on [0, 1] with reflection at both ends, so mass piled at 0 (image-only) and
  1 (text-only) is not smeared outside the score's range. Integrates to 1 over [0, 1]."""
  s = np.asarray(scores, np.float64)
  s = s[np.isfinite(s)]
  if s.size == 0:
    return np.zeros_like(grid)
  if s.size == 1 or np.ptp(s) == 0:
    s = s + np.random.default_rng(0).normal(0, 1e-3, s.shape)  # degenerate: a narrow bump
  kde = gaussian_kde(s, bw_method=bandwidth)
  return kde(grid) + kde(-grid) + kde(2.0 - grid)


def plot_modality_kde(runs: Sequence[dict], path: str, reverse: bool = False) -> str:
  """Figure 2. `runs`: dicts with `name`, `modality_score` [c] (NaN = never fires, excluded and
  counted). Scores: 1 = text-only unless `reverse` (then 1 = image-only)."""
  n = max(1, len(runs))
  cols = min(n, 3)
  rows = int(math.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.6 * rows), squeeze=False)
  grid = np.linspace(0.0, 1.0, 401)
  low_label, high_label = ("text", "image") if reverse else ("image", "text")
  low_color, high_color = (TEXT_COLOR, IMAGE_COLOR) if reverse else (IMAGE_COLOR, TEXT_COLOR)
  for ax, run in zip(axes.flat, runs):
    s = np.asarray(run["modality_score"], np.float64)
    finite = s[np.isfinite(s)]
    silent = int(s.size - finite.size)
    dens = reflected_kde(finite, grid)
    low, high = grid <= 0.5, grid >= 0.5
    frac_low = float(np.mean(finite < 0.5)) if finite.size else 0.0
    frac_high = float(np.mean(finite > 0.5)) if finite.size else 0.0
    ax.fill_between(
      grid[low],
      dens[low],
      color=low_color,
      alpha=0.35,
      label=f"{low_label}-dominant (< 0.5): {100 * frac_low:.1f}% of concepts",
    )
    ax.fill_between(
      grid[high],
      dens[high],
      color=high_color,
      alpha=0.35,
      label=f"{high_label}-dominant (> 0.5): {100 * frac_high:.1f}% of concepts",
    )
    ax.plot(grid, dens, color="black", lw=1.2)
    ax.axvline(0.5, color="gray", ls="--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.1 * max(float(dens.max()), 1e-9))
    ax.set_title(
      f"{run['name']}\n{finite.size} concepts scored; {silent} never fire{'s' if silent == 1 else ''} (excluded)",
      fontsize=10,
    )
    ax.set_xlabel(f"Modality score (0 = {low_label}-only, 1 = {high_label}-only)")
    ax.set_ylabel("Density (KDE)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
  for ax in list(axes.flat)[len(runs) :]:
    ax.set_visible(False)
  fig.suptitle("Distribution of concept modality scores (paper Figure 2)", fontsize=12)
  fig.tight_layout()
  atomic_savefig(fig, path, dpi=130)
  plt.close(fig)
  return path


def cumulative_energy(energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(rank fraction in (0, 1], cumulative share of total energy) with concepts sorted by energy."""
  e = np.sort(np.asarray(energy, np.float64))[::-1]
  total = e.sum()
  cum = np.cumsum(e) / total if total > 0 else np.zeros_like(e)
  return np.arange(1, e.size + 1) / e.size, cum


def draw_cumulative_energy(runs: Sequence[dict], top_fraction: float = 0.01) -> matplotlib.figure.Figure:
  """Figure 3. `runs`: dicts with `name` and `energy` [c]; dictionaries of different sizes share
  the x axis as the fraction of the dictionary. Each curve carries a marker where its "top set
  holds X%" is measured: at m = ceil(top_fraction * c) concepts (the Table 1 set size), which is
  not exactly `top_fraction` of the dictionary when c * top_fraction is not whole."""
  fig, ax = plt.subplots(figsize=(7.0, 4.6))
  for run in runs:
    x, y = cumulative_energy(run["energy"])
    m = metrics.top_fraction_size(top_fraction, x.size)
    (line,) = ax.plot(
      100 * x,
      100 * y,
      lw=1.8,
      label=f"{run['name']} (c={x.size}): top {m} concepts (ceil {100 * top_fraction:g}%) hold {100 * y[m - 1]:.1f}%",
    )
    ax.plot(
      [100 * x[m - 1]],
      [100 * y[m - 1]],
      marker="o",
      ms=6,
      color=line.get_color(),
      ls="none",
      gid="top_set_marker",
    )
  ax.set_xscale("log")
  ax.set_xlim(left=min(100 * top_fraction / 10, 100 / max(len(r["energy"]) for r in runs)), right=100)
  ax.set_ylim(0, 101)
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
  ax.set_xlabel("Concept rank by energy (% of dictionary, log scale)")
  ax.set_ylabel("Cumulative share of total energy (%)")
  ax.set_title(
    "Cumulative energy across concept ranks (paper Figure 3)\nmarker: the top set of Table 1", fontsize=10
  )
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  return fig


def plot_cumulative_energy(runs: Sequence[dict], path: str, top_fraction: float = 0.01) -> str:
  """`draw_cumulative_energy` written to `path` (atomically)."""
  fig = draw_cumulative_energy(runs, top_fraction)
  atomic_savefig(fig, path, dpi=130)
  plt.close(fig)
  return path
