"""What the retrieval stage writes: the fitted projectors, results.json, Tables 2-3, Figure 4, the
rank sweep and the removed concepts' diagnostics, and the scored embeddings (moved in from a
staging directory, so an interrupted stage leaves none of them)."""

from __future__ import annotations

import os
from typing import Optional

from sae_jax import projectors as projectors_lib
from sae_jax import retrieval_tasks
from sae_jax import workdir as workdir_lib
from sae_jax.plots import retrieval as plots
from sae_jax.stages import retrieval_tables as tables
from sae_jax.stages.retrieval_inputs import Attribution

RESULTS_FILE = "results.json"


def write_embeddings(path: str, data: retrieval_tasks.TaskData) -> None:
  """Queries / candidates exactly as scored plus CSR positives (and `exclude` when set)."""
  arrays = dict(
    queries=data.queries,
    candidates=data.candidates,
    positives_indptr=data.positives_indptr,
    positives_indices=data.positives_indices,
  )
  if data.exclude is not None:
    arrays["exclude"] = data.exclude
  workdir_lib.atomic_savez(path, **arrays)


def _staged_embeddings(staging: Optional[str], out_dir: str) -> None:
  if staging is None:
    return
  for name in sorted(os.listdir(staging)):
    os.replace(os.path.join(staging, name), os.path.join(out_dir, name))


def _remove_stale(path: str) -> None:
  if os.path.exists(path):  # left by an earlier run: it would not match these results
    os.remove(path)


def write_outputs(
  out_dir: str,
  results: dict,
  projectors: dict,
  sweep: Optional[dict],
  base: str,
  description: str,
  staging: Optional[str] = None,
  attribution: Optional[Attribution] = None,
) -> list[str]:
  """Projectors, results.json, Tables 2-3, Figure 4, the rank sweep (when run), the removed concepts'
  diagnostics (table and figure, with an attribution); the scored embeddings are moved in from
  `staging`. Returns the files written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, file in (
    ("removal", "removal_projector.npz"),
    ("removal_selected", "removal_selected_projector.npz"),
    ("whitening", "whitening_projector.npz"),
  ):
    path = os.path.join(out_dir, file)
    if name in projectors:
      projectors[name][0].save(path)
      written.append(file)
    else:
      _remove_stale(path)
  if sweep is not None:
    workdir_lib.atomic_write_json(os.path.join(out_dir, "rank_sweep.json"), sweep, indent=2)
    m, fraction = sweep["n_atoms"], sweep["removal_fraction"]
    plots.fig_rank_sweep(
      sweep,
      os.path.join(out_dir, "rank_sweep.png"),
      title=f"{retrieval_tasks.TASKS[sweep['task']].label}, top {fraction * 100:g}% concepts ({m} atoms)",
    )
    written += ["rank_sweep.json", "rank_sweep.png"]
  else:
    for file in ("rank_sweep.json", "rank_sweep.png"):
      _remove_stale(os.path.join(out_dir, file))
  removed = {
    name: [int(a) for a in proj.info["atoms"]]
    for name, (proj, _) in projectors.items()
    if name.startswith("removal") and isinstance(proj, projectors_lib.Projector)
  }
  diag_files = ("removal_concepts.md", "fig_removal_concepts.png")
  if attribution is not None and removed:
    workdir_lib.atomic_write_text(
      os.path.join(out_dir, diag_files[0]), tables.removal_concepts_markdown(attribution.diagnostics, removed)
    )
    plots.fig_removal_concepts(attribution.diagnostics, removed, os.path.join(out_dir, diag_files[1]))
    written += list(diag_files)
  else:
    for file in diag_files:
      _remove_stale(os.path.join(out_dir, file))
  workdir_lib.atomic_write_json(os.path.join(out_dir, RESULTS_FILE), results, indent=2)
  workdir_lib.atomic_write_text(
    os.path.join(out_dir, "table2.md"), tables.table2_markdown(results, base, description)
  )
  workdir_lib.atomic_write_text(os.path.join(out_dir, "table3.md"), tables.table3_markdown(results))
  written += [RESULTS_FILE, "table2.md", "table3.md"]
  fig = os.path.join(out_dir, "fig_masking.png")
  if plots.masking_tasks(results):
    plots.fig_masking(
      results,
      fig,
      task_labels={t: retrieval_tasks.TASKS[t].label for t in retrieval_tasks.TASKS},
    )
    written.append("fig_masking.png")
  else:
    _remove_stale(fig)
  _staged_embeddings(staging, out_dir)
  return written
