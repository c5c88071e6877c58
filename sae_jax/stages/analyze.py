"""The analysis stage: a trained SAE + matched image/text embeddings -> the paper's Section 3.

`run_analysis(config, workdir)` (driven by `config.analysis`, see configs/base.py) writes
`<workdir>/analysis/`:

  concepts.npz              per-concept energy, energy_image, energy_text, fire rates, modality_score
                            (+ modality_reverse, n_silent), attribution, bridge_score with
                            bridge_reduction beside it, every bridge reduction computed
                            (bridge_diag/row/col/sym[/max]), the unit-norm dictionary D, run_name,
                            codes_mode, n_pairs
  codes.npz                 (analysis.save_codes) image_values, image_indices, text_values,
                            text_indices [N, k], sample_ids
  table1.json, table1.md    Jaccard of the top-fraction sets and the triple overlap, this run and
                            the runs of analysis.compare_workdirs side by side (paper Table 1)
  top_bridge_pairs.csv      top (i, j) pairs by B_ij among co-occurring pairs (analysis.top_pairs)
  fig_modality_kde.png      paper Figure 2, one panel per run
  fig_cumulative_energy.png paper Figure 3, the runs overlaid
  summary.json              inputs, modes, timings, and for the synthetic source the match of learned
                            to planted concepts (per-kind modality scores, AUCs, distractor ranks)

Codes (analysis.codes): "encode_pooled" (default, the paper's Appendix B: encode the mean-pooled
embedding of each sample) or "pool_token_codes" (encode each token, then average the token codes of
a sample; the union of their supports is kept, so rows are wider than k). The choice is recorded.

Steps: load (`load_pairs`, `check_pairs`) -> compute (`compute_analysis`: codes through the shared
`BlockEncoder`, streamed concept sums (`analysis_codes`), the blockwise bridge when needed; the
planted source's check in `analysis_planted`) -> write (`write_*`, each
file through the atomic writers of `sae_jax.workdir`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import ml_collections
import numpy as np

from sae_jax import metrics, preemption, sharding
from sae_jax import workdir as workdir_lib
from sae_jax.data.synthetic import PlantedTruth, open_planted
from sae_jax.errors import SaeJaxError
from sae_jax.plots import analysis as plots
from sae_jax.stages import analysis_codes, analysis_planted
from sae_jax.stages.block_progress import BlockProgress, digest

ANALYSIS_DIR = "analysis"
SOURCES = ("auto", "synthetic", "pooled")


class Pairs(NamedTuple):
  image: np.ndarray  # [N, d] float32
  text: np.ndarray  # [N, d]
  sample_ids: np.ndarray  # [N]
  source: str  # "synthetic" | "pooled"
  path: str  # file read, or "" for synthetic
  planted: Optional[PlantedTruth]  # the ground truth of the synthetic source, else None
  image_ids: Optional[np.ndarray] = None  # [N] rows with the same id are one image (pooled files)


# ------------------------------------------------------------------------------------ inputs


def _synthetic_cfg(config: Any, loaded: workdir_lib.LoadedSAE) -> Any:
  """The planted source the SAE was trained on (its config.json), else this config's."""
  try:
    return ml_collections.ConfigDict(loaded.config.data.synthetic.to_dict())
  except (AttributeError, KeyError):
    return config.data.synthetic


