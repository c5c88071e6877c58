"""The report's Markdown tables and their cells: the models' settings, the linear probes, what each
model learned (test-split retrieval, R@1 by decoder layer, answer accuracies, greedy captions),
Table 1 (concept-set overlap), Table 2 (removal), Table 3 (last token vs mean), with the paper's
numbers beside when `config.study.published` holds them; and the task labels they share."""

from __future__ import annotations

from typing import Any, Optional

from sae_jax.stages import retrieval_tables
from sae_jax.study.report import collect

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
CI_KEY = "R@1_ci95"  # the interval every Recall@1 of results.json carries (sae_jax.uncertainty)


def task_label(task: str, dataset: str) -> str:
  """'shapes q_i -> c_t'; a task in the role of another dataset's says so ('(CIRR role)')."""
  paper = PAPER_DATASETS.get(task, dataset)
  role = f" ({paper} role)" if paper not in ("MSCOCO", dataset) else ""
  return f"{dataset} {TASK_ARROWS.get(task, task)}{role}"


def _f(x: Optional[float], nd: int = 2) -> str:
  """A number with `nd` decimals; "-" for one the run did not record."""
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
  """Table 1: each model's concept-set Jaccards, their spread over SAE seeds / pair subsets, the paper's."""
  lines = [
    "| Model | c | set size | J(S_E,S_A) | J(S_E,S_B) | J(S_A,S_B) | Triple overlap |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, m in data["models"].items():
    t = m["table1"]
    lines.append(
      f"| {m['label']} | {t['c']} | {t['set_size']} | "
      + " | ".join(_f(t[k], 4) for k in collect.TABLE1_KEYS)
      + " |"
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
        + " | ".join(f"{sp['mean'][k]:.4f} ± {sp['std'][k]:.4f}" for k in collect.TABLE1_KEYS)
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


def concepts_md(data: dict, sets: tuple, what: str) -> list:
  """Per model, what the concept sets `sets` are made of by their labels against the truth (the
  concepts step), with a link to the model's concept browser; [] before that step ran."""
  lines = []
  for name, m in data["models"].items():
    cc = m.get("concepts")
    if not cc:
      continue
    parts = [ln for ln in cc["composition_lines"] if ln.split(":")[0] in sets]
    link = f"[concepts](../{cc['index']})"
    lines.append(f"- {m['label']} ({link}): " + "; ".join(parts or [f"no {what}"]))
  if lines:
    lines = ["", f"Composition of {what} by label against the truth:", ""] + lines
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
  """Table 2: Recall@K of each task's base, removal and baseline variants, with R@1's change vs base."""
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
  """Table 3: last-token vs mean pooling on every task scored both ways, beside chance."""
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


def _pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:.1f}%"


def settings_md(data: dict) -> list:
  """Each model's kind, dimensions and SAE settings, with its SAE's held-out FVU and silent latents."""
  lines = [
    "| Model | kind | d | SAE c | k | AuxK | SAE steps x batch | SAE train rows | test pairs | pooling "
    "| eval FVU | dead (train) | never fire (test) |",
    "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|",
  ]
  for m in data["models"].values():
    s = m["settings"]
    fvu = "" if s["eval_fvu"] is None else f"{s['eval_fvu']:.3f}"
    dead = "" if s.get("dead_fraction") is None else f"{100 * s['dead_fraction']:.1f}%"
    lines.append(
      f"| {m['label']} | {m['kind']} ({m['family']}) | {s['d']} | {s['c']} | {s['k']} | {s['aux_k'] or 'off'} | "
      f"{s['sae_steps']} x {s['sae_batch_size']} | {s['sae_train_rows']} ({s['sae_rows']}) | {s['test_pairs']} | "
      f"{', '.join(s['pooling'])} | {fvu} | {dead} | {100 * s['never_fire_fraction']:.1f}% |"
    )
  return lines


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
