"""The retrieval stage: Recall@K tables and figures of the paper (Table 2, Table 3, Figure 4).

`run_retrieval(config, workdir)` reads embeddings (the synthetic planted source, or the pooled
embeddings the extraction stage wrote to `<workdir>/activations/pooled_<variant>.npz`), evaluates
every configured task and variant by exact cosine search, applies the concept-subspace removal
(paper Eq. 8-10, rules of `sae_jax.removal`) and the baselines (whitening, mean-centring,
all-but-the-top) to the base variant through `sae_jax.projectors`, sweeps the removal rank, and
writes `<workdir>/retrieval/`:

  results.json        {task: {variant: {"R@<k>" and "R@<k>_ci95" (bootstrap over queries), "chance" per
                      retrieval.ks, "delta_vs_base" (paired, for the base variant's transforms),
                      "n_queries", "n_candidates", "settings", "ks_dropped" (K larger than the pool)}}}
  table2.md           Base vs Removal and the baselines, with the paired change vs base
  table3.md           last-token vs mean pooling
  removal_concepts.md, fig_removal_concepts.png   the removed concepts among all (diagnostics)
  fig_masking.png     Figure 4: Base / w/o image / w/o prompt per task
  rank_sweep.json/png Recall@K against the removal rank r (on the test split: an oracle)
  removal_projector.npz, removal_selected_projector.npz, whitening_projector.npz
  embeddings_<task>_<variant>.npz (retrieval.save_embeddings): queries / candidates exactly as
                      scored plus CSR positives, so any result can be checked independently.

Variant names: a pooling variant (`mean`, `last_token`, `mean_no_image`, `mean_no_prompt`, ...) or
`<base>+removal`, `<base>+removal_by_<rule>` (retrieval.removal_compare), `<base>+whitening`,
`<base>+center`, `<base>+oracle_removal` (synthetic source only), and with
`retrieval.select_on="validation"`: `<base>+removal_selected` (rule, fraction and rank chosen by R@1
on a validation split disjoint by image from the scored one) and `<base>+abtt` (D chosen there).

Steps: load (`load_inputs`, `load_attribution`, in `sae_jax.stages.retrieval_inputs`) -> compute (`fit_projectors`, `select_settings`,
`evaluate_all`, `sweep_removal_rank`) -> write (`write_outputs`, each file through the atomic
writers of `sae_jax.workdir`; tables in `sae_jax.stages.retrieval_tables`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from absl import logging

from sae_jax import (
  config_utils,
  metrics,
  preemption,
  removal,
  retrieval,
  retrieval_tasks,
  sharding,
  uncertainty,
)
from sae_jax import projectors as projectors_lib
from sae_jax.errors import SaeJaxError
from sae_jax.progress import Progress
from sae_jax.stages import retrieval_outputs
from sae_jax.stages import retrieval_tables as tables
from sae_jax.stages.block_progress import BlockProgress, recorded, retrieval_fingerprint
from sae_jax.stages.retrieval_inputs import (
  Attribution,
  Inputs,
  choice,
  load_attribution,
  load_inputs,
  removal_rules,
  select_on,
)

DENOMINATORS = ("all_queries", "scorable")


def _mask_of(variant: str) -> str:
  for key in ("no_image", "no_prompt"):
    if key in variant:
      return key
  return "none"


def _pooling_of(variant: str) -> str:
  return "last_token" if variant.startswith("last") else "mean"


# --------------------------------------------------------------------------------------------
# Projectors applied to the base variant (`sae_jax.projectors`): removal (Eq. 8-10), the oracle,
# whitening, mean-centring, all-but-the-top.
# --------------------------------------------------------------------------------------------


def _full_rank(attribution: Attribution, fraction: float) -> tuple[int, int]:
  """(number of atoms selected, the largest removal rank they allow)."""
  D = attribution.D
  m = metrics.top_fraction_size(fraction, D.shape[0], "config.retrieval.removal_fraction")
  return m, min(m, D.shape[1])


def removal_name(rcfg: Any, rule: str) -> str:
  """Projector / variant suffix: "removal" for `retrieval.removal_by`, "removal_by_<rule>" else."""
  return "removal" if rule == rcfg.removal_by else f"removal_by_{rule}"


def _validation_data(rcfg: Any, inputs: Inputs) -> tuple[str, retrieval_tasks.TaskData]:
  """The task the settings are chosen on (`retrieval.sweep_task` when pairs can build it, else
  image_to_text) over the validation pairs."""
  task = rcfg.sweep_task if rcfg.sweep_task in retrieval_tasks.PAIRED_TASKS else "image_to_text"
  image, text, ids = inputs.validation
  return task, retrieval_tasks.paired_task(task, image, text, ids)


def select_settings(rcfg: Any, inputs: Inputs, attribution: Optional[Attribution], search: "_Search") -> dict:
  """{name: (projector, settings)} of the settings chosen by R@1 on the validation split only: the
  removal (rule among `removal_rules`, `select_fractions`, `select_ranks`) and all-but-the-top's D."""
  task, val = _validation_data(rcfg, inputs)
  r1_search = search._replace(ks=(1,), max_queries=0)
  r1 = lambda data: float(r1_search.recall(_normalized(data))["R@1"])
  how = choice(rcfg.select_how, removal.SELECT_HOW, "config.retrieval.select_how")
  common = {
    "selected_on": "validation",
    "select_how": how,
    "validation_task": task,
    "validation_queries": val.n_queries,
    "validation_R@1_base": r1(val),
    **{k: v for k, v in inputs.fit_info.items() if k.startswith("validation")},
  }
  out = {}
  if attribution is not None:
    D = attribution.D
    grid = removal.removal_grid(
      removal_rules(rcfg),
      config_utils.as_tuple(rcfg.select_fractions),
      config_utils.as_tuple(rcfg.select_ranks),
      D.shape[0],
      D.shape[1],
    )
    sel = removal.select_removal(
      D, attribution.scores, grid, lambda p: r1(p.apply(task, val)), how, val.n_queries
    )
    sel.projector.info.update(attribution_source=attribution.source, removal_by=sel.chosen.rule)
    out["removal_selected"] = (
      sel.projector,
      {
        **common,
        "removal_by": sel.chosen.rule,
        "removal_fraction": sel.chosen.fraction,
        "removal_rank": int(sel.projector.info["rank"]),
        "removal_rank_requested": sel.chosen.rank,
        "n_atoms": int(sel.projector.info["n_atoms"]),
        "attribution_source": attribution.source,
        "validation_candidates": sel.table,
        **inputs.fit_info,
      },
    )
  if bool(rcfg.abtt):
    comps = [int(x) for x in config_utils.as_tuple(rcfg.abtt_components)]
    best, table = removal.select_abtt(
      comps, lambda dd: r1(projectors_lib.PerSideAbtt(dd).apply(task, val)), how, val.n_queries
    )
    out["abtt"] = (
      projectors_lib.PerSideAbtt(best),
      {
        **common,
        "abtt_components": best,
        "abtt_fit": "per side, scored rows",
        "validation_candidates": table,
      },
    )
  return out


