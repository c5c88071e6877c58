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

When `config.study.published` holds the paper's numbers for a model (configs/study_paper.py), the
tables print them beside the measured ones.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from typing import Any, Callable, Optional

import numpy as np

from sae_jax import config_utils, metrics, uncertainty
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.plots import analysis as plot_a
from sae_jax.plots import retrieval as plot_r
from sae_jax.stages import retrieval_tables
from sae_jax.study import layout as study

GENERATIVE_FAMILIES = ("qwen_vl", "paligemma", "chameleon")
TABLE1_KEYS = ("J(S_E,S_A)", "J(S_E,S_B)", "J(S_A,S_B)", "triple_overlap")
PUBLISHED_TABLE1_KEYS = ("J_EA", "J_EB", "J_AB", "triple")  # the same columns in config.study.published
KS = ("R@1", "R@5", "R@10")  # the paper's columns; a K the run did not score shows as "-"
TASK_ARROWS = {
  "image_to_text": "q_i -> c_t",
  "text_to_image": "q_t -> c_i",
  "image_to_image": "q_i -> c_i",
  "image_text_to_image": "(q_i, q_t) -> c_i",
}
# The paper's dataset of each task: its published rows are labelled with it.
PAPER_DATASETS = {
  "image_to_text": "MSCOCO",
  "text_to_image": "MSCOCO",
  "image_to_image": "NIGHTS",
  "image_text_to_image": "CIRR",
}
COMPOSED_TASK = "image_text_to_image"
PROBES = ("shape", "colour", "position")


def _load_json(path: str) -> Any:
  if not os.path.exists(path):
    raise SaeJaxError(
      f"{path} is missing: the study step that writes it has not run (re-run experiments.study)"
    )
  with open(path) as f:
    return json.load(f)


def task_label(task: str, dataset: str) -> str:
  """'shapes q_i -> c_t'; a task in the role of another dataset's says so ('(CIRR role)')."""
  paper = PAPER_DATASETS.get(task, dataset)
  role = f" ({paper} role)" if paper not in ("MSCOCO", dataset) else ""
  return f"{dataset} {TASK_ARROWS.get(task, task)}{role}"


def seed_spread(rows: dict) -> dict:
  """{"n", "mean", "std"} of Table 1's Jaccard columns over `rows` ({seed: Table 1 row}); std is the
  sample standard deviation (ddof=1), 0 for a single seed."""
  vals = {k: np.array([float(r[k]) for r in rows.values()], np.float64) for k in TABLE1_KEYS}
  n = len(rows)
  return {
    "n": n,
    "mean": {k: float(v.mean()) for k, v in vals.items()},
    "std": {k: float(v.std(ddof=1)) if n > 1 else 0.0 for k, v in vals.items()},
  }


def _table1_seeds(config: Any, workdir: str, name: str, steps: dict) -> dict:
  """Table 1 of every SAE seed (config.seed: the main SAE), their mean and std, and each one's FVU."""
  per_seed, fvu = {}, {}
  for seed in study.sae_seeds(config):
    wd = study.sae_seed_workdir(config, workdir, name, seed)
    row = _load_json(os.path.join(wd, "analysis", "table1.json"))["rows"][0]
    per_seed[str(seed)] = {k: float(row[k]) for k in TABLE1_KEYS}
    if seed == int(config.seed):
      fvu[str(seed)] = steps["sae"]["summary"].get("eval_fvu")
    else:
      fvu[str(seed)] = _load_json(os.path.join(wd, study.SEED_SUMMARY)).get("eval_fvu")
  return {"seeds": [int(x) for x in per_seed], "per_seed": per_seed, "eval_fvu": fvu, **seed_spread(per_seed)}