def load_pairs(config: Any, workdir: str, loaded: workdir_lib.LoadedSAE, sae_dir: str) -> Pairs:
  """Matched embeddings from the extraction stage's pooled file or the synthetic planted source."""
  acfg = config.analysis
  source = str(acfg.source)
  if source not in SOURCES:
    raise SaeJaxError(f"config.analysis.source={source!r}: expected one of {SOURCES}")
  variant = str(acfg.variant)
  path = str(acfg.embeddings_path)
  if not path:
    candidates = [os.path.join(w, "activations", f"pooled_{variant}.npz") for w in (workdir, sae_dir)]
    path = next((p for p in candidates if workdir_lib.exists(p)), candidates[0])
  if source == "auto":
    if workdir_lib.exists(path):
      source = "pooled"
    elif str(config.data.source) == "synthetic":
      source = "synthetic"
    else:
      raise SaeJaxError(
        f"{path} is missing: run experiments.extract first, or set "
        "config.analysis.embeddings_path / config.analysis.source='synthetic'"
      )
  if source == "synthetic":
    planted = open_planted(_synthetic_cfg(config, loaded), int(acfg.num_pairs), int(acfg.pair_seed))
    return Pairs(planted.image, planted.text, planted.sample_ids, "synthetic", "", planted.truth)
  if not workdir_lib.exists(path):
    raise SaeJaxError(f"config.analysis.embeddings_path: {path} does not exist")
  try:
    with workdir_lib.open_npz(path) as f:  # local or gs://
      if "image" not in f or "text" not in f:
        raise SaeJaxError(f"{path}: expected arrays 'image' [N, d] and 'text' [N, d], found {list(f.keys())}")
      image = np.asarray(f["image"], np.float32)
      text = np.asarray(f["text"], np.float32)
      ids = np.asarray(f["sample_ids"]) if "sample_ids" in f else np.arange(image.shape[0])
      image_ids = np.asarray(f["image_ids"]) if "image_ids" in f else None
  except (OSError, ValueError) as e:
    if isinstance(e, SaeJaxError):
      raise
    raise SaeJaxError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
  return Pairs(image, text, ids, "pooled", path, None, image_ids)


def check_pairs(pairs: Pairs, d: int, sae_dir: str) -> None:
  where = pairs.path or "synthetic source"
  for name, x in (("image", pairs.image), ("text", pairs.text)):
    if x.ndim != 2:
      raise SaeJaxError(f"{where}: '{name}' must be [N, d], got shape {x.shape}")
  if pairs.image.shape[0] != pairs.text.shape[0]:
    raise SaeJaxError(
      f"{where}: {pairs.image.shape[0]} image rows but {pairs.text.shape[0]} text rows; "
      "expected matched pairs (row i of each = one image-caption pair)"
    )
  if pairs.image.shape[0] == 0:
    raise SaeJaxError(f"{where}: no image/text pairs (0 rows)")
  for name, x in (("image", pairs.image), ("text", pairs.text)):
    if x.shape[1] != d:
      raise SaeJaxError(
        f"{where}: '{name}' embeddings have width {x.shape[1]} but the SAE in "
        f"{sae_dir} has d={d} (config.analysis.sae_workdir / embeddings_path)"
      )
    if not np.all(np.isfinite(x)):
      raise SaeJaxError(f"{where}: '{name}' embeddings contain NaN or Inf")


# ------------------------------------------------------------------------------------ compute


class AnalysisResult(NamedTuple):
  cm: metrics.ConceptMetrics
  bridge: Optional[metrics.BridgeResult]  # only when top pairs or the `max` reduction need B itself
  bridge_score: np.ndarray  # [c] under config.analysis.bridge_reduction
  image_codes: Any  # (values, indices) [N, width], or None when not kept
  text_codes: Any
  code_info: dict  # codes mode and its settings
  seconds: dict


def _check_settings(acfg: Any) -> None:
  reduction = str(acfg.bridge_reduction)
  if reduction not in metrics.REDUCTIONS:
    raise SaeJaxError(f"config.analysis.bridge_reduction={reduction!r}: expected one of {metrics.REDUCTIONS}")
  metrics.top_fraction_size(float(acfg.top_fraction), 1, "config.analysis.top_fraction")


# Eq. 3's expectation: "pairs" = over matched pairs, images and captions 50/50 (an image with 5
# captions counts 5 times); "unique_images" = the image half over each image once.
ENERGY_WEIGHTINGS = ("pairs", "unique_images")