def fit_projectors(
  rcfg: Any, inputs: Inputs, attribution: Optional[Attribution], search: Optional["_Search"] = None
) -> dict:
  """{name: (projector, settings recorded with its results)} for the base variant. With
  `retrieval.select_on="validation"` (and `search`), also the settings chosen on the validation split."""
  projectors: dict[str, tuple[Any, dict]] = {}
  fraction = float(rcfg.removal_fraction)
  if attribution is not None:
    scores, D, a_src = attribution.scores, attribution.D, attribution.source
    m, full = _full_rank(attribution, fraction)
    rank = int(rcfg.removal_rank)
    rank = full if rank == -1 else rank
    for rule in removal_rules(rcfg):
      if rule not in scores:
        raise SaeJaxError(f'config.retrieval.removal_by="{rule}": {a_src} holds no "{rule}" scores')
      proj = projectors_lib.fit_removal(D, scores[rule], rank, fraction)
      proj.info.update(attribution_source=a_src, removal_by=rule)
      projectors[removal_name(rcfg, rule)] = (
        proj,
        {
          "removal_rank": int(proj.info["rank"]),
          "removal_rank_requested": rank,
          "removal_fraction": fraction,
          "removal_by": rule,
          "n_atoms": m,
          "attribution_source": a_src,
          **inputs.fit_info,
        },
      )
  if inputs.oracle is not None:
    oracle = projectors_lib.subspace_projector(inputs.oracle)
    projectors["oracle_removal"] = (
      oracle,
      {
        "removal_rank": int(oracle.info["rank"]),
        "n_atoms": int(inputs.oracle.shape[0]),
        "attribution_source": "planted distractor atoms",
      },
    )
  base = rcfg.base_variant
  mode = rcfg.whitening_mode
  if mode not in projectors_lib.WHITENING_MODES:
    raise SaeJaxError(
      f"config.retrieval.whitening_mode={mode!r}: expected one of {projectors_lib.WHITENING_MODES}"
    )
  alpha = float(rcfg.whitening_alpha)
  if bool(rcfg.whitening) and base in inputs.variants and mode == "realign":
    settings = {
      "whitening_mode": "realign",
      "whitening_alpha": alpha,
      "whitening_eps": projectors_lib.REALIGN_EPS,
    }
    projectors["whitening"] = (
      projectors_lib.RealignWhitening(alpha),
      {**settings, "whitening_fit": "per side, scored rows"},
    )
  elif bool(rcfg.whitening) and base in inputs.variants:
    arrs = inputs.variants[base]
    fit_rows = [arrs[k] for k in ("image", "text") if k in arrs]
    if not fit_rows:  # explicit-only variant: fit on every query / candidate it holds
      fit_rows = [arrs[k] for k in arrs if k.endswith("__queries") or k.endswith("__candidates")]
    if fit_rows:
      wp = projectors_lib.fit_whitening(np.concatenate([np.asarray(x, np.float32) for x in fit_rows]), alpha)
      projectors["whitening"] = (
        wp,
        {"whitening_mode": "joint", "whitening_alpha": alpha, "whitening_fit_rows": wp.info["n_fit"]},
      )
  if bool(rcfg.abtt) and base in inputs.variants:  # mean-centring only: all-but-the-top with D = 0
    projectors["center"] = (
      projectors_lib.PerSideAbtt(0),
      {"abtt_components": 0, "abtt_fit": "per side, scored rows"},
    )
  if select_on(rcfg) == "validation" and search is not None and inputs.validation is not None:
    projectors.update(select_settings(rcfg, inputs, attribution, search))
  if inputs.oracle is not None:  # planted data: how much of each removed subspace is distractor span
    for name, (proj, extra) in projectors.items():
      if name.startswith("removal"):
        extra["overlap_with_planted_distractors"] = removal.subspace_overlap(proj.basis, inputs.oracle)
  return projectors


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
  allow_unscorable=False,
  return_ranks=False,
):
  """Recall@K (percent) of one task by cosine similarity (`normalize=False`: rows already unit).

  `allow_unscorable`: queries without a positive count as misses (denominator: every query).
  `return_ranks`: returns (recall, first-hit rank per query [Nq], >= max(ks) for a miss).
  """
  retrieval.check_positives(
    data.positives_indptr, data.positives_indices, data.n_queries, data.n_candidates, allow_unscorable
  )
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
  rec = retrieval.recall_at_k(
    np.asarray(ids), data.positives_indptr, data.positives_indices, ks, allow_unscorable
  )
  rec.update(n_queries=data.n_queries, n_candidates=data.n_candidates, n_unscorable=data.n_unscorable)
  if return_ranks:
    ranks = jax.jit(retrieval.first_hit_rank)(ids, data.positives_indptr, data.positives_indices)
    return rec, np.asarray(ranks)
  return rec