def collect(config: Any, workdir: str) -> dict:
  """Every number the report prints, read from the stage outputs (report.json)."""
  names = config_utils.as_tuple(config.study.models)
  dataset = study.data_paths(config, workdir)["name"]
  models = {}
  for name in names:
    root = os.path.join(workdir, name)
    sae_dir = study.sae_workdir(workdir, name)
    steps = _load_json(os.path.join(root, study.STEPS_FILE))
    t1 = _load_json(os.path.join(sae_dir, "analysis", "table1.json"))
    results = _load_json(os.path.join(sae_dir, "retrieval", "results.json"))
    sweep_path = os.path.join(sae_dir, "retrieval", "rank_sweep.json")
    sweep = _load_json(sweep_path) if os.path.exists(sweep_path) else None
    tasks_path = study.tasks_results(workdir, name)
    tasks = _load_json(tasks_path) if os.path.exists(tasks_path) else {}
    with np.load(os.path.join(sae_dir, "analysis", "concepts.npz"), allow_pickle=False) as z:
      energy = np.asarray(z["energy"], np.float64)
      silent = (np.asarray(z["fire_rate_image"]) == 0) & (np.asarray(z["fire_rate_text"]) == 0)
    fraction = float(t1["fraction"])
    e_sorted = np.sort(energy)[::-1]
    cum = np.cumsum(e_sorted) / max(e_sorted.sum(), 1e-30)
    m_top = metrics.top_fraction_size(fraction, energy.size)
    base = study.base_variant(config, name)
    ms = study.model_settings(config, name)
    sae_cfg = workdir_lib.read_config(sae_dir)
    models[name] = {
      "label": str(ms.label),
      "source": str(ms.source),
      "family": steps["extract_train"]["summary"]["family"],
      "kind": "generative"
      if steps["extract_train"]["summary"]["family"] in GENERATIVE_FAMILIES
      else "contrastive",
      "quality": steps["model"]["summary"],
      "seconds": {k: v["seconds"] for k, v in steps.items()},
      "settings": {
        "d": int(steps["extract_train"]["summary"]["d"]),
        "c": int(sae_cfg.sae_spec.c),
        "k": int(sae_cfg.sae_spec.k),
        "sae_preset": str(sae_cfg.sae.preset),
        "sae_steps": int(sae_cfg.train.num_steps),
        "sae_batch_size": int(sae_cfg.data.batch_size),
        "sae_train_rows": int(_load_json(os.path.join(sae_cfg.data.shard_dir, "index.json"))["total_rows"]),
        "train_images_extracted": int(steps["extract_train"]["summary"]["counts"]["images"]),
        "test_pairs": int(steps["extract_test"]["summary"]["counts"]["pairs"]),
        "pooling": list(config_utils.as_tuple(ms.pooling)),
        "base_variant": base,
        "top_fraction": fraction,
        "bridge_reduction": t1["bridge_reduction"],
        "eval_fvu": steps["sae"]["summary"].get("eval_fvu"),
        # Latents silent for sae.dead_tokens rows at the end of training (AuxK trains them, if on).
        "dead_fraction": steps["sae"]["summary"].get("dead_fraction"),
        "aux_k": int(sae_cfg.sae_spec.aux_k),
        "sae_rows": "embeddings" if base == "embed" else str(config.study.sae_rows),
        # Concepts that fire on none of the analysed test pairs: a dictionary that is mostly silent
        # on its data describes it with far fewer concepts than c.
        "never_fire_fraction": float(silent.mean()),
      },
      "table1": {k: t1["rows"][0][k] for k in ("c", "set_size") + TABLE1_KEYS},
      "table1_seeds": _table1_seeds(config, workdir, name, steps),
      "table1_resampled": t1["rows"][0].get("table1_resampled"),
      "retrieval": results,
      "tasks": tasks,
      # Mean-pooled image->text R@1 at every decoder layer (a workdir from before the step: none).
      "layers": steps["layers"]["summary"] if "layers" in steps else {},
      "rank_sweep": sweep,
      "energy": {
        "top_fraction": fraction,
        "top_share": float(cum[m_top - 1]),
        "concepts_for_half": int(np.searchsorted(cum, 0.5) + 1),
        "c": int(energy.size),
      },
    }
  data = {
    "dataset": dataset,
    "preset_note": str(config.preset_note),
    "models": models,
    "paper_name": str(config.study.paper_name),
  }
  return relative_paths(data, workdir)