def unique_image_energy(
  cm: metrics.ConceptMetrics, image_codes: tuple, image_ids: np.ndarray
) -> metrics.ConceptMetrics:
  """`cm` with the image energy averaged over unique images (first row of each id) and
  energy = (E_image + E_text) / 2 recomputed from it; the other metrics are unchanged."""
  values, indices = (np.asarray(a) for a in image_codes)
  _, first = np.unique(np.asarray(image_ids), return_index=True)
  e_img = np.zeros(cm.energy.shape[0], np.float64)
  np.add.at(e_img, indices[first].ravel(), values[first].astype(np.float64).ravel())
  e_img /= first.size
  return dataclasses.replace(cm, energy_image=e_img, energy=(e_img + cm.energy_text) / 2.0)


J_KEYS = ("J(S_E,S_A)", "J(S_E,S_B)", "J(S_A,S_B)", "triple_overlap")


def table1_resampled(acfg: Any, D: np.ndarray, result: "AnalysisResult", pairs: Pairs) -> Optional[dict]:
  """Table 1 averaged over `analysis.table1_resamples` random subsets (without replacement) of
  `analysis.table1_resample_fraction` of the pairs (seed `analysis.pair_seed`); None when off.

  One run's Table 1 is a Jaccard of ceil(fraction * c)-element sets; the spread over subsets says
  how much of a difference between two runs is sampling noise.
  """
  n_res = int(acfg.table1_resamples)
  if n_res <= 0:
    return None
  frac = float(acfg.table1_resample_fraction)
  reduction = str(acfg.bridge_reduction)
  if not 0.0 < frac <= 1.0:
    raise SaeJaxError(f"config.analysis.table1_resample_fraction={frac}: expected a value in (0, 1]")
  if reduction == "max":
    raise SaeJaxError(
      'config.analysis.table1_resamples > 0 needs a per-concept bridge reduction ("diag", "row", "col" '
      'or "sym"), not "max" (the blockwise B is not recomputed per subset)'
    )
  (iv, ii), (tv, ti) = result.image_codes, result.text_codes
  n = iv.shape[0]
  m = max(1, int(round(frac * n)))
  rng = np.random.default_rng(int(acfg.pair_seed))
  ids = pairs.image_ids if pairs.image_ids is not None else pairs.sample_ids
  rows = []
  for _ in range(n_res):
    idx = np.sort(rng.choice(n, size=m, replace=False))
    cm = metrics.compute_concept_metrics(D, (iv[idx], ii[idx]), (tv[idx], ti[idx]))
    if str(acfg.energy_weighting) == "unique_images":
      cm = unique_image_energy(cm, (iv[idx], ii[idx]), np.asarray(ids)[idx])
    rows.append(
      metrics.table1(cm.energy, cm.attribution, cm.bridge_score(reduction), float(acfg.top_fraction))
    )
  vals = {k: np.array([r[k] for r in rows], np.float64) for k in J_KEYS}
  return {
    "resamples": n_res,
    "pairs_per_resample": m,
    "seed": int(acfg.pair_seed),
    "mean": {k: float(v.mean()) for k, v in vals.items()},
    "std": {k: float(v.std(ddof=1)) if n_res > 1 else 0.0 for k, v in vals.items()},
  }