def _normalized(data: retrieval_tasks.TaskData) -> retrieval_tasks.TaskData:
  return data.map(lambda x: np.asarray(retrieval.l2_normalize(np.asarray(x, np.float32)), np.float32))


class _Search(NamedTuple):
  """How every task is scored (from config.retrieval)."""

  ks: tuple
  exclude_reference: bool
  max_queries: int
  kwargs: dict  # mesh and block sizes for `retrieval.topk_search`
  subset: str = "first"  # retrieval_tasks.SUBSET_MODES
  subset_seed: int = 42
  denominator: str = "all_queries"  # "all_queries" (misses count) | "scorable"
  n_boot: int = uncertainty.DEFAULT_N_BOOT  # bootstrap resamples of the intervals
  boot_seed: int = 0

  def ks_within(self, data: retrieval_tasks.TaskData) -> tuple:
    """The configured K that fit the task's candidate pool (one fewer when the reference is excluded)."""
    pool = data.n_candidates - (1 if self.exclude_reference and data.exclude is not None else 0)
    return tuple(k for k in self.ks if k <= pool)

  def recall(self, unit_rows: retrieval_tasks.TaskData, with_ranks: bool = False):
    """Recall@K of a task whose rows are already L2-normalised; K above the pool are left out and
    listed under `ks_dropped`. `with_ranks`: (recall, first-hit ranks [Nq]) for the intervals."""
    ks = self.ks_within(unit_rows)
    if not ks:
      raise SaeJaxError(
        f"config.retrieval.ks={self.ks}: every K is larger than the candidate pool "
        f"({unit_rows.n_candidates} candidates); lower the K or evaluate on more candidates"
      )
    rec = evaluate_task(
      unit_rows,
      ks,
      exclude_reference=self.exclude_reference,
      normalize=False,
      allow_unscorable=self.denominator == "all_queries",
      return_ranks=with_ranks,
      **self.kwargs,
    )
    if with_ranks:
      rec, ranks = rec
    # What a random ranking scores on this task: a model whose interval does not clear it is at chance.
    pool = unit_rows.n_candidates - (1 if self.exclude_reference and unit_rows.exclude is not None else 0)
    n_pos = np.minimum(np.diff(np.asarray(unit_rows.positives_indptr)), pool)
    rec["chance"] = uncertainty.chance_recall(n_pos, pool, ks)
    dropped = [k for k in self.ks if k not in ks]
    if dropped:
      rec["ks_dropped"] = dropped
    return (rec, ranks) if with_ranks else rec

  def intervals(self, rec: dict, ranks: np.ndarray, base_ranks: Optional[np.ndarray] = None) -> dict:
    """`rec` with the bootstrap interval of each R@K (`R@K_ci95`) and, given the base variant's ranks
    on the same queries, the paired change vs base (`delta_vs_base`: R@K in points, R@K_ci95)."""
    ks = [int(k[2:]) for k in rec if k.startswith("R@") and k[2:].isdigit()]
    ci = uncertainty.recall_with_ci(ranks, ks, n_boot=self.n_boot, seed=self.boot_seed)
    rec.update({k: v for k, v in ci.items() if k.endswith("_ci95")})
    if base_ranks is not None:
      rec["delta_vs_base"] = uncertainty.paired_recall_delta(
        base_ranks, ranks, ks, n_boot=self.n_boot, seed=self.boot_seed
      )
    return rec