def relative_paths(obj: Any, workdir: str) -> Any:
  """`obj` with every string path inside `workdir` made relative to it, so a report (and the stage
  settings it carries) reads the same wherever the study ran."""
  root = os.path.abspath(workdir) + os.sep
  if isinstance(obj, dict):
    return {k: relative_paths(v, workdir) for k, v in obj.items()}
  if isinstance(obj, list):
    return [relative_paths(v, workdir) for v in obj]
  if isinstance(obj, str) and obj.startswith(root):
    return obj[len(root) :]
  return obj


# ------------------------------------------------------------------------------------------ tables


def _f(x: Optional[float], nd: int = 2) -> str:
  return "-" if x is None else f"{x:.{nd}f}"


def _published(config: Any, name: str, *keys) -> Any:
  node = config.study.published
  for k in (name,) + keys:
    if node is None or k not in node:
      return None
    node = node[k]
  return node


def _published_label(config: Any, name: str, m: dict) -> str:
  """The paper's name of the model whose published numbers sit beside model `name`."""
  return str(_published(config, name, "label") or m["label"])


def table1_md(config: Any, data: dict) -> list:
  lines = [
    "| Model | c | set size | J(S_E,S_A) | J(S_E,S_B) | J(S_A,S_B) | Triple overlap |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, m in data["models"].items():
    t = m["table1"]
    lines.append(
      f"| {m['label']} | {t['c']} | {t['set_size']} | " + " | ".join(_f(t[k], 4) for k in TABLE1_KEYS) + " |"
    )
    spreads = []
    sd = m.get("table1_seeds")
    if sd and sd["n"] > 1:
      spreads.append((f"{sd['n']} SAE seeds ({', '.join(str(x) for x in sd['seeds'])}), mean ± std", sd))
    rs = m.get("table1_resampled")
    if rs:
      spreads.append((f"{rs['resamples']} subsets of {rs['pairs_per_resample']} pairs, mean ± std", rs))
    for what, sp in spreads:
      lines.append(
        f"| {m['label']}: {what} | | | "
        + " | ".join(f"{sp['mean'][k]:.4f} ± {sp['std'][k]:.4f}" for k in TABLE1_KEYS)
        + " |"
      )
    pub = _published(config, name, "table1")
    if pub is not None:
      lines.append(
        f"| {_published_label(config, name, m)} (paper) | | | "
        + " | ".join(_f(float(pub[k]), 4) for k in PUBLISHED_TABLE1_KEYS)
        + " |"
      )
  return lines


# (label, variant suffix, key of the published figures or None).
TABLE2_ROWS = (
  ("Base", "", "base"),
  ("Removal", "+removal", "removal"),
  ("Removal, chosen on validation", "+removal_selected", None),
  ("Whitening (baseline)", "+whitening", "whitening"),
  ("All-but-the-top (baseline)", "+abtt", None),
)


def table2_md(config: Any, data: dict) -> list:
  lines = [
    "| Model | Task | Setting | R@1 | R@5 | R@10 | ΔR@1 vs base [95% CI] | settings |",
    "|---|---|---|---:|---:|---:|---:|---|",
  ]
  for name, m in data["models"].items():
    base = m["settings"]["base_variant"]
    for task, by in m["retrieval"].items():
      for label, suffix, published in TABLE2_ROWS:
        v = base + suffix
        if v not in by:
          continue
        r = by[v]
        s = r["settings"]
        note = ", ".join(
          f"{k}={s[k]}"
          for k in (
            "selected_on",
            "removal_by",
            "removal_rank",
            "removal_fraction",
            "n_atoms",
            "abtt_components",
            "whitening_alpha",
          )
          if k in s and (k != "removal_by" or suffix == "+removal_selected")
        )
        note = f"pooling={base}" + (f", {note}" if note else "")
        lines.append(
          f"| {m['label']} | {task_label(task, data['dataset'])} | {label} | "
          + " | ".join(_f(r.get(k)) for k in KS)
          + f" | {retrieval_tables.delta_cell(r)} | {note} |"
        )
        pub = _published(config, name, "table2", task, published) if published else None
        if pub is not None:
          lines.append(
            f"| {_published_label(config, name, m)} (paper) | {task_label(task, 'MSCOCO')} | {label} | "
            + " | ".join(_f(float(x)) for x in pub)
            + " | | published |"
          )
  return lines


def r1_cell(rec: dict) -> str:
  """'12.00 [8.00, 16.00]': R@1 with its 95% bootstrap interval when recorded, else R@1 alone."""
  ci = rec.get(CI_KEY)
  return _f(rec.get("R@1")) + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def table3_tasks(m: dict) -> dict:
  """{task: {variant: record}} of every task with both last-token and mean pooling: image<->text
  (retrieval stage), then image->image and composed (tasks/results.json)."""
  by_task = {**m["retrieval"], **m.get("tasks", {})}
  return {t: by for t, by in by_task.items() if "last_token" in by and "mean" in by}


def table3_md(config: Any, data: dict) -> list:
  lines = [
    "| Model | Task | Setting | R@1 [95% CI] | R@5 | R@10 | chance R@1 |",
    "|---|---|---|---:|---:|---:|---:|",
  ]
  n = 0
  for name, m in data["models"].items():
    for task, by in table3_tasks(m).items():
      for label, v in (("Last token", "last_token"), ("Mean pooling", "mean")):
        r = by[v]
        lines.append(
          f"| {m['label']} | {task_label(task, data['dataset'])} | {label} | {r1_cell(r)} | "
          + " | ".join(_f(r.get(k)) for k in KS[1:])
          + f" | {_f(r.get('chance', {}).get('R@1'))} |"
        )
        n += 1
        pub = _published(config, name, "table3", task, v)
        if pub is not None:
          paper = PAPER_DATASETS.get(task, "MSCOCO")
          lines.append(
            f"| {_published_label(config, name, m)} (paper) | {task_label(task, paper)} | {label} | "
            + " | ".join(_f(float(x)) for x in pub)
            + " | |"
          )
  if not n:
    lines.append("| (no model with both last-token and mean pooling) | | | | | | |")
  return lines


# ---------------------------------------------------------------------------------------- findings


CI_KEY = "R@1_ci95"  # the interval every Recall@1 of results.json carries (sae_jax.uncertainty)


def _ci_text(ci: Optional[list]) -> str:
  return "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _delta_text(rec: dict) -> str:
  """' (+1.20, paired 95% interval [0.40, 2.00])' from a variant's `delta_vs_base`, else ''."""
  d = rec.get("delta_vs_base", {})
  if CI_KEY not in d:
    return ""
  verdict = "" if uncertainty.excludes_zero(d[CI_KEY]) else ", no detectable change"
  return f" ({d['R@1']:+.2f}, paired 95% interval{_ci_text(d[CI_KEY])}{verdict})"


def _retrieval_state(rec: dict) -> str:
  """'above' / 'chance' / 'unknown': whether R@1's interval lies above the chance R@1 of the task."""
  ci, chance = rec.get(CI_KEY), rec.get("chance", {}).get("R@1")
  if ci is None or chance is None:
    return "unknown"
  return "above" if ci[0] > chance else "chance"


def _sae_failed(m: dict) -> Optional[str]:
  """Why the model's SAE cannot carry a Table 1 finding (held-out FVU >= 1), else None."""
  fvu = m["settings"].get("eval_fvu")
  if fvu is not None and fvu >= 1.0:
    return (
      f"its SAE's held-out FVU is {fvu:.2f} (>= 1: it reconstructs no better than the mean), so its "
      "concepts are not a description of the model"
    )
  return None


def findings(data: dict) -> list:
  """Sentences stating what the numbers say, whichever way they come out, and only what exceeds its
  noise: a Recall@1 difference only where the 95% bootstrap intervals (over queries) say so, a model
  at chance compared with nothing, and no Table 1 reading of an SAE that does not reconstruct."""
  ms = data["models"]
  out = []
  task = "image_to_text"
  label = task_label(task, data["dataset"])

  def rec(n, suffix=""):
    m = ms[n]
    return m["retrieval"].get(task, {}).get(m["settings"]["base_variant"] + suffix)

  states = {n: _retrieval_state(rec(n)) for n in ms if rec(n) is not None}
  for n, state in states.items():
    r = rec(n)
    if state == "chance":
      out.append(
        f"Retrieval ({ms[n]['label']}): R@1 {r['R@1']:.2f}{_ci_text(r.get(CI_KEY))} on {label} is at chance "
        f"({r['chance']['R@1']:.2f}): the model's embedding does not retrieve, so it is compared with no "
        "other model (a model at chance is a failure of this study's model, not a result)."
      )
  gen = [n for n in states if ms[n]["kind"] == "generative"]
  con = [n for n in states if ms[n]["kind"] == "contrastive"]
  for g in gen:
    for c in con:
      a, b = rec(g), rec(c)
      if "chance" in (states[g], states[c]):
        continue
      if "unknown" in (states[g], states[c]):
        out.append(
          f"Retrieval: {ms[g]['label']} R@1 {a['R@1']:.2f} vs {ms[c]['label']} {b['R@1']:.2f} on {label}; "
          "no interval or chance level recorded, so no difference is stated."
        )
        continue
      (alo, ahi), (blo, bhi) = a[CI_KEY], b[CI_KEY]
      if ahi < blo or bhi < alo:
        verdict = "worse than" if ahi < blo else "better than"
        ratio = f", {b['R@1'] / a['R@1']:.1f}x lower" if ahi < blo and a["R@1"] > 0 else ""
        out.append(
          f"Retrieval: the generative {ms[g]['label']} retrieves {verdict} the contrastive {ms[c]['label']} "
          f"on {label}: R@1 {a['R@1']:.2f}{_ci_text(a[CI_KEY])} vs {b['R@1']:.2f}{_ci_text(b[CI_KEY])}"
          f" (95% intervals do not overlap{ratio})."
        )
      else:
        out.append(
          f"Retrieval: no detectable difference between the generative {ms[g]['label']} and the contrastive "
          f"{ms[c]['label']} on {label}: R@1 {a['R@1']:.2f}{_ci_text(a[CI_KEY])} vs "
          f"{b['R@1']:.2f}{_ci_text(b[CI_KEY])} (the 95% intervals overlap)."
        )
  for n, m in ms.items():
    e = m["energy"]
    why = _sae_failed(m)
    if why:
      out.append(f"Energy and Table 1 ({m['label']}): not interpreted: {why}.")
      continue
    out.append(
      f"Energy ({m['label']}): the top {100 * e['top_fraction']:g}% of concepts ({m['table1']['set_size']} of "
      f"{e['c']}) carry {100 * e['top_share']:.1f}% of the energy; {e['concepts_for_half']} concepts carry half "
      f"of it ({100 * e['concepts_for_half'] / e['c']:.1f}% of the dictionary)."
    )
  for n, m in ms.items():
    r, b = rec(n), rec(n, "+removal")
    if r is None or b is None:
      continue
    s = b["settings"]
    delta = b.get("delta_vs_base", {})
    w = rec(n, "+whitening")
    wt = f"; the whitening baseline gives {w['R@1']:.2f}{_delta_text(w)}" if w is not None else ""
    head = f"Removal ({m['label']}): removing the top-attribution subspace (rank {s.get('removal_rank')})"
    if CI_KEY not in delta:
      out.append(
        f"{head}: {label} R@1 {r['R@1']:.2f} -> {b['R@1']:.2f}{wt}; no paired interval recorded, so no "
        "change is stated."
      )
    elif uncertainty.excludes_zero(delta[CI_KEY]):
      verb = "helps" if delta["R@1"] > 0 else "hurts"
      out.append(
        f"{head} {verb} {label} R@1: {r['R@1']:.2f} -> {b['R@1']:.2f} ({delta['R@1']:+.2f}, paired 95% "
        f"interval{_ci_text(delta[CI_KEY])}){wt}."
      )
    else:
      out.append(
        f"{head}: no detectable change of {label} R@1: {r['R@1']:.2f} -> {b['R@1']:.2f} ({delta['R@1']:+.2f}, "
        f"paired 95% interval{_ci_text(delta[CI_KEY])} includes 0){wt}."
      )
  for n, m in ms.items():
    if _sae_failed(m):
      continue
    t = m["table1"]
    size = int(t["set_size"])
    coarse = (
      f" (sets of {size} concepts: a Jaccard moves in steps of {1 / (2 * size):.2f} or more)"
      if size < 21
      else ""
    )
    sd = m.get("table1_seeds")
    spread = (
      f"; over {sd['n']} SAE seeds (mean ± std): J(S_E,S_A) {sd['mean']['J(S_E,S_A)']:.2f} ± "
      f"{sd['std']['J(S_E,S_A)']:.2f}, J(S_E,S_B) {sd['mean']['J(S_E,S_B)']:.2f} ± {sd['std']['J(S_E,S_B)']:.2f}, "
      f"triple overlap {sd['mean']['triple_overlap']:.2f} ± {sd['std']['triple_overlap']:.2f}"
      if sd and sd["n"] > 1
      else ""
    )
    out.append(
      f"Overlap ({m['label']}): J(S_E,S_A) {t['J(S_E,S_A)']:.2f}, J(S_E,S_B) {t['J(S_E,S_B)']:.2f}, "
      f"triple overlap {t['triple_overlap']:.2f}{coarse}{spread}."
    )
  return out


# ----------------------------------------------------------------------------------------- figures


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


def _figures(data: dict, workdir: str, fig_dir: str) -> list:
  """(caption, file name) of every figure, drawn into fig_dir."""
  os.makedirs(fig_dir, exist_ok=True)
  runs = concept_runs(data, workdir)
  fraction = next(iter(data["models"].values()))["settings"]["top_fraction"]
  figs = []
  plot_a.plot_modality_kde(runs, os.path.join(fig_dir, "fig2_modality_kde.png"))
  figs.append(("Figure 2: modality score of the concepts (test pairs)", "fig2_modality_kde.png"))
  plot_a.plot_cumulative_energy(runs, os.path.join(fig_dir, "fig3_cumulative_energy.png"), fraction)
  figs.append(("Figure 3: cumulative energy over concepts ranked by energy", "fig3_cumulative_energy.png"))
  labels = {t: task_label(t, data["dataset"]) for t in TASK_ARROWS}
  for name, m in data["models"].items():
    res = m["retrieval"]
    if any("mean_no_image" in by or "mean_no_prompt" in by for by in res.values()):
      f = f"fig4_masking_{name}.png"
      plot_r.fig_masking(res, os.path.join(fig_dir, f), task_labels=labels)
      figs.append((f"Figure 4 ({m['label']}): image / prompt token positions masked before mean pooling", f))
  composed = {
    m["label"]: m["tasks"][COMPOSED_TASK]
    for m in data["models"].values()
    if any(v in m.get("tasks", {}).get(COMPOSED_TASK, {}) for v in ("mean_no_image", "mean_no_prompt"))
  }
  if composed:
    f = "fig4_masking_composed.png"
    plot_r.fig_masking(
      composed,
      os.path.join(fig_dir, f),
      task_labels={lab: lab for lab in composed},
      title=f"Composed task {task_label(COMPOSED_TASK, data['dataset'])}: token positions masked before "
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
        title=f"{m['label']}: {task_label(sw['task'], data['dataset'])}, top {100 * sw['removal_fraction']:g}% ({sw['n_atoms']} atoms)",
      )
      figs.append((f"Removal rank sweep ({m['label']})", f))
  return figs


# ------------------------------------------------------------------------------------------ writer


def _pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:.1f}%"


