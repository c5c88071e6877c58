"""The retrieval stage: Recall@K tables and figures of the paper (Table 2, Table 3, Figure 4).

`run_retrieval(config, workdir)` reads embeddings (the synthetic planted source, or the pooled
embeddings the extraction stage wrote to `<workdir>/activations/pooled_<variant>.npz`), evaluates
every configured task and variant by exact cosine search, applies the attribution-subspace removal
(paper Eq. 8-10) and the shrinkage-whitening baseline to the base variant, sweeps the removal rank,
and writes `<workdir>/retrieval/`:

  results.json        {task: {variant: {"R@1", "R@5", "R@10", "n_queries", "n_candidates", "settings"}}}
  table2.md           Base vs Removal (and the whitening baseline; the oracle on synthetic data)
  table3.md           last-token vs mean pooling
  fig_masking.png     Figure 4: Base / w/o image / w/o prompt per task
  rank_sweep.json/png Recall@K against the removal rank r
  removal_projector.npz, whitening_projector.npz   reusable `retrieval.Projector`s
  embeddings_<task>_<variant>.npz (retrieval.save_embeddings): queries / candidates exactly as
                      scored plus CSR positives, so any result can be checked independently.

Variant names: a pooling variant (`mean`, `last_token`, `mean_no_image`, `mean_no_prompt`, ...) or
`<base>+removal`, `<base>+whitening`, `<base>+oracle_removal` (synthetic source only).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sae_jax import config_utils, metrics, retrieval, retrieval_tasks, sharding
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.data import synthetic
from sae_jax.errors import SaeJaxError
from sae_jax.plots import retrieval as plots

RESULTS_FILE = "results.json"


def _mask_of(variant: str) -> str:
  for key in ("no_image", "no_prompt"):
    if key in variant:
      return key
  return "none"


def _pooling_of(variant: str) -> str:
  return "last_token" if variant.startswith("last") else "mean"


# --------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------


class Inputs:
  """Arrays per pooling variant, plus the data the removal is fitted on."""

  def __init__(
    self,
    source: str,
    variants: dict,
    fit_pairs: Optional[tuple] = None,
    oracle: Optional[np.ndarray] = None,
    description: str = "",
  ):
    self.source = source
    self.variants = variants  # variant -> {name: array}
    self.fit_pairs = fit_pairs  # (image [N, d], text [N, d]) for attribution, or None
    self.oracle = oracle  # [m, d] true distractor atoms (synthetic) or None
    self.description = description


def _synthetic_inputs(config, rcfg) -> Inputs:
  src = synthetic.PlantedSource(config.data.synthetic)
  n = int(rcfg.synthetic_pairs)
  n_fit = int(rcfg.synthetic_fit_pairs)
  seed = int(rcfg.synthetic_seed)
  ev = src.paired(n, seed=seed)
  fit = src.paired(n_fit, seed=seed + 1)  # attribution is fitted on separate pairs
  kinds = np.asarray(src.kinds)
  oracle = src.dictionary[kinds == synthetic.KINDS.index("distractor")]
  arrays = {"image": ev.image, "text": ev.text, "sample_ids": np.arange(n)}
  return Inputs(
    "synthetic",
    {"mean": arrays},
    (fit.image, fit.text),
    oracle,
    f"PlantedSource: {n} eval pairs (seed {seed}), {n_fit} fit pairs (seed {seed + 1})",
  )


def _pooled_dir(rcfg, workdir) -> str:
  return rcfg.pooled_dir or os.path.join(workdir, "activations")


def _pooled_inputs(rcfg, workdir) -> Inputs:
  pooled_dir = _pooled_dir(rcfg, workdir)
  variants = {}
  for v in config_utils.as_tuple(rcfg.variants):
    path = os.path.join(pooled_dir, f"pooled_{v}.npz")
    if not os.path.exists(path):
      logging.info("retrieval: no %s, variant %s skipped", path, v)
      continue
    try:
      with np.load(path, allow_pickle=False) as z:
        variants[v] = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise SaeJaxError(f"{path}: cannot read pooled embeddings ({e})") from e
  _add_mbeir_tasks(rcfg, pooled_dir, variants)
  if not variants:
    raise SaeJaxError(
      f"{pooled_dir}: no pooled_<variant>.npz for config.retrieval.variants="
      f"{config_utils.as_tuple(rcfg.variants)}; run experiments.extract first or set "
      'config.retrieval.source="synthetic"'
    )
  base = rcfg.base_variant
  fit = None
  if base in variants and "image" in variants[base] and "text" in variants[base]:
    fit = (variants[base]["image"], variants[base]["text"])
  return Inputs("pooled", variants, fit, None, f"{pooled_dir}: variants {sorted(variants)}")


def _add_mbeir_tasks(rcfg, pooled_dir, variants: dict) -> None:
  """Adds the task of an M-BEIR extraction (mbeir_{queries,pool}_pooled_<v>.npz + qrels) per variant."""
  qrels_path = os.path.join(pooled_dir, "mbeir_qrels.json")
  if not os.path.exists(qrels_path):
    return
  with open(qrels_path) as f:
    qrels = json.load(f)
  for v in config_utils.as_tuple(rcfg.variants):
    paths = [os.path.join(pooled_dir, f"mbeir_{n}_pooled_{v}.npz") for n in ("queries", "pool")]
    if not all(os.path.exists(p) for p in paths):
      continue
    with np.load(paths[0], allow_pickle=False) as q, np.load(paths[1], allow_pickle=False) as c:
      arrays = retrieval_tasks.mbeir_task_arrays(
        {k: q[k] for k in q.files}, {k: c[k] for k in c.files}, qrels, task=rcfg.mbeir_task, source=paths[0]
      )
    variants.setdefault(v, {}).update(arrays)


def load_inputs(config, workdir) -> Inputs:
  rcfg = config.retrieval
  source = rcfg.source
  if source == "auto":
    has_pooled = os.path.isdir(_pooled_dir(rcfg, workdir)) and any(
      (f.startswith("pooled_") or f.startswith("mbeir_")) and f.endswith(".npz")
      for f in os.listdir(_pooled_dir(rcfg, workdir))
    )
    source = "pooled" if has_pooled or config.data.source != "synthetic" else "synthetic"
  if source == "synthetic":
    return _synthetic_inputs(config, rcfg)
  if source == "pooled":
    return _pooled_inputs(rcfg, workdir)
  raise SaeJaxError(f'config.retrieval.source={source!r}: expected "auto", "synthetic" or "pooled"')


# --------------------------------------------------------------------------------------------
# Attribution (paper Eq. 6) for the removal.
# --------------------------------------------------------------------------------------------


def encode_pairs(params, k: int, image, text, batch_size: int = 4096):
  """Sparse codes ((values, indices) of image rows, same of text rows), encoded in chunks."""
  image = np.asarray(image, np.float32)
  text = np.asarray(text, np.float32)
  if image.shape != text.shape:
    raise SaeJaxError(f"attribution: image {image.shape} and text {text.shape} must be matched pairs")
  p = {name: jnp.asarray(v) for name, v in params.items()}
  enc = jax.jit(lambda x: tuple(sae_lib.encode(p, x, k)))
  out = []
  for x in (image, text):
    parts = [enc(x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)]
    out.append(
      (np.concatenate([np.asarray(v) for v, _ in parts]), np.concatenate([np.asarray(i) for _, i in parts]))
    )
  return out[0], out[1]


def attribution_from_sae(params, k: int, image, text, batch_size: int = 4096) -> np.ndarray:
  """Attribution (paper Eq. 6) of each concept over matched pairs, from an SAE.

  A_i = mean_pairs(z_ι,i <d_i, x̂_τ> + z_τ,i <d_i, x̂_ι>), x̂ without b_dec (design.md §3), by the
  analysis stage's streaming implementation (no c x c matrix).
  """
  code_i, code_t = encode_pairs(params, k, image, text, batch_size)
  D = np.asarray(params["D"], np.float32)
  return np.asarray(metrics.compute_concept_metrics(D, code_i, code_t).attribution, np.float64)


def load_attribution(config, workdir, inputs: Inputs):
  """(attribution [c], D [c, d], source description) or None when no SAE is available."""
  rcfg = config.retrieval
  mode = rcfg.attribution
  if mode not in ("auto", "concepts", "sae"):
    raise SaeJaxError(f'config.retrieval.attribution={mode!r}: expected "auto", "concepts" or "sae"')
  sae_workdir = rcfg.sae_workdir or workdir
  # The analysis stage writes <workdir>/analysis/ (its SAE may live elsewhere); look there first.
  found = [
    p
    for p in dict.fromkeys(os.path.join(w, "analysis", "concepts.npz") for w in (workdir, sae_workdir))
    if os.path.exists(p)
  ]
  concepts = found[0] if found else os.path.join(workdir, "analysis", "concepts.npz")
  if mode in ("auto", "concepts") and found:
    with np.load(concepts, allow_pickle=False) as z:
      if "attribution" not in z.files or "D" not in z.files:
        raise SaeJaxError(f'{concepts}: expected arrays "attribution" and "D", got {z.files}')
      return np.asarray(z["attribution"]), np.asarray(z["D"], np.float32), concepts
  if mode == "concepts":
    raise SaeJaxError(
      f'{concepts}: missing (config.retrieval.attribution="concepts"); run experiments.analyze first'
    )
  try:
    loaded = workdir_lib.load_sae(sae_workdir)
  except SaeJaxError:
    if mode == "sae":
      raise
    return None
  if inputs.fit_pairs is None:
    raise SaeJaxError(
      f"attribution needs matched image/text pairs: pooled_{rcfg.base_variant}"
      '.npz has no "image" and "text" arrays'
    )
  a = attribution_from_sae(loaded.params, loaded.k, *inputs.fit_pairs)
  return a, np.asarray(loaded.params["D"], np.float32), f"{sae_workdir} step {loaded.step}"


# --------------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------------


def _mesh(config):
  if jax.device_count() <= 1:
    return None
  return sharding.make_mesh(config.mesh)


def evaluate_task(
  data: retrieval_tasks.TaskData,
  ks,
  *,
  mesh=None,
  block_size=retrieval.DEFAULT_BLOCK_SIZE,
  query_block_size=retrieval.DEFAULT_QUERY_BLOCK_SIZE,
  exclude_reference=True,
  normalize=True,
) -> dict:
  """Recall@K (percent) of one task by cosine similarity (`normalize=False`: rows already unit)."""
  retrieval.check_positives(data.positives_indptr, data.positives_indices, data.n_queries, data.n_candidates)
  for name, x in (("queries", data.queries), ("candidates", data.candidates)):
    bad = int(np.sum(~np.isfinite(x).all(axis=1))) if np.ndim(x) == 2 else 0
    if bad:
      raise SaeJaxError(f"{name}: {bad} rows hold NaN or Inf; the embeddings must be finite")
  exclude = data.exclude if exclude_reference else None
  _, ids = retrieval.topk_search(
    data.queries,
    data.candidates,
    int(max(ks)),
    exclude=exclude,
    mesh=mesh,
    block_size=block_size,
    query_block_size=query_block_size,
    normalize=normalize,
  )
  rec = retrieval.recall_at_k(np.asarray(ids), data.positives_indptr, data.positives_indices, ks)
  rec.update(n_queries=data.n_queries, n_candidates=data.n_candidates)
  return rec


def _normalized(data: retrieval_tasks.TaskData) -> retrieval_tasks.TaskData:
  return data.map(lambda x: np.asarray(retrieval.l2_normalize(np.asarray(x, np.float32)), np.float32))


def _save_embeddings(path: str, data: retrieval_tasks.TaskData) -> None:
  arrays = dict(
    queries=data.queries,
    candidates=data.candidates,
    positives_indptr=data.positives_indptr,
    positives_indices=data.positives_indices,
  )
  if data.exclude is not None:
    arrays["exclude"] = data.exclude
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _fmt(x) -> str:
  return f"{x:.2f}"


def _table2(results: dict, base: str, path: str, description: str) -> None:
  rows = [
    ("Base", base),
    ("Removal", f"{base}+removal"),
    ("Whitening (baseline)", f"{base}+whitening"),
    ("Oracle removal", f"{base}+oracle_removal"),
  ]
  lines = [
    "# Table 2: Base vs Removal of the attribution subspace (paper Eq. 8-10)",
    "",
    f"Source: {description}",
    "",
    "| Task | Setting | R@1 | R@5 | R@10 | settings |",
    "|---|---|---|---|---|---|",
  ]
  any_row = False
  for task, by_var in results.items():
    for label, v in rows:
      if v in by_var:
        r = by_var[v]
        s = r["settings"]
        note = ", ".join(
          f"{key}={s[key]}"
          for key in ("removal_rank", "removal_fraction", "n_atoms", "whitening_alpha")
          if key in s
        )
        lines.append(
          f"| {retrieval_tasks.TASKS[task].label} | {label} | {_fmt(r['R@1'])} | {_fmt(r['R@5'])} | "
          f"{_fmt(r['R@10'])} | {note} |"
        )
        any_row = True
  if not any_row:
    lines.append("| (no base variant evaluated) | | | | | |")
  if not any(f"{base}+removal" in v for v in results.values()):
    lines += ["", "Removal not run: no SAE checkpoint and no analysis/concepts.npz for the attribution."]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _table3(results: dict, path: str) -> None:
  lines = [
    "# Table 3: last token vs mean pooling",
    "",
    "| Task | Setting | R@1 | R@5 | R@10 |",
    "|---|---|---|---|---|",
  ]
  n = 0
  for task, by_var in results.items():
    for label, v in (("Last token", "last_token"), ("Mean pooling", "mean")):
      if v in by_var:
        r = by_var[v]
        lines.append(
          f"| {retrieval_tasks.TASKS[task].label} | {label} | {_fmt(r['R@1'])} | {_fmt(r['R@5'])} | "
          f"{_fmt(r['R@10'])} |"
        )
        n += 1
  if not n:
    lines.append("| (no last_token / mean variants evaluated) | | | | |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
  os.replace(tmp, path)


def run_retrieval(config, workdir: str) -> dict:
  """Evaluates every configured task and variant; writes <workdir>/retrieval/. Returns results."""
  rcfg = config.retrieval
  out_dir = os.path.join(workdir, "retrieval")
  os.makedirs(out_dir, exist_ok=True)
  ks = tuple(int(k) for k in config_utils.as_tuple(rcfg.ks))
  tasks = config_utils.as_tuple(rcfg.tasks)
  for t in tasks:
    retrieval_tasks.get_task(t)
  max_queries = int(rcfg.max_queries)
  base = rcfg.base_variant
  search = dict(
    mesh=_mesh(config), block_size=int(rcfg.block_size), query_block_size=int(rcfg.query_block_size)
  )
  exclude_reference = bool(rcfg.exclude_reference)
  save_embeddings = bool(rcfg.save_embeddings)
  t0 = time.time()

  inputs = load_inputs(config, workdir)
  logging.info("retrieval inputs: %s", inputs.description)

  # Projectors for the base variant.
  projectors: dict[str, tuple[retrieval.Projector, dict]] = {}
  attribution = None
  fraction = float(rcfg.removal_fraction)
  if bool(rcfg.removal):
    attribution = load_attribution(config, workdir, inputs)
  if attribution is not None:
    scores, D, a_src = attribution
    m = retrieval.n_top(fraction, D.shape[0])
    rank = int(rcfg.removal_rank)
    rank = min(m, D.shape[1]) if rank == -1 else rank
    proj = retrieval.fit_removal(D, scores, rank, fraction)
    proj.info["attribution_source"] = a_src
    proj.save(os.path.join(out_dir, "removal_projector.npz"))
    projectors["removal"] = (
      proj,
      {"removal_rank": rank, "removal_fraction": fraction, "n_atoms": m, "attribution_source": a_src},
    )
  if inputs.oracle is not None:
    oracle = retrieval.subspace_projector(inputs.oracle)
    projectors["oracle_removal"] = (
      oracle,
      {
        "removal_rank": int(oracle.info["rank"]),
        "n_atoms": int(inputs.oracle.shape[0]),
        "attribution_source": "planted distractor atoms",
      },
    )
  if bool(rcfg.whitening) and base in inputs.variants:
    arrs = inputs.variants[base]
    fit_rows = [arrs[k] for k in ("image", "text") if k in arrs]
    if not fit_rows:  # explicit-only variant: fit on every query / candidate it holds
      fit_rows = [arrs[k] for k in arrs if k.endswith("__queries") or k.endswith("__candidates")]
    if fit_rows:
      alpha = float(rcfg.whitening_alpha)
      wp = retrieval.fit_whitening(np.concatenate([np.asarray(x, np.float32) for x in fit_rows]), alpha)
      wp.save(os.path.join(out_dir, "whitening_projector.npz"))
      projectors["whitening"] = (wp, {"whitening_alpha": alpha, "whitening_fit_rows": wp.info["n_fit"]})

  results: dict = {}
  base_data: dict[str, retrieval_tasks.TaskData] = {}
  for task in tasks:
    spec = retrieval_tasks.TASKS[task]
    for variant, arrays in inputs.variants.items():
      data = retrieval_tasks.build_task(task, arrays, source=f"pooled_{variant}.npz")
      if data is None:
        continue
      data = data.subset(max_queries)
      runs = [(variant, data, {})]
      if variant == base:
        base_data[task] = data
        for name, (proj, extra) in projectors.items():
          runs.append((f"{variant}+{name}", data.map(proj.transform), extra))
      for name, d_run, extra in runs:
        d_run = _normalized(d_run)
        rec = evaluate_task(d_run, ks, exclude_reference=exclude_reference, normalize=False, **search)
        rec["settings"] = {
          "pooling": _pooling_of(variant),
          "mask": _mask_of(variant),
          "transform": name.split("+", 1)[1] if "+" in name else "none",
          "mbeir_task": spec.mbeir_task,
          "dataset": spec.dataset,
          "exclude_reference": bool(exclude_reference and d_run.exclude is not None),
          "max_queries": max_queries,
          "source": inputs.source,
          "metric": "cosine, float32, exact",
          **extra,
        }
        results.setdefault(task, {})[name] = rec
        logging.info(
          "retrieval %s %s: %s", task, name, {k: round(v, 2) for k, v in rec.items() if k.startswith("R@")}
        )
        if save_embeddings:
          _save_embeddings(os.path.join(out_dir, f"embeddings_{task}_{name}.npz"), d_run)
  if not results:
    raise SaeJaxError(f"config.retrieval.tasks={tasks}: none of them can be built from {inputs.description}")

  # Sweep over the removal rank r (r = 0: no removal).
  sweep_task = rcfg.sweep_task
  sweep = None
  if attribution is not None and sweep_task in base_data:
    scores, D, a_src = attribution
    m = retrieval.n_top(fraction, D.shape[0])
    ranks = [0] + sorted(
      {int(r) for r in config_utils.as_tuple(rcfg.sweep_ranks) if 0 < int(r) <= min(m, D.shape[1])}
      | {min(m, D.shape[1])}
    )
    per_metric = {f"R@{k}": [] for k in ks}
    for r in ranks:
      data = base_data[sweep_task]
      if r:
        data = data.map(retrieval.fit_removal(D, scores, r, fraction).transform)
      rec = evaluate_task(
        _normalized(data), ks, exclude_reference=exclude_reference, normalize=False, **search
      )
      for k in ks:
        per_metric[f"R@{k}"].append(rec[f"R@{k}"])
    sweep = {
      "task": sweep_task,
      "variant": base,
      "removal_fraction": fraction,
      "n_atoms": m,
      "attribution_source": a_src,
      "ranks": ranks,
      "metrics": per_metric,
    }
    if f"{base}+oracle_removal" in results.get(sweep_task, {}):
      sweep["oracle"] = {f"R@{k}": results[sweep_task][f"{base}+oracle_removal"][f"R@{k}"] for k in ks}
    _write_json(os.path.join(out_dir, "rank_sweep.json"), sweep)
    plots.fig_rank_sweep(
      sweep,
      os.path.join(out_dir, "rank_sweep.png"),
      title=f"{retrieval_tasks.TASKS[sweep_task].label}, top {fraction * 100:g}% concepts ({m} atoms)",
    )

  _write_json(os.path.join(out_dir, RESULTS_FILE), results)
  _table2(results, base, os.path.join(out_dir, "table2.md"), inputs.description)
  _table3(results, os.path.join(out_dir, "table3.md"))
  plots.fig_masking(
    results,
    os.path.join(out_dir, "fig_masking.png"),
    task_labels={t: retrieval_tasks.TASKS[t].label for t in retrieval_tasks.TASKS},
  )
  logging.info("retrieval: wrote %s in %.1f s", out_dir, time.time() - t0)
  return results
