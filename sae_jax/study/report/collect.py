"""Reading the study's outputs: every number the report prints, from each model's stage JSON
(steps.json, sae/analysis/table1.json and concepts.npz, sae/retrieval/{results,rank_sweep}.json,
the other SAE seeds' table1.json, tasks/results.json, sae/concepts/summary.json), gathered into one dict (report.json) whose
paths inside the workdir are relative to it."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from sae_jax import config_utils, metrics
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.study import layout as study

GENERATIVE_FAMILIES = ("qwen_vl", "paligemma", "chameleon")
TABLE1_KEYS = ("J(S_E,S_A)", "J(S_E,S_B)", "J(S_A,S_B)", "triple_overlap")


def _load_json(path: str) -> Any:
  if not os.path.exists(path):
    raise SaeJaxError(
      f"{path} is missing: the study step that writes it has not run (re-run experiments.study)"
    )
  with open(path) as f:
    return json.load(f)


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


def _concepts(sae_dir: str) -> Optional[dict]:
  """The concepts step's composition of each set and its index page (None before the step ran)."""
  path = os.path.join(sae_dir, "concepts", "summary.json")
  if not os.path.exists(path):
    return None
  s = _load_json(path)
  return {
    "composition": s["composition"],
    "composition_lines": s["composition_lines"],
    "n_cards": s["n_cards"],
    "truth": s["truth"],
    "index": os.path.join(sae_dir, "concepts", "index.html"),
  }


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
      "concepts": _concepts(sae_dir),
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