def probes_md(data: dict) -> list:
  """Linear probes of the single object's shape / colour / position from each model's image
  embedding (5-fold logistic regression, train_encoder.linear_probes) beside the majority class."""
  head = " | ".join(f"{w} | majority" for w in PROBES)
  lines = [f"| Model | scenes | {head} |", "|---|---:|" + "---:|" * (2 * len(PROBES))]
  for m in data["models"].values():
    p = m["quality"].get("probes")
    if not p:
      lines.append(f"| {m['label']} | - | " + " | ".join("-" for _ in range(2 * len(PROBES))) + " |")
      continue
    cells = []
    for w in PROBES:
      e = p.get(w, {})
      cells += [_pct(e.get("accuracy")), _pct(e.get("majority"))]
    lines.append(f"| {m['label']} | {p['n_scenes']} | " + " | ".join(cells) + " |")
  return lines


def layers_md(m: dict) -> list:
  """The decoder's mean-pooled image->text R@1 layer by layer (study step `layers`), beside chance."""
  lr = m.get("layers") or {}
  if not lr.get("layers"):
    return []
  chance = lr["chance"]["R@1"]
  lines = [
    "",
    f"Mean-pooled image->text R@1 at each hidden layer ({lr['n_queries']} images, {lr['n_candidates']} "
    f"captions; layer 0 is the input embeddings, the last is the one analysed; chance {_f(chance)}):",
    "",
    "| layer | R@1 [95% CI] | x chance |",
    "|---:|---:|---:|",
  ]
  for r in lr["layers"]:
    lines.append(f"| {r['layer']} | {r1_cell(r)} | {r['R@1'] / chance:.1f} |")
  return lines