def compute_analysis(
  config: Any, pairs: Pairs, loaded: workdir_lib.LoadedSAE, progress: Optional[BlockProgress] = None
) -> AnalysisResult:
  """Codes of both sides, per-concept metrics (Eq. 3-6) and, when asked for, the blockwise bridge.

  `progress`: the code blocks are saved as they finish and a signal stops the stage after one
  (`stream_codes`); the bridge, one compiled program, runs to its end."""
  acfg = config.analysis
  t0 = time.time()
  D = np.asarray(loaded.params["D"], np.float32)
  reduction = str(acfg.bridge_reduction)
  top_pairs = int(acfg.top_pairs)
  compute_dtype = str(acfg.compute_dtype)
  acc = metrics.ConceptAccumulator(D, block_size=int(acfg.block_size), compute_dtype=compute_dtype)
  need_bridge = top_pairs > 0 or reduction == "max"
  weighting = str(acfg.energy_weighting)
  if weighting not in ENERGY_WEIGHTINGS:
    raise SaeJaxError(f"config.analysis.energy_weighting={weighting!r}: expected one of {ENERGY_WEIGHTINGS}")
  by_image = weighting == "unique_images"
  resamples = int(acfg.table1_resamples)
  image, text, code_info = analysis_codes.stream_codes(
    pairs,
    loaded,
    acfg,
    acc,
    keep_codes=need_bridge or bool(acfg.save_codes) or by_image or resamples > 0,
    progress=progress,
  )
  cm = metrics.concept_metrics(acc.sums(), reverse_modality=bool(acfg.modality_reverse))
  code_info["energy_weighting"] = weighting
  if by_image:
    cm = unique_image_energy(cm, image, pairs.image_ids if pairs.image_ids is not None else pairs.sample_ids)
  t_metrics = time.time() - t0

  bridge = None
  if need_bridge:
    mesh = sharding.make_mesh(config.mesh) if int(config.mesh.model) > 1 else None
    bridge = metrics.bridge_blockwise(
      D,
      image,
      text,
      top_k=max(top_pairs, 1),
      tile=int(acfg.bridge_tile),
      mesh=mesh,
      compute_dtype=compute_dtype,
    )
  t_bridge = time.time() - t0 - t_metrics
  score = cm.bridge_score(reduction, None if bridge is None else bridge.max_score)
  seconds = {"encode_and_metrics": t_metrics, "bridge_blockwise": t_bridge}
  return AnalysisResult(cm, bridge, score, image, text, code_info, seconds)


# ------------------------------------------------------------------------------------ outputs


def _run_name(acfg: Any, workdir: str) -> str:
  return str(acfg.run_name) or os.path.basename(os.path.normpath(workdir))


def _this_run(name: str, workdir: str, result: AnalysisResult, fraction: float) -> dict:
  cm = result.cm
  return {
    "name": name,
    "workdir": workdir,
    "energy": cm.energy,
    "modality_score": cm.modality_score,
    "table1": metrics.table1(cm.energy, cm.attribution, result.bridge_score, fraction),
  }


def load_compare_run(path: str, fraction: float, reduction: str, reverse: bool) -> dict:
  """Another workdir's analysis/concepts.npz as a Table 1 row and figure entry."""
  conc = os.path.join(path, ANALYSIS_DIR, "concepts.npz")
  if not os.path.exists(conc):
    raise SaeJaxError(
      f"config.analysis.compare_workdirs: {conc} is missing (run experiments.analyze on that workdir first)"
    )
  with np.load(conc, allow_pickle=False) as f:
    key = f"bridge_{reduction}"
    if key not in f:
      raise SaeJaxError(f"{conc}: has no '{key}' (it was analysed without that bridge reduction)")
    ms = np.asarray(f["modality_score"], np.float64)
    if bool(f["modality_reverse"]) != reverse:
      ms = 1.0 - ms
    name = str(f["run_name"]) if "run_name" in f else os.path.basename(os.path.normpath(path))
    row = metrics.table1(f["energy"], f["attribution"], f[key], fraction)
    return {
      "name": name,
      "workdir": path,
      "energy": np.asarray(f["energy"]),
      "modality_score": ms,
      "table1": row,
    }