def _settings_of(variant: str, name: str, spec, search: _Search, d_run, source: str, extra: dict) -> dict:
  return {
    "pooling": _pooling_of(variant),
    "mask": _mask_of(variant),
    "transform": name.split("+", 1)[1] if "+" in name else "none",
    "mbeir_task": spec.mbeir_task,  # M-BEIR / UniIR numbering
    "authors_task": spec.authors_task,  # the paper authors' loader numbering
    "dataset": spec.dataset,
    "exclude_reference": bool(search.exclude_reference and d_run.exclude is not None),
    "max_queries": search.max_queries,
    "subset": search.subset,
    "subset_seed": search.subset_seed,
    "denominator": search.denominator,
    "source": source,
    "metric": "cosine, float32, exact",
    **extra,
  }


def evaluate_all(
  tasks: tuple,
  inputs: Inputs,
  base: str,
  projectors: dict,
  search: _Search,
  embeddings_dir: Optional[str] = None,
  progress: Optional[BlockProgress] = None,
  *,
  log_every_s: float,
) -> tuple[dict, dict]:
  """Recall@K of every task x variant, and of the base variant under each projector.

  Returns (results {task: {variant: record}}, the base variant's TaskData per task). With
  `embeddings_dir`, each scored embedding set is written there as it is scored, so only one task's
  arrays are held at a time. A progress line over the settings every `log_every_s` seconds.
  """
  results: dict = {}
  base_data: dict[str, retrieval_tasks.TaskData] = {}
  line = Progress(
    len(tasks) * (len(inputs.variants) + len(projectors)), "retrieval", log_every_s, unit="settings"
  )
  for task in tasks:
    spec = retrieval_tasks.TASKS[task]
    for variant, arrays in inputs.variants.items():
      data = retrieval_tasks.build_task(task, arrays, source=f"pooled_{variant}.npz")
      if data is None:
        line.update(1 + (len(projectors) if variant == base else 0))  # settings this task cannot have
        continue
      data = data.subset(search.max_queries, search.subset, search.subset_seed)
      if search.denominator == "scorable":
        data = data.scorable()
      runs = [(variant, data, {})]
      if variant == base:
        base_data[task] = data
        for name, (proj, extra) in projectors.items():
          runs.append((f"{variant}+{name}", proj.apply(task, data), extra))
      base_ranks = None
      for name, d_run, extra in runs:
        d_run = _normalized(d_run)

        def scored(d_run=d_run) -> dict:  # JSON-able, so `progress` can keep it
          rec, ranks = search.recall(d_run, with_ranks=True)
          return {"record": rec, "ranks": np.asarray(ranks).tolist()}

        saved = recorded(progress, f"recall-{task}-{name}", scored)
        rec, ranks = saved["record"], np.asarray(saved["ranks"])
        search.intervals(rec, ranks, base_ranks)
        if name == variant == base:
          base_ranks = ranks
        rec["settings"] = _settings_of(variant, name, spec, search, d_run, inputs.source, extra)
        results.setdefault(task, {})[name] = rec
        logging.info(
          "retrieval %s %s: %s",
          task,
          name,
          {k: round(v, 2) for k, v in rec.items() if k.startswith("R@") and k[2:].isdigit()},
        )
        if embeddings_dir is not None:
          retrieval_outputs.write_embeddings(
            os.path.join(embeddings_dir, f"embeddings_{task}_{name}.npz"), d_run
          )
        line.update(1)
  line.close()
  if not results:
    raise SaeJaxError(f"config.retrieval.tasks={tasks}: none of them can be built from {inputs.description}")
  return results, base_data


