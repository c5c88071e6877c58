"""The retrieval stage's inputs: the embeddings scored (synthetic planted pairs or pooled files), the
pairs the removal is fitted on, the validation split the settings are chosen on (disjoint by image
from the scored rows), and the per-concept scores of every removal rule (`Attribution`).

`load_inputs(config, workdir)` -> `Inputs`; `load_attribution(config, workdir, inputs)` ->
`Attribution` or None. Used by `sae_jax.stages.retrieve`.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional

import numpy as np
from absl import logging
from etils import epath

from sae_jax import config_utils, metrics, removal, retrieval_tasks
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.block_encoder import encode_rows
from sae_jax.data import synthetic
from sae_jax.errors import SaeJaxError

SELECT_ON = ("none", "validation")


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
    validation: Optional[tuple] = None,
  ):
    self.source = source
    self.variants = variants  # variant -> {name: array}
    self.fit_pairs = fit_pairs  # (image [N, d], text [N, d]) for attribution, or None
    self.oracle = oracle  # [m, d] true distractor atoms (synthetic) or None
    self.description = description
    # Where the fit pairs come from: {"fit_on", "fit_split", "eval_split", "fit_disjoint", ...}.
    self.fit_info = fit_info or {}
    # (image [N, d], text [N, d], image ids [N]) the settings are chosen on (retrieval.select_on =
    # "validation"), disjoint by image from every scored row; None without a selection.
    self.validation = validation


def select_on(rcfg) -> str:
  return choice(rcfg.select_on, SELECT_ON, "config.retrieval.select_on")


def _row_ids(arrays: dict) -> np.ndarray:
  n = np.shape(arrays["image"])[0]
  return np.asarray(arrays.get("image_ids", arrays.get("sample_ids", np.arange(n))))


def _cap_rows(rcfg, image, text, ids) -> tuple:
  """The validation pairs, at most `retrieval.validation_max_pairs` of them (a seeded subset)."""
  cap = int(rcfg.validation_max_pairs)
  n = np.shape(image)[0]
  if cap and n > cap:
    rows = np.sort(np.random.default_rng([int(rcfg.validation_seed), 23]).choice(n, cap, replace=False))
    image, text, ids = image[rows], text[rows], ids[rows]
  return np.asarray(image, np.float32), np.asarray(text, np.float32), np.asarray(ids)


def _carve_validation(rcfg, variants: dict, base: str) -> tuple[tuple, dict]:
  """Moves a seeded, image-disjoint `retrieval.validation_fraction` of the base variant's pairs out of
  every variant's paired rows (they are no longer scored). Returns (validation pairs, fit_info)."""
  arrays = variants.get(base, {})
  if "image" not in arrays or "text" not in arrays:
    raise SaeJaxError(
      f'config.retrieval.select_on="validation": the base variant {base!r} has no matched "image" and '
      '"text" arrays to draw a validation split from'
    )
  ids = _row_ids(arrays)
  n = ids.shape[0]
  val, scored = removal.validation_split(ids, float(rcfg.validation_fraction), int(rcfg.validation_seed))
  pairs = _cap_rows(rcfg, np.asarray(arrays["image"])[val], np.asarray(arrays["text"])[val], ids[val])
  for arr in variants.values():
    if "image" not in arr or np.shape(arr["image"])[0] != n or not np.array_equal(_row_ids(arr), ids):
      continue  # explicit (e.g. M-BEIR) tasks are not paired rows: they stay whole
    for key in list(arr):
      if "__" not in key and np.ndim(arr[key]) >= 1 and np.shape(arr[key])[0] == n:
        arr[key] = np.asarray(arr[key])[scored]
  info = {
    "validation_split": f"{float(rcfg.validation_fraction):g} of the scored images (seed {int(rcfg.validation_seed)})",
    "validation_pairs": int(pairs[0].shape[0]),
    "validation_images": int(np.unique(pairs[2]).size),
  }
  return pairs, info


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
  n = int(rcfg.synthetic_pairs)
  n_fit = int(rcfg.synthetic_fit_pairs)
  seed = int(rcfg.synthetic_seed)
  ev = synthetic.open_planted(config.data.synthetic, n, seed)
  variants = {"mean": {"image": ev.image, "text": ev.text, "sample_ids": ev.sample_ids}}
  validation = None
  if _fit_on(rcfg, True) == "train":  # the attribution is fitted on separate pairs
    held = synthetic.open_planted(config.data.synthetic, n_fit, seed + 1, with_truth=False)
    fit = (held.image, held.text, held.sample_ids)
    fit_info = {"fit_on": "train", "fit_split": f"synthetic seed {seed + 1}", "fit_disjoint": True}
    if select_on(rcfg) == "validation":  # the fit split is the validation split
      validation = _cap_rows(rcfg, *fit)
      fit_info.update(validation_split=fit_info["fit_split"], validation_pairs=int(validation[0].shape[0]))
  elif select_on(rcfg) == "validation":  # carved out of the eval pairs, fitted on too
    validation, info = _carve_validation(rcfg, variants, "mean")
    fit = validation
    fit_info = {"fit_on": "validation", "fit_split": info["validation_split"], "fit_disjoint": True, **info}
  else:
    fit = (ev.image, ev.text)
    fit_info = {"fit_on": "eval", "fit_split": f"synthetic seed {seed}", "fit_disjoint": False}
  fit_info.update(eval_split=f"synthetic seed {seed}", fit_pairs=int(fit[0].shape[0]))
  return Inputs(
    "synthetic",
    variants,
    (fit[0], fit[1]),
    ev.truth.distractors,
    f"PlantedSource: {variants['mean']['image'].shape[0]} eval pairs (seed {seed}), fit pairs: "
    f"{fit_info['fit_split']}",
    fit_info,
    validation,
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
  train_path = str(rcfg.fit_file) or os.path.join(_pooled_dir(rcfg, workdir), f"pooled_{base}.npz")
  fit_on = _fit_on(rcfg, rcfg.split == "eval" or bool(rcfg.fit_file))
  fit, fit_info, validation = None, {"fit_on": fit_on, "eval_split": eval_path}, None
  select = select_on(rcfg) == "validation"
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
      if select:  # the fit split is the validation split, less any row that shows a scored image
        ids = np.arange(image.shape[0]) if fit_ids is None else np.asarray(fit_ids)
        keep = np.ones(ids.shape[0], bool) if eval_ids is None else ~np.isin(ids, eval_ids)
        validation = _cap_rows(rcfg, image[keep], text[keep], ids[keep])
        fit_info.update(validation_split=train_path, validation_pairs=int(validation[0].shape[0]))
  elif select and base in variants:  # carved out of the scored pairs (and fitted on)
    validation, info = _carve_validation(rcfg, variants, base)
    fit = validation[:2]
    fit_info.update(fit_on="validation", fit_split=info["validation_split"], fit_disjoint=True, **info)
  elif base in variants and "image" in variants[base] and "text" in variants[base]:
    fit = (variants[base]["image"], variants[base]["text"])
    fit_info.update(fit_split=eval_path, fit_disjoint=False)
  if select and validation is None and base in variants:  # no fit pairs on disk (concepts.npz)
    validation, info = _carve_validation(rcfg, variants, base)
    fit_info.update(info)
  if fit is not None:
    fit_info["fit_pairs"] = int(fit[0].shape[0])
  return Inputs(
    "pooled", variants, fit, None, f"{pooled_dir}: variants {sorted(variants)}", fit_info, validation
  )


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
  return np.asarray(concept_scores_from_sae(params, k, image, text, batch_size, spec, draws=0)["attribution"])


REMOVAL_BY = removal.RULES


def choice(value: str, allowed: tuple, field: str) -> str:
  if value not in allowed:
    raise SaeJaxError(f"{field}={value!r}: expected one of {allowed}")
  return value


class Attribution(NamedTuple):
  """What the removal is fitted from: per-rule scores, the dictionary, where they come from."""

  scores: dict  # {rule: [c] float64} for the `REMOVAL_BY` rules available
  D: np.ndarray  # [c, d]
  source: str
  diagnostics: dict  # {name: [c]} for the removed-concepts table (energy, modality_score, bridge, ...)


def _diagnostics(scores: dict, modality: Optional[np.ndarray], bridge: Optional[np.ndarray]) -> dict:
  out = {k: scores[k] for k in ("energy", "attribution", "negatives", "margin") if k in scores}
  if modality is not None:
    out["modality_score"] = np.asarray(modality, np.float64)
  if bridge is not None:
    out["bridge"] = np.asarray(bridge, np.float64)
  return out


def _sae_scores(params, k, image, text, batch_size=4096, spec=None, draws=removal.DEFAULT_DRAWS, seed=0):
  image = np.asarray(image, np.float32)
  text = np.asarray(text, np.float32)
  if image.shape != text.shape:
    raise SaeJaxError(f"attribution: image {image.shape} and text {text.shape} must be matched pairs")
  d, c = np.shape(params["W_enc"])
  spec = spec or sae_lib.SAESpec(d=d, c=c, k=k, pre_bias=True)
  code_i = encode_rows(params, spec, image, batch_size)
  code_t = encode_rows(params, spec, text, batch_size)
  D = np.asarray(params["D"], np.float32)
  cm = metrics.compute_concept_metrics(D, code_i, code_t)
  neg = removal.negatives_attribution(D, code_i, code_t, draws, seed) if draws else None
  return removal.rule_scores(cm.attribution, cm.energy, neg), cm


def concept_scores_from_sae(
  params: dict,
  k: int,
  image: np.ndarray,
  text: np.ndarray,
  batch_size: int = 4096,
  spec: Optional[sae_lib.SAESpec] = None,
  draws: int = removal.DEFAULT_DRAWS,
  seed: int = 0,
) -> dict:
  """{rule: [c] float64} for every `REMOVAL_BY` rule, from an SAE over matched pairs; the unmatched
  rules (`negatives`, `margin`) over `draws` seeded derangements of the pairs (none when 0)."""
  return _sae_scores(params, k, image, text, batch_size, spec, draws, seed)[0]


def load_attribution(config, workdir, inputs: Inputs) -> Optional[Attribution]:
  """The `Attribution` the removal is fitted from, or None without an SAE.

  The scores come from `analysis/concepts.npz` (the analysis stage's pairs, by default the training
  split) unless `retrieval.fit_on` resolves to "eval", in which case they are computed from the SAE
  on the scored pairs (the authors' protocol). The unmatched-pair rules (`negatives`, `margin`) need
  the SAE: concepts.npz does not hold them.
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
  unmatched = [r for r in removal_rules(rcfg) if r in removal.UNMATCHED_RULES]
  if mode == "concepts" and unmatched:
    raise SaeJaxError(
      f"config.retrieval.removal_by / removal_compare: {unmatched} need unmatched pairs, which "
      'analysis/concepts.npz does not hold; set config.retrieval.attribution="sae" (or "auto")'
    )
  if mode == "concepts" or (mode == "auto" and found and not on_eval and not unmatched):
    if not found:
      raise SaeJaxError(
        f'{concepts}: missing (config.retrieval.attribution="concepts"); run experiments.analyze first'
      )
    with np.load(concepts, allow_pickle=False) as z:
      if "attribution" not in z.files or "D" not in z.files:
        raise SaeJaxError(f'{concepts}: expected arrays "attribution" and "D", got {z.files}')
      get = lambda key: z[key] if key in z.files else None
      scores = removal.rule_scores(z["attribution"], get("energy"))
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
      diag = _diagnostics(scores, get("modality_score"), get("bridge_diag"))
      return Attribution(scores, np.asarray(z["D"], np.float32), concepts, diag)
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
  scores, cm = _sae_scores(
    loaded.params,
    loaded.k,
    *inputs.fit_pairs,
    spec=loaded.spec,
    draws=int(rcfg.negatives_draws),
    seed=int(rcfg.negatives_seed),
  )
  return Attribution(
    scores,
    np.asarray(loaded.params["D"], np.float32),
    f"{sae_workdir} step {loaded.step}",
    _diagnostics(scores, cm.modality_score, cm.bridge_diag),
  )


def removal_rules(rcfg: Any) -> list[str]:
  """`retrieval.removal_by` first, then the `retrieval.removal_compare` rules (no repeats)."""
  rules = [rcfg.removal_by] + [r for r in config_utils.as_tuple(rcfg.removal_compare) if r]
  for r in rules:
    if r not in REMOVAL_BY:
      raise SaeJaxError(f"config.retrieval.removal_by / removal_compare: {r!r} is not one of {REMOVAL_BY}")
  return list(dict.fromkeys(rules))
