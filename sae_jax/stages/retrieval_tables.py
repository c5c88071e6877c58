"""The retrieval stage's tables and printed summary: Table 2 (removal and its baselines), Table 3
(pooling), the removed concepts' diagnostics table, the stdout lines. Pure formatting of the
results dict that `sae_jax.stages.retrieve` computes (no I/O)."""

from __future__ import annotations

import numpy as np

from sae_jax import retrieval_tasks

SMALL_EVAL = 1000  # queries; below this the tables and the summary say the numbers are not full-size
TABLE3_MISSING = (
  "Not available: no task was evaluated with both the `last_token` and the `mean` variant. Decoder "
  "presets extract both (config.extract.pooling); contrastive models (CLIP, SigLIP2) have one embedding."
)
FIG_MASKING_MISSING = (
  "no mean_no_image / mean_no_prompt variants evaluated; decoder presets extract them with "
  "config.extract.pooling"
)


def _fmt(x) -> str:
  return f"{x:.2f}"


def result_ks(results: dict) -> list[str]:
  """The R@K columns present in `results`, in increasing K (a K some task reports)."""
  ks = {
    int(key[2:])
    for by_var in results.values()
    for r in by_var.values()
    for key in r
    if key.startswith("R@") and key[2:].isdigit()
  }
  return [f"R@{k}" for k in sorted(ks)]


def subset_of(record: dict) -> str:
  """How the queries of a result were chosen, for the tables and the stdout summary."""
  s = record["settings"]
  m = int(s["max_queries"])
  if not m or record["n_queries"] < m:
    return "all"
  mode = str(s["subset"]) if "subset" in s else "first"
  return f"{mode} {m}" + (f" (seed {s['subset_seed']})" if "subset_seed" in s and mode != "first" else "")


def _recall_cells(record: dict, columns: list[str]) -> str:
  # "-": K larger than the task's candidate pool (listed under the table).
  return " | ".join(_fmt(record[c]) if c in record else "-" for c in columns)


def _size_notes(results: dict) -> list[str]:
  notes = []
  dropped = sorted(
    {(t, k) for t, by in results.items() for r in by.values() for k in r.get("ks_dropped", ())}
  )
  for task, k in dropped:
    n = next(iter(results[task].values()))["n_candidates"]
    notes.append(f"R@{k} not reported for {retrieval_tasks.TASKS[task].label}: only {n} candidates.")
  n_min = min((r["n_queries"] for by in results.values() for r in by.values()), default=0)
  if 0 < n_min < SMALL_EVAL:
    notes.append(
      f"Small evaluation set: with {n_min} queries one query moves R@K by {100 / n_min:.1f} points; "
      "these numbers test the pipeline and are not comparable with full-size results."
    )
  return notes


def table2_markdown(results: dict, base: str, description: str) -> str:
  rows = [
    ("Base", base),
    ("Removal", f"{base}+removal"),
    # The other removal_by rules (retrieval.removal_compare), side by side with the paper's.
    ("Removal, top energy", f"{base}+removal_by_energy"),
    ("Removal, top attribution", f"{base}+removal_by_attribution"),
    ("Removal, top |attribution|", f"{base}+removal_by_abs_attribution"),
    ("Removal, top negatives", f"{base}+removal_by_negatives"),
    ("Removal, top margin", f"{base}+removal_by_margin"),
    ("Removal, chosen on validation", f"{base}+removal_selected"),
    ("Whitening (baseline)", f"{base}+whitening"),
    ("Mean-centring (baseline)", f"{base}+center"),
    ("All-but-the-top (baseline)", f"{base}+abtt"),
    ("Oracle removal", f"{base}+oracle_removal"),
  ]
  cols = result_ks(results)
  lines = [
    "# Table 2: Base vs Removal of the attribution subspace (paper Eq. 8-10)",
    "",
    f"Source: {description}",
    "",
    f"| Task | Setting | queries | candidates | subset | {' | '.join(cols)} | ΔR@1 vs base [95% CI] | settings |",
    "|---|---|---:|---:|---|" + "---:|" * len(cols) + "---:|---|",
  ]
  any_row = False
  for task, by_var in results.items():
    for label, v in rows:
      if v in by_var:
        r = by_var[v]
        s = r["settings"]
        note = ", ".join(
          f"{key}={s[key]:.3f}"
          if isinstance(s[key], float) and key.startswith("overlap")
          else f"{key}={s[key]}"
          for key in (
            "selected_on",
            "removal_by",
            "removal_rank",
            "removal_fraction",
            "n_atoms",
            "overlap_with_planted_distractors",
            "abtt_components",
            "fit_on",
            "fit_disjoint",
            "whitening_mode",
            "whitening_alpha",
          )
          if key in s
        )
        lines.append(
          f"| {retrieval_tasks.TASKS[task].label} | {label} | {r['n_queries']} | {r['n_candidates']} | "
          f"{subset_of(r)} | {_recall_cells(r, cols)} | {delta_cell(r)} | {note} |"
        )
        any_row = True
  if not any_row:
    lines.append(f"| (no base variant evaluated) |{' |' * (len(cols) + 6)}")
  if not any(f"{base}+removal" in v for v in results.values()):
    lines += ["", "Removal not run: no SAE checkpoint and no analysis/concepts.npz for the attribution."]
  notes = _size_notes(results)
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def delta_cell(record: dict, key: str = "R@1") -> str:
  """ "+3.10 [+1.20, +5.00]" (paired bootstrap, `*` when the interval excludes 0), or "-"."""
  d = record.get("delta_vs_base", {})
  if key not in d:
    return "-"
  lo, hi = d[f"{key}_ci95"]
  star = "*" if lo > 0 or hi < 0 else ""
  return f"{d[key]:+.2f} [{lo:+.2f}, {hi:+.2f}]{star}"