def quality_md(m: dict) -> list:
  """What one model learned (its model step's quality.json): retrieval R@1 beside chance on the test
  split, caption->caption, and for a generative model its exact answers per mixture task and greedy
  captions beside their references."""
  q = m["quality"]
  lines = [f"### {m['label']}", ""]
  if q.get("role") not in ("contrastive", "generative"):
    return lines + [f"Not trained here ({q.get('source', '')}).", ""]
  pooled = "mean-pooled " if q["role"] == "generative" else ""
  lines.append(
    f"{q.get('architecture', q.get('kind', ''))}, {q.get('parameters', 0):,} parameters, {q.get('steps')} steps in "
    f"{q.get('train_seconds', 0):.0f} s; {pooled}embeddings of {q.get('test_images')} test images and "
    f"{q.get('test_captions', '-')} captions."
  )
  lines += ["", "| Test-split retrieval | R@1 | chance R@1 | x chance |", "|---|---:|---:|---:|"]
  for what, key in (
    ("image -> text", "i2t"),
    ("text -> image", "t2i"),
    ("caption -> caption (same image)", "c2c"),
  ):
    r, c = q.get(f"{key}_R@1"), q.get(f"{key}_chance")
    ratio = f"{r / c:.1f}" if r is not None and c else "-"
    lines.append(f"| {what} | {_pct(r)} | {_pct(c)} | {ratio} |")
  lines += layers_md(m)
  if q["role"] == "generative":
    acc = q.get("answer_accuracy", {})
    mix = q.get("mixture", {})
    if acc:
      lines += ["", "| Mixture task | weight | exact answers (held out) |", "|---|---:|---:|"]
      lines += [
        f"| {t} | {_f(mix.get(t))} | {_pct(acc.get(t))} |"
        for t in list(acc) + [t for t in mix if t not in acc]
      ]
    samples = q.get("samples", [])
    if samples:
      lines += ["", "Greedy captions of test images (generated / references):", ""]
      for x in samples:
        refs = "; ".join(f"“{r}”" for r in x["reference"])
        lines.append(f"- “{x['generated']}” / {refs}")
  return lines + [""]


