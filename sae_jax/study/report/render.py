"""The report document: the figures (drawn into report/figures/), report.md assembled from the
tables and findings, and report.html rendered from it by markdown-it-py with every figure embedded
as a base64 PNG, so the page stands alone."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from typing import Any

import numpy as np
from markdown_it import MarkdownIt

from sae_jax.plots import analysis as plot_a
from sae_jax.plots import retrieval as plot_r
from sae_jax.study import layout as study
from sae_jax.study.report import findings, tables

FIGURES_DIR = "figures"  # report.md links the figures relative to itself: figures/<name>.png
# CommonMark with GitHub tables; raw HTML off, so a "<" in the text is printed, not parsed.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
_STYLE = (
  "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
  "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:14px}"
  "img{max-width:100%;border:1px solid #ddd}"
)


def concept_runs(data: dict, workdir: str) -> list:
  """Figures 2 and 3's input: one run per model (its main SAE's concepts.npz), in the report's order."""
  runs = []
  for name, m in data["models"].items():
    with np.load(
      os.path.join(study.sae_workdir(workdir, name), "analysis", "concepts.npz"), allow_pickle=False
    ) as z:
      ms = np.asarray(z["modality_score"], np.float64)
      if bool(z["modality_reverse"]):
        ms = 1.0 - ms
      runs.append({"name": m["label"], "energy": np.asarray(z["energy"]), "modality_score": ms})
  return runs


def draw_figures(data: dict, workdir: str, fig_dir: str) -> list:
  """(caption, file name) of every figure, drawn into fig_dir."""
  os.makedirs(fig_dir, exist_ok=True)
  runs = concept_runs(data, workdir)
  fraction = next(iter(data["models"].values()))["settings"]["top_fraction"]
  figs = []
  plot_a.plot_modality_kde(runs, os.path.join(fig_dir, "fig2_modality_kde.png"))
  figs.append(("Figure 2: modality score of the concepts (test pairs)", "fig2_modality_kde.png"))
  plot_a.plot_cumulative_energy(runs, os.path.join(fig_dir, "fig3_cumulative_energy.png"), fraction)
  figs.append(("Figure 3: cumulative energy over concepts ranked by energy", "fig3_cumulative_energy.png"))
  labels = {t: tables.task_label(t, data["dataset"]) for t in tables.TASK_ARROWS}
  for name, m in data["models"].items():
    res = m["retrieval"]
    if any("mean_no_image" in by or "mean_no_prompt" in by for by in res.values()):
      f = f"fig4_masking_{name}.png"
      plot_r.fig_masking(res, os.path.join(fig_dir, f), task_labels=labels)
      figs.append((f"Figure 4 ({m['label']}): image / prompt token positions masked before mean pooling", f))
  composed = {
    m["label"]: m["tasks"][tables.COMPOSED_TASK]
    for m in data["models"].values()
    if any(v in m.get("tasks", {}).get(tables.COMPOSED_TASK, {}) for v in ("mean_no_image", "mean_no_prompt"))
  }
  if composed:
    f = "fig4_masking_composed.png"
    plot_r.fig_masking(
      composed,
      os.path.join(fig_dir, f),
      task_labels={lab: lab for lab in composed},
      title=f"Composed task {tables.task_label(tables.COMPOSED_TASK, data['dataset'])}: token positions masked before "
      "mean pooling (paper Figure 4)",
    )
    figs.append(
      (
        "Figure 4 (composed task, every generative model): image / prompt token positions masked before "
        "mean pooling; error bars: 95% bootstrap intervals over queries",
        f,
      )
    )
  for name, m in data["models"].items():
    sw = m["rank_sweep"]
    if sw:
      f = f"rank_sweep_{name}.png"
      plot_r.fig_rank_sweep(
        sw,
        os.path.join(fig_dir, f),
        title=f"{m['label']}: {tables.task_label(sw['task'], data['dataset'])}, top {100 * sw['removal_fraction']:g}% ({sw['n_atoms']} atoms)",
      )
      figs.append((f"Removal rank sweep ({m['label']})", f))
  return figs


def render_md(config: Any, data: dict, figs: list) -> str:
  """report.md: settings, what each model learned, findings, Tables 1-3, the figures (`figs`: (caption,
  file name) pairs, linked under figures/) and the wall time of each step."""
  L = [f"# The study on {data['dataset']}", ""]
  if data.get("preset_note"):
    L += [f"**{data['preset_note']}**", ""]
  L += [
    "Every number below is read from the stages' outputs (`<model>/sae/analysis/table1.json`, "
    "`<model>/sae/retrieval/results.json`); `report.json` holds them all.",
    "",
    "## Models and settings",
    "",
  ]
  L += tables.settings_md(data)
  L += ["", "## What each model learned", ""]
  L += [
    "Linear probes of the single object's shape, colour and grid cell from the image embedding "
    "(5-fold logistic regression on the single-object test scenes), beside the majority class:",
    "",
  ]
  L += tables.probes_md(data) + [""]
  for m in data["models"].values():
    L += tables.quality_md(m)
  L += ["## Findings", ""] + [f"- {x}" for x in findings.findings(data)]
  fr = next(iter(data["models"].values()))["settings"]
  L += [
    "",
    f"## Table 1: Jaccard similarity between the top {100 * fr['top_fraction']:g}% concept sets",
    "",
    f"S_E energy, S_A retrieval attribution, S_B bridge score (reduction `{fr['bridge_reduction']}`); "
    "SAEs trained on the train split, metrics on the test pairs.",
    "",
  ]
  L += tables.table1_md(config, data)
  L += tables.concepts_md(data, ("S_E", "S_A", "S_B"), "the top sets")
  L += ["", "## Table 2: Recall@K before and after removing the top-attribution subspace", ""]
  L += tables.table2_md(config, data)
  L += tables.concepts_md(data, ("removed",), "the removed subspace's atoms")
  L += [
    "",
    "## Table 3: last-token vs mean pooling",
    "",
    "R@1 with its 95% bootstrap interval over queries; chance: the R@1 of a random ranking.",
    "",
  ]
  L += tables.table3_md(config, data)
  L += ["", "## Figures", ""]
  for cap, f in figs:
    L += [f"**{cap}**", "", f"![{cap}]({FIGURES_DIR}/{f})", ""]
  secs = {m["label"]: m["seconds"] for m in data["models"].values()}
  L += ["## Wall time per step (s)", "", "```", json.dumps(secs, indent=1), "```", ""]
  return "\n".join(L)


def _embed_figures(tokens: list, fig_dir: str) -> None:
  """Points every image linked under figures/ at its PNG's bytes (a data URI) in place."""
  for token in tokens:
    for child in token.children or ():
      src = str(child.attrGet("src") or "") if child.type == "image" else ""
      if src.startswith(FIGURES_DIR + "/"):
        with open(os.path.join(fig_dir, urllib.parse.unquote(src[len(FIGURES_DIR) + 1 :])), "rb") as f:
          child.attrSet("src", "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii"))


def render_html(md: str, fig_dir: str) -> str:
  """report.md -> one self-contained HTML page: Markdown rendered by markdown-it-py (CommonMark and
  tables), the figures of `fig_dir` embedded as PNG data URIs."""
  tokens = _MARKDOWN.parse(md)
  _embed_figures(tokens, fig_dir)
  body = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
  return (
    "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sae-jax study report</title>"
    f"<style>{_STYLE}</style></head><body>\n{body}</body></html>\n"
  )