def write_concepts(out_dir: str, result: AnalysisResult, D: np.ndarray, name: str, acfg: Any) -> None:
  cm = result.cm
  arrays = dict(
    energy=cm.energy,
    energy_image=cm.energy_image,
    energy_text=cm.energy_text,
    fire_rate_image=cm.fire_rate_image,
    fire_rate_text=cm.fire_rate_text,
    modality_score=cm.modality_score,
    modality_reverse=np.array(bool(acfg.modality_reverse)),
    n_silent=np.array(cm.n_silent),
    attribution=cm.attribution,
    bridge_score=result.bridge_score,
    bridge_reduction=np.array(str(acfg.bridge_reduction)),
    bridge_diag=cm.bridge_diag,
    bridge_row=cm.bridge_row,
    bridge_col=cm.bridge_col,
    bridge_sym=cm.bridge_sym,
    D=D,
    run_name=np.array(name),
    codes_mode=np.array(result.code_info["codes"]),
    n_pairs=np.array(cm.n_pairs),
    mean_pair_dot=np.array(cm.mean_pair_dot),
  )
  if result.bridge is not None:
    arrays["bridge_max"] = result.bridge.max_score
  workdir_lib.atomic_savez(os.path.join(out_dir, "concepts.npz"), **arrays)


def write_codes(out_dir: str, result: AnalysisResult, sample_ids: np.ndarray, save: bool) -> None:
  path = os.path.join(out_dir, "codes.npz")
  if not save:
    if os.path.exists(path):  # stale codes of an earlier run
      os.remove(path)
    return
  workdir_lib.atomic_savez(
    path,
    image_values=result.image_codes[0],
    image_indices=result.image_codes[1],
    text_values=result.text_codes[0],
    text_indices=result.text_codes[1],
    sample_ids=sample_ids,
    codes_mode=np.array(result.code_info["codes"]),
  )


# Reading choices behind Table 1, printed under it.
TABLE1_NOTES = (
  "Notes: every set holds ceil(fraction * c) concepts, so a Jaccard index here is i / (2m - i) for "
  "set size m. The paper's Table 1 cannot come from such single sets: e.g. its CLIP J(S_E,S_B) = "
  "0.6831 is no Jaccard index of two sets of at most 90 elements (the nearest, 69/101, is 0.6832); "
  "it was presumably averaged over seeds or subsets (analysis.table1_resamples does that here).",
  "Eq. 6 is read with M = D D^T (c x c), the reading under which the product types (the paper "
  "prints D^T D). Energy (Eq. 3) averages over matched pairs, images and captions 50/50, unless "
  'analysis.energy_weighting="unique_images".',
)