def render_md(config: Any, data: dict, figs: list) -> str:
  L = [f"# The study on {data['dataset']}", ""]
  if data.get("preset_note"):
    L += [f"**{data['preset_note']}**", ""]
  L += [
    "Every number below is read from the stages' outputs (`<model>/sae/analysis/table1.json`, "
    "`<model>/sae/retrieval/results.json`); `report.json` holds them all.",
    "",
    "## Models and settings",
    "",
    "| Model | kind | d | SAE c | k | AuxK | SAE steps x batch | SAE train rows | test pairs | pooling "
    "| eval FVU | dead (train) | never fire (test) |",
    "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|",
  ]
  for m in data["models"].values():
    s = m["settings"]
    fvu = "" if s["eval_fvu"] is None else f"{s['eval_fvu']:.3f}"
    dead = "" if s.get("dead_fraction") is None else f"{100 * s['dead_fraction']:.1f}%"
    L.append(
      f"| {m['label']} | {m['kind']} ({m['family']}) | {s['d']} | {s['c']} | {s['k']} | {s['aux_k'] or 'off'} | "
      f"{s['sae_steps']} x {s['sae_batch_size']} | {s['sae_train_rows']} ({s['sae_rows']}) | {s['test_pairs']} | "
      f"{', '.join(s['pooling'])} | {fvu} | {dead} | {100 * s['never_fire_fraction']:.1f}% |"
    )
  L += ["", "## What each model learned", ""]
  L += [
    "Linear probes of the single object's shape, colour and grid cell from the image embedding "
    "(5-fold logistic regression on the single-object test scenes), beside the majority class:",
    "",
  ]
  L += probes_md(data) + [""]
  for m in data["models"].values():
    L += quality_md(m)
  L += ["## Findings", ""] + [f"- {x}" for x in findings(data)]
  fr = next(iter(data["models"].values()))["settings"]
  L += [
    "",
    f"## Table 1: Jaccard similarity between the top {100 * fr['top_fraction']:g}% concept sets",
    "",
    f"S_E energy, S_A retrieval attribution, S_B bridge score (reduction `{fr['bridge_reduction']}`); "
    "SAEs trained on the train split, metrics on the test pairs.",
    "",
  ]
  L += table1_md(config, data)
  L += ["", "## Table 2: Recall@K before and after removing the top-attribution subspace", ""]
  L += table2_md(config, data)
  L += [
    "",
    "## Table 3: last-token vs mean pooling",
    "",
    "R@1 with its 95% bootstrap interval over queries; chance: the R@1 of a random ranking.",
    "",
  ]
  L += table3_md(config, data)
  L += ["", "## Figures", ""]
  for cap, f in figs:
    L += [f"**{cap}**", "", f"![{cap}](figures/{f})", ""]
  secs = {m["label"]: m["seconds"] for m in data["models"].values()}
  L += ["## Wall time per step (s)", "", "```", json.dumps(secs, indent=1), "```", ""]
  return "\n".join(L)