def sweep_removal_rank(
  rcfg: Any,
  attribution: Attribution,
  data: retrieval_tasks.TaskData,
  search: _Search,
  oracle: Optional[dict],
  progress: Optional[BlockProgress] = None,
) -> dict:
  """Recall@K of the base variant of `rcfg.sweep_task` against the removal rank r (r = 0: none).

  Swept for every rule of `removal_rules` (`by_rule`); `metrics` / `ranks_used` are the
  `retrieval.removal_by` rule's. `ranks_used` is the rank removed after the cut of near-zero
  singular values (`projectors.removal_basis`), at most the requested r. Scored on the test split, so
  a rank read off it is an oracle choice (`selected_on`); `retrieval.select_on="validation"` is not.
  """
  scores, D, a_src = attribution.scores, attribution.D, attribution.source
  fraction = float(rcfg.removal_fraction)
  m, full = _full_rank(attribution, fraction)
  wanted = {int(r) for r in config_utils.as_tuple(rcfg.sweep_ranks) if 0 < int(r) <= full}
  ranks = [0] + sorted(wanted | {full})
  ks = search.ks_within(data)
  by_rule = {}
  for rule in removal_rules(rcfg):
    per_metric: dict = {f"R@{k}": [] for k in ks}
    used = []
    for r in ranks:
      proj = projectors_lib.fit_removal(D, scores[rule], r, fraction) if r else None
      used.append(int(proj.info["rank"]) if proj is not None else 0)
      d_r = proj.apply(rcfg.sweep_task, data) if proj is not None else data
      rec = recorded(progress, f"sweep-{rule}-{r}", lambda d_r=d_r: search.recall(_normalized(d_r)))
      for k in ks:
        per_metric[f"R@{k}"].append(rec[f"R@{k}"])
    by_rule[rule] = {"metrics": per_metric, "ranks_used": used}
  main = by_rule[rcfg.removal_by]
  sweep = {
    "task": rcfg.sweep_task,
    "variant": rcfg.base_variant,
    "removal_fraction": fraction,
    "removal_by": rcfg.removal_by,
    "selected_on": "test split (oracle: a rank chosen here has seen the scored labels)",
    "n_atoms": m,
    "attribution_source": a_src,
    "ranks": ranks,
    "ranks_used": main["ranks_used"],
    "metrics": main["metrics"],
    "by_rule": by_rule,
  }
  if oracle is not None:
    sweep["oracle"] = {f"R@{k}": oracle[f"R@{k}"] for k in ks}
  return sweep