DIAGNOSTIC_COLUMNS = ("energy", "modality_score", "bridge", "attribution", "negatives", "margin")


def removal_concepts_markdown(diagnostics: dict, removed: dict) -> str:
  """One row per removed concept of each removal (`removed`: {projector name: [concept ids]}) with its
  scores (`diagnostics`: {name: [c]}), and each score's rank among all c concepts (1 = highest)."""
  cols = [c for c in DIAGNOSTIC_COLUMNS if c in diagnostics]
  c = len(next(iter(diagnostics.values())))
  ranks = {}
  for col in cols:
    x = np.nan_to_num(np.asarray(diagnostics[col], np.float64), nan=-np.inf)
    ranks[col] = np.empty(c, np.int64)
    ranks[col][np.lexsort((np.arange(c), -x))] = np.arange(1, c + 1)
  lines = [
    "# Removed concepts: their scores (and rank among all concepts)",
    "",
    f"{c} concepts. modality_score: 1 = text-only (Eq. 4); bridge: B_ii (Eq. 5); attribution: A⁺ (Eq. 6, "
    "matched pairs); negatives: A⁻ (unmatched pairs); margin: 2A⁻ − A⁺ (README, equation table).",
    "",
    f"| Removal | concept | {' | '.join(cols)} |",
    "|---|---:|" + "---:|" * len(cols),
  ]
  for name, atoms in removed.items():
    for a in atoms:
      cells = " | ".join(f"{diagnostics[col][a]:.4g} ({ranks[col][a]})" for col in cols)
      lines.append(f"| {name} | {a} | {cells} |")
  return "\n".join(lines) + "\n"


def table3_markdown(results: dict) -> str:
  """Last token vs mean pooling per task that has both; otherwise says what is missing."""
  cols = result_ks(results)
  both = [t for t, by in results.items() if "last_token" in by and "mean" in by]
  lines = ["# Table 3: last token vs mean pooling", ""]
  if not both:
    return "\n".join(lines + [TABLE3_MISSING]) + "\n"
  lines += [
    f"| Task | Setting | queries | candidates | subset | {' | '.join(cols)} |",
    "|---|---|---:|---:|---|" + "---:|" * len(cols),
  ]
  for task in both:
    for label, v in (("Last token", "last_token"), ("Mean pooling", "mean")):
      r = results[task][v]
      lines.append(
        f"| {retrieval_tasks.TASKS[task].label} | {label} | {r['n_queries']} | {r['n_candidates']} | "
        f"{subset_of(r)} | {_recall_cells(r, cols)} |"
      )
  notes = _size_notes({t: results[t] for t in both})
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def summary_lines(results: dict, base: str, out_dir: str, written: list[str], seconds: float) -> list[str]:
  """What the retrieval main prints: where the outputs are, R@1 per task and setting, the sizes."""
  lines = [f"retrieval: wrote {out_dir}/ ({', '.join(written)}) in {seconds:.1f} s"]
  settings = (("base", base), ("removal", f"{base}+removal"), ("whitening", f"{base}+whitening"))
  for task, by_var in results.items():
    r0 = next(iter(by_var.values()))
    shown = [f"{label} {by_var[v]['R@1']:.2f}" for label, v in settings if v in by_var]
    lines.append(
      f"  {task}: {r0['n_queries']} queries x {r0['n_candidates']} candidates ({subset_of(r0)}); "
      f"R@1 {' | '.join(shown) if shown else '(no base variant)'}"
    )
  lines += [f"  note: {n}" for n in _size_notes(results)]
  if "fig_masking.png" not in written:
    lines.append(f"  fig_masking.png: skipped ({FIG_MASKING_MISSING})")
  if not any("last_token" in by and "mean" in by for by in results.values()):
    lines.append("  table3.md: no last_token / mean pair to compare (see the file)")
  return lines