def _inline(text: str) -> str:
  t = html.escape(text, quote=False)
  t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
  return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def render_html(md: str, fig_dir: str) -> str:
  """The markdown subset render_md writes -> one self-contained HTML page (PNG as data URIs)."""
  out, rows, in_code, items = [], [], False, []

  def flush():
    nonlocal rows, items
    if rows:
      head, body = rows[0], rows[2:]
      out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
      out.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
      out.append("</table>")
      rows = []
    if items:
      out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
      items = []

  for line in md.splitlines():
    if line.startswith("```"):
      flush()
      out.append("</pre>" if in_code else "<pre>")
      in_code = not in_code
      continue
    if in_code:
      out.append(html.escape(line))
      continue
    if line.startswith("|"):
      rows.append([c.strip() for c in line.strip().strip("|").split("|")])
      continue
    if line.startswith("- "):
      items.append(line[2:])
      continue
    flush()
    img = re.match(r"!\[(.*)\]\(figures/(.+)\)", line)
    if img:
      with open(os.path.join(fig_dir, img.group(2)), "rb") as f:
        b64 = base64.b64encode(f.read()).decode("ascii")
      out.append(f'<img alt="{html.escape(img.group(1))}" src="data:image/png;base64,{b64}">')
    elif line.startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
    elif line.strip():
      out.append(f"<p>{_inline(line)}</p>")
  flush()
  style = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:14px}"
    "img{max-width:100%;border:1px solid #ddd}"
  )
  return (
    f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sae-jax study report</title><style>{style}</style></head><body>\n"
    + "\n".join(out)
    + "\n</body></html>\n"
  )


def write_report(config: Any, workdir: str, log: Callable = print) -> dict:
  """Writes <workdir>/report/{report.md, report.html, report.json, figures/}; returns their paths."""
  out_dir = os.path.join(workdir, "report")
  fig_dir = os.path.join(out_dir, "figures")
  data = collect(config, workdir)
  figs = _figures(data, workdir, fig_dir)
  md = render_md(config, data, figs)
  paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("md", "html", "json")}
  workdir_lib.atomic_write_json(paths["json"], {**data, "findings": findings(data)})
  workdir_lib.atomic_write_text(paths["md"], md)
  workdir_lib.atomic_write_text(paths["html"], render_html(md, fig_dir))
  log("\n".join(["findings:"] + [f"  {x}" for x in findings(data)]))
  return {**paths, "figures": [os.path.join(fig_dir, f) for _, f in figs]}