def write_table1(out_dir: str, rows: list[dict], fraction: float, reduction: str) -> None:
  payload = {
    "fraction": fraction,
    "bridge_reduction": reduction,
    "rows": [
      dict(
        run=r["name"],
        workdir=r["workdir"],
        **r["table1"],
        **{k: r[k] for k in ("table1_resampled",) if k in r},
      )
      for r in rows
    ],
  }
  workdir_lib.atomic_write_json(os.path.join(out_dir, "table1.json"), payload, indent=2)
  lines = [
    f"Jaccard similarity between top {100 * fraction:g}% concept sets "
    f"(S_E energy, S_A attribution, S_B bridge score, reduction `{reduction}`)",
    "",
    "| Run | c | set size | J(S_E,S_A) | J(S_E,S_B) | J(S_A,S_B) | Triple overlap |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    t = r["table1"]
    lines.append(
      f"| {r['name']} | {t['c']} | {t['set_size']} | {t['J(S_E,S_A)']:.4f} | "
      f"{t['J(S_E,S_B)']:.4f} | {t['J(S_A,S_B)']:.4f} | {t['triple_overlap']:.4f} |"
    )
  for r in rows:
    if "table1_resampled" in r:
      s = r["table1_resampled"]
      lines += [
        "",
        f"{r['name']}, mean ± std over {s['resamples']} random subsets of {s['pairs_per_resample']} pairs "
        f"(seed {s['seed']}): " + " | ".join(f"{k} {s['mean'][k]:.4f} ± {s['std'][k]:.4f}" for k in J_KEYS),
      ]
  lines += ["", *TABLE1_NOTES]
  workdir_lib.atomic_write_text(os.path.join(out_dir, "table1.md"), "\n".join(lines) + "\n")


def write_pairs_csv(path: str, res: metrics.BridgeResult, D: np.ndarray, ms: np.ndarray) -> None:
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  w.writerow(["rank", "concept_i", "concept_j", "B_ij", "cooccurrence", "cosine", "modality_i", "modality_j"])
  for r, (i, j, v, co) in enumerate(zip(res.pairs_i, res.pairs_j, res.pairs_value, res.pairs_cooc)):
    cosine = float(np.dot(D[i].astype(np.float64), D[j].astype(np.float64)))
    w.writerow(
      [r + 1, int(i), int(j), f"{v:.8g}", f"{co:.8g}", f"{cosine:.6f}", f"{ms[i]:.6f}", f"{ms[j]:.6f}"]
    )
  workdir_lib.atomic_write_text(path, buf.getvalue())


def write_top_pairs(out_dir: str, result: AnalysisResult, D: np.ndarray, top_pairs: int) -> None:
  path = os.path.join(out_dir, "top_bridge_pairs.csv")
  if result.bridge is not None and top_pairs > 0:
    write_pairs_csv(path, result.bridge, D, result.cm.modality_score)
  elif os.path.exists(path):  # left by an earlier run: it would not match these concepts
    os.remove(path)


def write_figures(out_dir: str, runs: list[dict], fraction: float, reverse: bool) -> None:
  plots.plot_modality_kde(runs, os.path.join(out_dir, "fig_modality_kde.png"), reverse=reverse)
  plots.plot_cumulative_energy(runs, os.path.join(out_dir, "fig_cumulative_energy.png"), fraction)


# ------------------------------------------------------------------------------------ the stage


def analyze(config: Any, workdir: str, loaded: workdir_lib.LoadedSAE, sae_dir: str = "") -> dict:
  """The stage on an already loaded SAE: load pairs -> compute metrics -> write analysis/."""
  acfg = config.analysis
  t0 = time.time()
  sae_dir = sae_dir or workdir
  _check_settings(acfg)
  fraction = float(acfg.top_fraction)
  reduction = str(acfg.bridge_reduction)
  reverse = bool(acfg.modality_reverse)
  D = np.asarray(loaded.params["D"], np.float32)
  c, d = D.shape

  # Load.
  pairs = load_pairs(config, workdir, loaded, sae_dir)
  check_pairs(pairs, d, sae_dir)

  # Compute (block progress in <workdir>/.progress/analysis/ until the outputs are written).
  progress = BlockProgress(
    workdir,
    "analysis",
    {
      "analysis": acfg.to_dict(),
      "sae": [sae_dir, loaded.step, digest(D)],
      "pairs": [pairs.source, pairs.path, digest(pairs.image, pairs.text)],
    },
  )
  result = compute_analysis(config, pairs, loaded, progress)
  cm = result.cm
  name = _run_name(acfg, workdir)
  this = _this_run(name, workdir, result, fraction)
  resampled = table1_resampled(acfg, D, result, pairs)
  if resampled is not None:
    this["table1_resampled"] = resampled
  others = [
    load_compare_run(p.strip(), fraction, reduction, reverse)
    for p in str(acfg.compare_workdirs).split(",")
    if p.strip() and os.path.normpath(p.strip()) != os.path.normpath(workdir)
  ]
  synthetic = None
  if pairs.planted is not None:
    synthetic = analysis_planted.synthetic_check(D, cm, pairs.planted, fraction, float(acfg.match_threshold))

  # Write.
  out_dir = os.path.join(workdir, ANALYSIS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  write_concepts(out_dir, result, D, name, acfg)
  write_codes(out_dir, result, pairs.sample_ids, bool(acfg.save_codes))
  runs = [this] + others
  write_table1(out_dir, runs, fraction, reduction)
  write_top_pairs(out_dir, result, D, int(acfg.top_pairs))
  write_figures(out_dir, runs, fraction, reverse)
  written = ["concepts.npz"] + (["codes.npz"] if bool(acfg.save_codes) else []) + ["table1.json", "table1.md"]
  written += ["top_bridge_pairs.csv"] if result.bridge is not None and int(acfg.top_pairs) > 0 else []
  written += ["fig_modality_kde.png", "fig_cumulative_energy.png", "summary.json"]
  ms = cm.modality_score[np.isfinite(cm.modality_score)]
  summary = {
    "run_name": name,
    "sae_workdir": sae_dir,
    "sae_step": loaded.step,
    "c": c,
    "d": d,
    "k": loaded.k,
    "source": pairs.source,
    "embeddings_path": pairs.path,
    "n_pairs": cm.n_pairs,
    **result.code_info,
    "bridge_reduction": reduction,
    "modality_reverse": reverse,
    "n_silent": cm.n_silent,
    "top_fraction": fraction,
    "table1": this["table1"],
    "mean_pair_dot": cm.mean_pair_dot,
    "compute_dtype": str(acfg.compute_dtype),
    "seconds": {**result.seconds, "total": time.time() - t0},
    "blocks_resumed": progress.reused,  # code blocks read back from an interrupted run
    "out_dir": out_dir,
    "outputs": written,
    # Shares of the scored concepts below / above 0.5 (the split of Figure 2).
    "modality_split": [
      float(np.mean(ms < 0.5)) if ms.size else 0.0,
      float(np.mean(ms > 0.5)) if ms.size else 0.0,
    ],
  }
  if synthetic is not None:
    summary["synthetic"] = synthetic
  workdir_lib.atomic_write_json(os.path.join(out_dir, "summary.json"), summary, indent=2)
  progress.clear()
  return summary


def summary_lines(summary: dict) -> list[str]:
  """What the analysis main prints: where the outputs are, the Table 1 row, the inputs, the time."""
  t = summary["table1"]
  low, high = ("text", "image") if summary["modality_reverse"] else ("image", "text")
  where = summary["embeddings_path"] or "synthetic planted source"
  return [
    f"analysis: wrote {summary['out_dir']}/ ({', '.join(summary['outputs'])}) in {summary['seconds']['total']:.1f} s",
    f"  pairs: {summary['n_pairs']} from {where}; SAE {summary['sae_workdir']} step {summary['sae_step']} "
    f"(c={summary['c']}, d={summary['d']}, k={summary['k']})",
    f"  Table 1 (top {100 * summary['top_fraction']:g}% = {t['set_size']} of {t['c']} concepts, bridge "
    f"{summary['bridge_reduction']}): J(S_E,S_A) {t['J(S_E,S_A)']:.4f} | J(S_E,S_B) {t['J(S_E,S_B)']:.4f} | "
    f"J(S_A,S_B) {t['J(S_A,S_B)']:.4f} | triple overlap {t['triple_overlap']:.4f}",
    f"  modality: {100 * summary['modality_split'][0]:.1f}% of scored concepts {low}-dominant, "
    f"{100 * summary['modality_split'][1]:.1f}% {high}-dominant; {summary['n_silent']} never fire",
  ]


def run_analysis(
  config: ml_collections.ConfigDict, workdir: str, log: Optional[Callable[[str], None]] = None
) -> dict:
  """Loads the SAE (this workdir or config.analysis.sae_workdir) and runs the analysis stage.

  `log` (e.g. `print`) receives the summary lines (`summary_lines`) at the end."""
  if not workdir:
    raise SaeJaxError("--workdir is required")
  acfg = config.analysis
  sae_dir = str(acfg.sae_workdir) or workdir
  step = int(acfg.sae_step)
  # SIGTERM / SIGINT: stop after the current block, exit PREEMPTED_EXIT_CODE; a re-run resumes.
  with preemption.watch():
    loaded = workdir_lib.load_sae(sae_dir, None if step < 0 else step)
    summary = analyze(config, workdir, loaded, sae_dir)
  if log is not None:
    for line in summary_lines(summary):
      log(line)
    if config.preset_note:
      log(f"  {config.preset_note}")
  return summary
