"""The study report: the stages' JSON outputs of every model -> report.md, report.html, report.json.

`write_report(config, workdir)` reads, for each model of `config.study.models`, <workdir>/<name>/
steps.json (model quality, extraction counts), sae/analysis/{table1.json, concepts.npz},
sae/retrieval/{results.json, rank_sweep.json}, sae_seed<s>/analysis/table1.json (the other SAE seeds)
and tasks/results.json (image->image and composed tasks), and writes <workdir>/report/:

  report.md          each model's settings, a quality section per model (what it learned: Recall@1
                     with chance, caption->caption, answer accuracies, greedy captions, a decoder's
                     image->text R@1 at each hidden layer) and the
                     linear probes as a table; Table 1 (main SAE, its spread over the SAE seeds of
                     study.sae_seeds and over pair subsets when analysed), Table 2, Table 3 (last token
                     vs mean on image<->text, image->image and the composed task, R@1 with its 95%
                     interval and chance), Figures 2-4 (Figure 4 also on the composed task) and a
                     findings section generated from the numbers
  report.html        the same, self-contained (figures embedded as base64 PNG)
  report.json        every number the tables print, as read from the stage outputs
  figures/*.png      Fig. 2 (modality KDE) and Fig. 3 (cumulative energy) with all models side by
                     side, Fig. 4 (masking) and the removal-rank sweep per model

The parts:

  collect.py         reading the study's outputs into one dict (report.json), paths made relative
  tables.py          the Markdown tables (settings, probes, what each model learned, Tables 1-3) and
                     their cells and task labels
  findings.py        the findings: sentences from the numbers, only what exceeds its noise
  render.py          the figures, report.md assembled from the parts, report.html through markdown-it-py

When `config.study.published` holds the paper's numbers for a model (configs/study_paper.py), the
tables print them beside the measured ones.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from sae_jax import workdir as workdir_lib
from sae_jax.study.report import collect, findings, render


def write_report(config: Any, workdir: str, log: Callable = print) -> dict:
  """Writes <workdir>/report/{report.md, report.html, report.json, figures/}; returns their paths."""
  out_dir = os.path.join(workdir, "report")
  fig_dir = os.path.join(out_dir, render.FIGURES_DIR)
  data = collect.collect(config, workdir)
  figs = render.draw_figures(data, workdir, fig_dir)
  md = render.render_md(config, data, figs)
  sentences = findings.findings(data)
  paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("md", "html", "json")}
  workdir_lib.atomic_write_json(paths["json"], {**data, "findings": sentences})
  workdir_lib.atomic_write_text(paths["md"], md)
  workdir_lib.atomic_write_text(paths["html"], render.render_html(md, fig_dir))
  log("\n".join(["findings:"] + [f"  {x}" for x in sentences]))
  return {**paths, "figures": [os.path.join(fig_dir, f) for _, f in figs]}