# --------------------------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------------------------


def _check_ks(ks) -> tuple:
  try:
    out = tuple(int(k) for k in config_utils.as_tuple(ks))
  except (TypeError, ValueError):
    out = ()
  if not out or any(k < 1 for k in out) or len(set(out)) != len(out):
    raise SaeJaxError(f"config.retrieval.ks={ks!r}: expected distinct positive integers, e.g. (1, 5, 10)")
  return tuple(sorted(out))


def run_retrieval(config, workdir: str, log: Optional[Callable[[str], None]] = None) -> dict:
  """Evaluates every configured task and variant; writes <workdir>/retrieval/. Returns results.

  Nothing is written before every task has been scored, so a failure leaves no partial outputs.
  SIGTERM / SIGINT stop it after the setting being scored (exit status 75); a re-run scores only
  the settings not saved in <workdir>/.progress/retrieval/ (`block_progress`).
  `log` (e.g. `print`) receives the summary lines: output files, R@1 per task, sizes, time.
  """
  with preemption.watch():
    return _run_retrieval(config, workdir, log)


def _run_retrieval(config, workdir: str, log: Optional[Callable[[str], None]]) -> dict:
  rcfg = config.retrieval
  t0 = time.time()
  tasks = config_utils.as_tuple(rcfg.tasks)
  for t in tasks:
    retrieval_tasks.get_task(t)
  search = _Search(
    ks=_check_ks(rcfg.ks),
    exclude_reference=bool(rcfg.exclude_reference),
    max_queries=int(rcfg.max_queries),
    kwargs=dict(
      mesh=_mesh(config), block_size=int(rcfg.block_size), query_block_size=int(rcfg.query_block_size)
    ),
    subset=choice(rcfg.subset, retrieval_tasks.SUBSET_MODES, "config.retrieval.subset"),
    subset_seed=int(rcfg.subset_seed),
    denominator=choice(rcfg.denominator, DENOMINATORS, "config.retrieval.denominator"),
    n_boot=int(rcfg.bootstrap_n),
    boot_seed=int(rcfg.bootstrap_seed),
  )
  base = rcfg.base_variant
  out_dir = os.path.join(workdir, "retrieval")

  # Load: embeddings, and the attribution the removal is fitted on.
  inputs = load_inputs(config, workdir)
  logging.info("retrieval inputs: %s", inputs.description)
  attribution = load_attribution(config, workdir, inputs) if bool(rcfg.removal) else None

  # Compute: projectors, every task x variant, the rank sweep; each scored setting is kept in
  # <workdir>/.progress/retrieval/ until the outputs are written (a signal stops after one).
  projectors = fit_projectors(rcfg, inputs, attribution, search)
  progress = BlockProgress(workdir, "retrieval", retrieval_fingerprint(rcfg, inputs, attribution))
  # The scored embeddings are written as they are scored (one task's arrays in memory at a time) into
  # a staging directory, moved into retrieval/ only once everything else succeeded.
  staging = None
  if bool(rcfg.save_embeddings):
    os.makedirs(workdir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".retrieval-staging-", dir=workdir)
  try:
    results, base_data = evaluate_all(
      tasks, inputs, base, projectors, search, staging, progress, log_every_s=float(rcfg.log_every_s)
    )
    sweep = None
    if attribution is not None and rcfg.sweep_task in base_data:
      oracle = results.get(rcfg.sweep_task, {}).get(f"{base}+oracle_removal")
      sweep = sweep_removal_rank(rcfg, attribution, base_data[rcfg.sweep_task], search, oracle, progress)

    # Write.
    written = retrieval_outputs.write_outputs(
      out_dir, results, projectors, sweep, base, inputs.description, staging, attribution
    )
    progress.clear()
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)
  seconds = time.time() - t0
  logging.info("retrieval: wrote %s in %.1f s", out_dir, seconds)
  if log is not None:
    for line in tables.summary_lines(results, base, out_dir, written, seconds):
      log(line)
    if config.preset_note:
      log(f"  {config.preset_note}")
  return results
