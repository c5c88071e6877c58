"""The retrieval stage: Recall@K tables and figures of the paper (Table 2, Table 3, Figure 4).

`run_retrieval(config, workdir)` reads embeddings (the synthetic planted source, or the pooled
embeddings the extraction stage wrote to `<workdir>/activations/pooled_<variant>.npz`), evaluates
every configured task and variant by exact cosine search, applies the attribution-subspace removal
(paper Eq. 8-10) and the shrinkage-whitening baseline to the base variant, sweeps the removal rank,
and writes `<workdir>/retrieval/`:

  results.json        {task: {variant: {"R@<k>" per retrieval.ks, "n_queries", "n_candidates", "settings",
                      "ks_dropped" (the K larger than that task's candidate pool, when any)}}}
  table2.md           Base vs Removal (and the whitening baseline; the oracle on synthetic data)
  table3.md           last-token vs mean pooling
  fig_masking.png     Figure 4: Base / w/o image / w/o prompt per task
  rank_sweep.json/png Recall@K against the removal rank r
  removal_projector.npz, whitening_projector.npz   reusable `retrieval.Projector`s
  embeddings_<task>_<variant>.npz (retrieval.save_embeddings): queries / candidates exactly as
                      scored plus CSR positives, so any result can be checked independently.

Variant names: a pooling variant (`mean`, `last_token`, `mean_no_image`, `mean_no_prompt`, ...) or
`<base>+removal`, `<base>+whitening`, `<base>+oracle_removal` (synthetic source only).

Steps: load (`load_inputs`, `load_attribution`) -> compute (`fit_projectors`, `evaluate_all`,
`sweep_removal_rank`) -> write (`write_outputs`, each file through the atomic writers of
`sae_jax.workdir`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from sae_jax import config_utils, metrics, preemption, retrieval, retrieval_tasks, sharding
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.data import synthetic
from sae_jax.errors import SaeJaxError
from sae_jax.plots import retrieval as plots
from sae_jax.stages.block_encoder import encode_rows
from sae_jax.stages.block_progress import BlockProgress, recorded, retrieval_fingerprint

RESULTS_FILE = "results.json"
SMALL_EVAL = 1000  # queries; below this the tables and the summary say the numbers are not full-size
TABLE3_MISSING = (
  "Not available: no task was evaluated with both the `last_token` and the `mean` variant. Decoder "
  "presets extract both (config.extract.pooling); contrastive models (CLIP, SigLIP2) have one embedding."
)
FIG_MASKING_MISSING = (
  "no mean_no_image / mean_no_prompt variants evaluated; decoder presets extract them with "
  "config.extract.pooling"
)


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
    fit_info: Optional[dict] = None,
  ):
    self.source = source
    self.variants = variants  # variant -> {name: array}
    self.fit_pairs = fit_pairs  # (image [N, d], text [N, d]) for attribution, or None
    self.oracle = oracle  # [m, d] true distractor atoms (synthetic) or None
    self.description = description
    # Where the fit pairs come from: {"fit_on", "fit_split", "eval_split", "fit_disjoint", ...}.
    self.fit_info = fit_info or {}


FIT_ON = ("auto", "train", "eval")
SPLITS = ("train", "eval")
EVAL_DIR = "eval"  # <activations>/eval/: pooled embeddings of the evaluation split


def _fit_on(rcfg, eval_is_separate: bool) -> str:
  """`retrieval.fit_on` resolved: "auto" is "train" when a separate split exists, else "eval"."""
  fit_on = rcfg.fit_on
  if fit_on not in FIT_ON:
    raise SaeJaxError(f"config.retrieval.fit_on={fit_on!r}: expected one of {FIT_ON}")
  if fit_on == "auto":
    return "train" if eval_is_separate else "eval"
  return fit_on


def _synthetic_inputs(config, rcfg) -> Inputs:
  src = synthetic.PlantedSource(config.data.synthetic)
  n = int(rcfg.synthetic_pairs)
  n_fit = int(rcfg.synthetic_fit_pairs)
  seed = int(rcfg.synthetic_seed)
  ev = src.paired(n, seed=seed)
  kinds = np.asarray(src.kinds)
  oracle = src.dictionary[kinds == synthetic.KINDS.index("distractor")]
  arrays = {"image": ev.image, "text": ev.text, "sample_ids": np.arange(n)}
  if _fit_on(rcfg, True) == "train":  # the attribution is fitted on separate pairs
    fit = src.paired(n_fit, seed=seed + 1)
    fit_info = {"fit_on": "train", "fit_split": f"synthetic seed {seed + 1}", "fit_disjoint": True}
  else:
    fit = ev
    fit_info = {"fit_on": "eval", "fit_split": f"synthetic seed {seed}", "fit_disjoint": False}
  fit_info.update(eval_split=f"synthetic seed {seed}", fit_pairs=int(fit.image.shape[0]))
  return Inputs(
    "synthetic",
    {"mean": arrays},
    (fit.image, fit.text),
    oracle,
    f"PlantedSource: {n} eval pairs (seed {seed}), fit pairs: {fit_info['fit_split']}",
    fit_info,
  )


def _pooled_dir(rcfg, workdir) -> str:
  return rcfg.pooled_dir or os.path.join(workdir, "activations")


def _eval_dir(rcfg, workdir) -> str:
  """Directory of the pooled files that are scored: the training split's, or the eval split's."""
  if rcfg.split not in SPLITS:
    raise SaeJaxError(f"config.retrieval.split={rcfg.split!r}: expected one of {SPLITS}")
  top = _pooled_dir(rcfg, workdir)
  return os.path.join(top, EVAL_DIR) if rcfg.split == "eval" else top


def _read_pairs(path: str) -> tuple:
  try:
    with workdir_lib.open_npz(path) as z:
      if "image" not in z.files or "text" not in z.files:
        raise SaeJaxError(f'{path}: the removal fit needs matched "image" and "text" arrays, got {z.files}')
      ids = z["image_ids"] if "image_ids" in z.files else None
      return np.asarray(z["image"]), np.asarray(z["text"]), ids
  except (OSError, ValueError) as e:
    raise SaeJaxError(f"{path}: cannot read pooled embeddings ({e})") from e


def _pooled_inputs(rcfg, workdir) -> Inputs:
  pooled_dir = _eval_dir(rcfg, workdir)
  variants = {}
  for v in config_utils.as_tuple(rcfg.variants):
    path = os.path.join(pooled_dir, f"pooled_{v}.npz")
    if not workdir_lib.exists(path):
      logging.info("retrieval: no %s, variant %s skipped", path, v)
      continue
    try:
      with workdir_lib.open_npz(path) as z:  # local or gs://
        variants[v] = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise SaeJaxError(f"{path}: cannot read pooled embeddings ({e})") from e
  # An M-BEIR extraction is evaluation data whatever the split: its files stay in <activations>/.
  _add_mbeir_tasks(rcfg, _pooled_dir(rcfg, workdir), variants)
  if not variants:
    raise SaeJaxError(
      f"{pooled_dir}: no pooled_<variant>.npz for config.retrieval.variants="
      f"{config_utils.as_tuple(rcfg.variants)}; run experiments.extract first or set "
      'config.retrieval.source="synthetic"'
    )
  base = rcfg.base_variant
  eval_path = os.path.join(pooled_dir, f"pooled_{base}.npz")
  train_path = os.path.join(_pooled_dir(rcfg, workdir), f"pooled_{base}.npz")
  fit_on = _fit_on(rcfg, rcfg.split == "eval")
  fit, fit_info = None, {"fit_on": fit_on, "eval_split": eval_path}
  if fit_on == "train":
    if os.path.abspath(train_path) == os.path.abspath(eval_path):
      raise SaeJaxError(
        f'config.retrieval.fit_on="train" but the scored file {eval_path} is the training split\'s; '
        'set config.retrieval.split="eval" (extract.eval_dataset) or fit_on="eval"'
      )
    fit_info["fit_split"] = train_path
    if workdir_lib.exists(train_path):  # else only analysis/concepts.npz can give the attribution
      image, text, fit_ids = _read_pairs(train_path)
      fit = (image, text)
      eval_ids = variants.get(base, {}).get("image_ids")
      shared = 0 if fit_ids is None or eval_ids is None else int(np.isin(fit_ids, eval_ids).sum())
      fit_info.update(fit_disjoint=shared == 0, fit_rows_sharing_eval_images=shared)
  elif base in variants and "image" in variants[base] and "text" in variants[base]:
    fit = (variants[base]["image"], variants[base]["text"])
    fit_info.update(fit_split=eval_path, fit_disjoint=False)
  if fit is not None:
    fit_info["fit_pairs"] = int(fit[0].shape[0])
  return Inputs("pooled", variants, fit, None, f"{pooled_dir}: variants {sorted(variants)}", fit_info)


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
        {k: q[k] for k in q.files},
        {k: c[k] for k in c.files},
        qrels,
        task=rcfg.mbeir_task,
        source=paths[0],
        keep_unscorable=rcfg.denominator == "all_queries",
      )
    variants.setdefault(v, {}).update(arrays)


def load_inputs(config, workdir) -> Inputs:
  rcfg = config.retrieval
  source = rcfg.source
  if source == "auto":
    scored = epath.Path(_eval_dir(rcfg, workdir))  # local or gs://
    has_pooled = scored.is_dir() and any(
      (f.name.startswith("pooled_") or f.name.startswith("mbeir_")) and f.name.endswith(".npz")
      for f in scored.iterdir()
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


def attribution_from_sae(
  params: dict,
  k: int,
  image: np.ndarray,
  text: np.ndarray,
  batch_size: int = 4096,
  spec: Optional[sae_lib.SAESpec] = None,
) -> np.ndarray:
  """Attribution (paper Eq. 6) of each concept over matched pairs, from an SAE: [c] float64.

  A_i = mean_pairs(z_ι,i <d_i, x̂_τ> + z_τ,i <d_i, x̂_ι>) with x̂ = z D without b_dec, the same
  streaming computation as the analysis stage (no c x c matrix). Without `spec` the rows are encoded
  with b_dec subtracted (`sae.encode`'s default, right for both presets: b_dec is 0 in `paper`).
  """
  return np.asarray(concept_scores_from_sae(params, k, image, text, batch_size, spec)["attribution"])


REMOVAL_BY = ("attribution", "energy", "abs_attribution")
DENOMINATORS = ("all_queries", "scorable")


def _choice(value: str, allowed: tuple, field: str) -> str:
  if value not in allowed:
    raise SaeJaxError(f"{field}={value!r}: expected one of {allowed}")
  return value


def _scores_by_rule(attribution: np.ndarray, energy: Optional[np.ndarray]) -> dict:
  """The per-concept scores each `retrieval.removal_by` rule ranks the concepts by."""
  a = np.asarray(attribution, np.float64)
  out = {"attribution": a, "abs_attribution": np.abs(a)}
  if energy is not None:
    out["energy"] = np.asarray(energy, np.float64)
  return out


def concept_scores_from_sae(
  params: dict,
  k: int,
  image: np.ndarray,
  text: np.ndarray,
  batch_size: int = 4096,
  spec: Optional[sae_lib.SAESpec] = None,
) -> dict:
  """{rule: [c] float64} for every `REMOVAL_BY` rule, from an SAE over matched pairs."""
  image = np.asarray(image, np.float32)
  text = np.asarray(text, np.float32)
  if image.shape != text.shape:
    raise SaeJaxError(f"attribution: image {image.shape} and text {text.shape} must be matched pairs")
  d, c = np.shape(params["W_enc"])
  spec = spec or sae_lib.SAESpec(d=d, c=c, k=k, pre_bias=True)
  code_i = encode_rows(params, spec, image, batch_size)
  code_t = encode_rows(params, spec, text, batch_size)
  cm = metrics.compute_concept_metrics(np.asarray(params["D"], np.float32), code_i, code_t)
  return _scores_by_rule(cm.attribution, cm.energy)


def load_attribution(config, workdir, inputs: Inputs):
  """({rule: scores [c]} for `REMOVAL_BY`, D [c, d], source description), or None without an SAE.

  The scores come from `analysis/concepts.npz` (the analysis stage's pairs, by default the training
  split) unless `retrieval.fit_on` resolves to "eval", in which case they are computed from the SAE
  on the scored pairs (the authors' protocol).
  """
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
  on_eval = rcfg.fit_on == "eval" and inputs.source == "pooled"
  if mode == "concepts" or (mode == "auto" and found and not on_eval):
    if not found:
      raise SaeJaxError(
        f'{concepts}: missing (config.retrieval.attribution="concepts"); run experiments.analyze first'
      )
    with np.load(concepts, allow_pickle=False) as z:
      if "attribution" not in z.files or "D" not in z.files:
        raise SaeJaxError(f'{concepts}: expected arrays "attribution" and "D", got {z.files}')
      scores = _scores_by_rule(z["attribution"], z["energy"] if "energy" in z.files else None)
      analysis_input = config.analysis.embeddings_path or os.path.join(
        _pooled_dir(rcfg, workdir), f"pooled_{config.analysis.variant}.npz"
      )
      eval_split = inputs.fit_info.get("eval_split", "")
      inputs.fit_info.update(
        fit_on="analysis",
        fit_split=analysis_input,
        fit_disjoint=bool(eval_split)
        and os.path.dirname(os.path.abspath(analysis_input)) != os.path.dirname(os.path.abspath(eval_split)),
      )
      return scores, np.asarray(z["D"], np.float32), concepts
  try:
    loaded = workdir_lib.load_sae(sae_workdir)
  except SaeJaxError:
    if mode == "sae":
      raise
    return None
  if inputs.fit_pairs is None:
    where = inputs.fit_info.get("fit_split") or f"pooled_{rcfg.base_variant}.npz"
    raise SaeJaxError(
      f'attribution needs matched image/text pairs: {where} is missing or has no "image" and "text" '
      f"arrays (config.retrieval.fit_on={rcfg.fit_on!r}); run experiments.extract or experiments.analyze"
    )
  scores = concept_scores_from_sae(loaded.params, loaded.k, *inputs.fit_pairs, spec=loaded.spec)
  return scores, np.asarray(loaded.params["D"], np.float32), f"{sae_workdir} step {loaded.step}"


# --------------------------------------------------------------------------------------------
# Projectors applied to the base variant: removal (Eq. 8-10), the oracle, whitening.
# --------------------------------------------------------------------------------------------


def _full_rank(scores_and_d: tuple, fraction: float) -> tuple[int, int]:
  """(number of atoms selected, the largest removal rank they allow)."""
  _, D, _ = scores_and_d
  m = metrics.top_fraction_size(fraction, D.shape[0], "config.retrieval.removal_fraction")
  return m, min(m, D.shape[1])


class RealignWhitening:
  """ReAlign (the authors' baseline): per task, one whitening per side fitted on that side's rows.

  Transductive by construction (fitted on the very query and candidate sets that are scored; no
  labels are used). `fitted` keeps each task's (query, candidate) projectors for `save`.
  """

  kind = "realign"

  def __init__(self, alpha: float):
    self.alpha = float(alpha)
    self.fitted: dict[str, tuple[retrieval.Projector, retrieval.Projector]] = {}

  def apply(self, task: str, data: retrieval_tasks.TaskData) -> retrieval_tasks.TaskData:
    qp, cp = retrieval.fit_realign(data.queries, data.candidates, self.alpha)
    self.fitted[task] = (qp, cp)
    return dataclasses.replace(
      data, queries=qp.transform(data.queries), candidates=cp.transform(data.candidates)
    )

  def save(self, path: str) -> None:
    arrays = {"kind": np.asarray("realign"), "alpha": np.asarray(self.alpha)}
    for task, (qp, cp) in self.fitted.items():
      for side, p in (("queries", qp), ("candidates", cp)):
        arrays[f"{task}__{side}__mean"] = p.mean
        arrays[f"{task}__{side}__matrix"] = p.matrix
    workdir_lib.atomic_savez(path, **arrays)


def apply_projector(proj, task: str, data: retrieval_tasks.TaskData) -> retrieval_tasks.TaskData:
  """`data` under a fitted `retrieval.Projector` (both sides) or a per-task `RealignWhitening`."""
  if isinstance(proj, RealignWhitening):
    return proj.apply(task, data)
  return data.map(proj.transform)


def removal_rules(rcfg: Any) -> list[str]:
  """`retrieval.removal_by` first, then the `retrieval.removal_compare` rules (no repeats)."""
  rules = [rcfg.removal_by] + [r for r in config_utils.as_tuple(rcfg.removal_compare) if r]
  for r in rules:
    if r not in REMOVAL_BY:
      raise SaeJaxError(f"config.retrieval.removal_by / removal_compare: {r!r} is not one of {REMOVAL_BY}")
  return list(dict.fromkeys(rules))


def removal_name(rcfg: Any, rule: str) -> str:
  """Projector / variant suffix: "removal" for `retrieval.removal_by`, "removal_by_<rule>" else."""
  return "removal" if rule == rcfg.removal_by else f"removal_by_{rule}"


def fit_projectors(rcfg: Any, inputs: Inputs, attribution: Optional[tuple]) -> dict:
  """{name: (projector, settings recorded with its results)} for the base variant."""
  projectors: dict[str, tuple[Any, dict]] = {}
  fraction = float(rcfg.removal_fraction)
  if attribution is not None:
    scores, D, a_src = attribution
    m, full = _full_rank(attribution, fraction)
    rank = int(rcfg.removal_rank)
    rank = full if rank == -1 else rank
    for rule in removal_rules(rcfg):
      if rule not in scores:
        raise SaeJaxError(f'config.retrieval.removal_by="{rule}": {a_src} holds no "{rule}" scores')
      proj = retrieval.fit_removal(D, scores[rule], rank, fraction)
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
    oracle = retrieval.subspace_projector(inputs.oracle)
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
  if mode not in retrieval.WHITENING_MODES:
    raise SaeJaxError(
      f"config.retrieval.whitening_mode={mode!r}: expected one of {retrieval.WHITENING_MODES}"
    )
  alpha = float(rcfg.whitening_alpha)
  if bool(rcfg.whitening) and base in inputs.variants and mode == "realign":
    settings = {"whitening_mode": "realign", "whitening_alpha": alpha, "whitening_eps": retrieval.REALIGN_EPS}
    projectors["whitening"] = (
      RealignWhitening(alpha),
      {**settings, "whitening_fit": "per side, scored rows"},
    )
  elif bool(rcfg.whitening) and base in inputs.variants:
    arrs = inputs.variants[base]
    fit_rows = [arrs[k] for k in ("image", "text") if k in arrs]
    if not fit_rows:  # explicit-only variant: fit on every query / candidate it holds
      fit_rows = [arrs[k] for k in arrs if k.endswith("__queries") or k.endswith("__candidates")]
    if fit_rows:
      wp = retrieval.fit_whitening(np.concatenate([np.asarray(x, np.float32) for x in fit_rows]), alpha)
      projectors["whitening"] = (
        wp,
        {"whitening_mode": "joint", "whitening_alpha": alpha, "whitening_fit_rows": wp.info["n_fit"]},
      )
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
) -> dict:
  """Recall@K (percent) of one task by cosine similarity (`normalize=False`: rows already unit).

  `allow_unscorable`: queries without a positive count as misses (denominator: every query).
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

  def ks_within(self, data: retrieval_tasks.TaskData) -> tuple:
    """The configured K that fit the task's candidate pool (one fewer when the reference is excluded)."""
    pool = data.n_candidates - (1 if self.exclude_reference and data.exclude is not None else 0)
    return tuple(k for k in self.ks if k <= pool)

  def recall(self, unit_rows: retrieval_tasks.TaskData) -> dict:
    """Recall@K of a task whose rows are already L2-normalised; K above the pool are left out and
    listed under `ks_dropped`."""
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
      **self.kwargs,
    )
    dropped = [k for k in self.ks if k not in ks]
    if dropped:
      rec["ks_dropped"] = dropped
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
) -> tuple[dict, dict]:
  """Recall@K of every task x variant, and of the base variant under each projector.

  Returns (results {task: {variant: record}}, the base variant's TaskData per task). With
  `embeddings_dir`, each scored embedding set is written there as it is scored, so only one task's
  arrays are held at a time.
  """
  results: dict = {}
  base_data: dict[str, retrieval_tasks.TaskData] = {}
  for task in tasks:
    spec = retrieval_tasks.TASKS[task]
    for variant, arrays in inputs.variants.items():
      data = retrieval_tasks.build_task(task, arrays, source=f"pooled_{variant}.npz")
      if data is None:
        continue
      data = data.subset(search.max_queries, search.subset, search.subset_seed)
      if search.denominator == "scorable":
        data = data.scorable()
      runs = [(variant, data, {})]
      if variant == base:
        base_data[task] = data
        for name, (proj, extra) in projectors.items():
          runs.append((f"{variant}+{name}", apply_projector(proj, task, data), extra))
      for name, d_run, extra in runs:
        d_run = _normalized(d_run)
        rec = recorded(progress, f"recall-{task}-{name}", lambda d_run=d_run: search.recall(d_run))
        rec["settings"] = _settings_of(variant, name, spec, search, d_run, inputs.source, extra)
        results.setdefault(task, {})[name] = rec
        logging.info(
          "retrieval %s %s: %s", task, name, {k: round(v, 2) for k, v in rec.items() if k.startswith("R@")}
        )
        if embeddings_dir is not None:
          write_embeddings(os.path.join(embeddings_dir, f"embeddings_{task}_{name}.npz"), d_run)
  if not results:
    raise SaeJaxError(f"config.retrieval.tasks={tasks}: none of them can be built from {inputs.description}")
  return results, base_data


def sweep_removal_rank(
  rcfg: Any,
  attribution: tuple,
  data: retrieval_tasks.TaskData,
  search: _Search,
  oracle: Optional[dict],
  progress: Optional[BlockProgress] = None,
) -> dict:
  """Recall@K of the base variant of `rcfg.sweep_task` against the removal rank r (r = 0: none).

  Swept for every rule of `removal_rules` (`by_rule`); `metrics` / `ranks_used` are the
  `retrieval.removal_by` rule's. `ranks_used` is the rank removed after the cut of near-zero
  singular values (`retrieval.removal_basis`), at most the requested r.
  """
  scores, D, a_src = attribution
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
      proj = retrieval.fit_removal(D, scores[rule], r, fraction) if r else None
      used.append(int(proj.info["rank"]) if proj is not None else 0)
      d_r = data.map(proj.transform) if proj is not None else data
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
# Outputs.
# --------------------------------------------------------------------------------------------


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


def _fmt(x) -> str:
  return f"{x:.2f}"


def result_ks(results: dict) -> list[str]:
  """The R@K columns present in `results`, in increasing K (a K some task reports)."""
  ks = {
    int(key[2:]) for by_var in results.values() for r in by_var.values() for key in r if key.startswith("R@")
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
    ("Whitening (baseline)", f"{base}+whitening"),
    ("Oracle removal", f"{base}+oracle_removal"),
  ]
  cols = result_ks(results)
  lines = [
    "# Table 2: Base vs Removal of the attribution subspace (paper Eq. 8-10)",
    "",
    f"Source: {description}",
    "",
    f"| Task | Setting | queries | candidates | subset | {' | '.join(cols)} | settings |",
    "|---|---|---:|---:|---|" + "---:|" * len(cols) + "---|",
  ]
  any_row = False
  for task, by_var in results.items():
    for label, v in rows:
      if v in by_var:
        r = by_var[v]
        s = r["settings"]
        note = ", ".join(
          f"{key}={s[key]}"
          for key in (
            "removal_by",
            "removal_rank",
            "removal_fraction",
            "n_atoms",
            "fit_on",
            "fit_disjoint",
            "whitening_mode",
            "whitening_alpha",
          )
          if key in s
        )
        lines.append(
          f"| {retrieval_tasks.TASKS[task].label} | {label} | {r['n_queries']} | {r['n_candidates']} | "
          f"{subset_of(r)} | {_recall_cells(r, cols)} | {note} |"
        )
        any_row = True
  if not any_row:
    lines.append(f"| (no base variant evaluated) |{' |' * (len(cols) + 5)}")
  if not any(f"{base}+removal" in v for v in results.values()):
    lines += ["", "Removal not run: no SAE checkpoint and no analysis/concepts.npz for the attribution."]
  notes = _size_notes(results)
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


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
) -> list[str]:
  """Projectors, results.json, Tables 2-3, Figure 4 and the rank sweep (when run); the scored
  embeddings are moved in from `staging`. Returns the files written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, file in (("removal", "removal_projector.npz"), ("whitening", "whitening_projector.npz")):
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
  workdir_lib.atomic_write_json(os.path.join(out_dir, RESULTS_FILE), results, indent=2)
  workdir_lib.atomic_write_text(
    os.path.join(out_dir, "table2.md"), table2_markdown(results, base, description)
  )
  workdir_lib.atomic_write_text(os.path.join(out_dir, "table3.md"), table3_markdown(results))
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
    subset=_choice(rcfg.subset, retrieval_tasks.SUBSET_MODES, "config.retrieval.subset"),
    subset_seed=int(rcfg.subset_seed),
    denominator=_choice(rcfg.denominator, DENOMINATORS, "config.retrieval.denominator"),
  )
  base = rcfg.base_variant
  out_dir = os.path.join(workdir, "retrieval")

  # Load: embeddings, and the attribution the removal is fitted on.
  inputs = load_inputs(config, workdir)
  logging.info("retrieval inputs: %s", inputs.description)
  attribution = load_attribution(config, workdir, inputs) if bool(rcfg.removal) else None

  # Compute: projectors, every task x variant, the rank sweep; each scored setting is kept in
  # <workdir>/.progress/retrieval/ until the outputs are written (a signal stops after one).
  projectors = fit_projectors(rcfg, inputs, attribution)
  progress = BlockProgress(workdir, "retrieval", retrieval_fingerprint(rcfg, inputs, attribution))
  # The scored embeddings are written as they are scored (one task's arrays in memory at a time) into
  # a staging directory, moved into retrieval/ only once everything else succeeded.
  staging = None
  if bool(rcfg.save_embeddings):
    os.makedirs(workdir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".retrieval-staging-", dir=workdir)
  try:
    results, base_data = evaluate_all(tasks, inputs, base, projectors, search, staging, progress)
    sweep = None
    if attribution is not None and rcfg.sweep_task in base_data:
      oracle = results.get(rcfg.sweep_task, {}).get(f"{base}+oracle_removal")
      sweep = sweep_removal_rank(rcfg, attribution, base_data[rcfg.sweep_task], search, oracle, progress)

    # Write.
    written = write_outputs(out_dir, results, projectors, sweep, base, inputs.description, staging)
    progress.clear()
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)
  seconds = time.time() - t0
  logging.info("retrieval: wrote %s in %.1f s", out_dir, seconds)
  if log is not None:
    for line in summary_lines(results, base, out_dir, written, seconds):
      log(line)
    if config.preset_note:
      log(f"  {config.preset_note}")
  return results
