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
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
import numpy as np

from sae_jax import metrics, sharding
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.data.synthetic import KINDS, PlantedSource
from sae_jax.errors import SaeJaxError
from sae_jax.plots import analysis as plots

ANALYSIS_DIR = "analysis"
CODES_MODES = ("encode_pooled", "pool_token_codes")
SOURCES = ("auto", "synthetic", "pooled")


class Pairs(NamedTuple):
  image: np.ndarray  # [N, d] float32
  text: np.ndarray  # [N, d]
  sample_ids: np.ndarray  # [N]
  source: str  # "synthetic" | "pooled"
  path: str  # file read, or "" for synthetic
  planted: Any  # PlantedSource for the synthetic source, else None


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
    path = next((p for p in candidates if os.path.exists(p)), candidates[0])
  if source == "auto":
    if os.path.exists(path):
      source = "pooled"
    elif str(config.data.source) == "synthetic":
      source = "synthetic"
    else:
      raise SaeJaxError(
        f"{path} is missing: run experiments.extract first, or set "
        "config.analysis.embeddings_path / config.analysis.source='synthetic'"
      )
  if source == "synthetic":
    planted = PlantedSource(_synthetic_cfg(config, loaded))
    n = int(acfg.num_pairs)
    sample = planted.paired(n, seed=int(acfg.pair_seed))
    return Pairs(sample.image, sample.text, np.arange(n), "synthetic", "", planted)
  if not os.path.exists(path):
    raise SaeJaxError(f"config.analysis.embeddings_path: {path} does not exist")
  try:
    with np.load(path, allow_pickle=False) as f:
      if "image" not in f or "text" not in f:
        raise SaeJaxError(f"{path}: expected arrays 'image' [N, d] and 'text' [N, d], found {list(f.keys())}")
      image = np.asarray(f["image"], np.float32)
      text = np.asarray(f["text"], np.float32)
      ids = np.asarray(f["sample_ids"]) if "sample_ids" in f else np.arange(image.shape[0])
  except (OSError, ValueError) as e:
    if isinstance(e, SaeJaxError):
      raise
    raise SaeJaxError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
  return Pairs(image, text, ids, "pooled", path, None)


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


# ---------------------------------------------------------------------------------- encoding


def pool_token_codes(
  values: np.ndarray,
  indices: np.ndarray,
  segment: np.ndarray,
  n_segments: int,
  c: int,
  width: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Mean of the sparse token codes of each segment (sample): values/indices [n_segments, width].

  The support of a pooled row is the union of its tokens' supports (at most tokens * k); entries are
  sorted by value, zero-padded to `width` (default: the widest row). Segments without tokens stay 0.
  """
  values = np.asarray(values, np.float32)
  indices = np.asarray(indices, np.int64)
  segment = np.asarray(segment, np.int64)
  k = values.shape[1]
  tokens = np.bincount(segment, minlength=n_segments).astype(np.float64)
  keys = np.repeat(segment, k) * c + indices.reshape(-1)
  uniq, inv = np.unique(keys, return_inverse=True)
  sums = np.bincount(inv, weights=values.reshape(-1).astype(np.float64), minlength=uniq.size)
  seg, conc = uniq // c, uniq % c
  vals = sums / np.maximum(tokens[seg], 1.0)
  keep = vals != 0
  seg, conc, vals = seg[keep], conc[keep], vals[keep]
  order = np.lexsort((conc, -vals, seg))
  seg, conc, vals = seg[order], conc[order], vals[order]
  counts = np.bincount(seg, minlength=n_segments)
  w = int(width) if width else max(1, int(counts.max(initial=0)))
  start = np.concatenate([[0], np.cumsum(counts)[:-1]])
  pos = np.arange(seg.size) - start[seg]
  sel = pos < w
  out_v = np.zeros((n_segments, w), np.float32)
  out_i = np.zeros((n_segments, w), np.int32)
  out_v[seg[sel], pos[sel]] = vals[sel]
  out_i[seg[sel], pos[sel]] = conc[sel]
  return out_v, out_i


def synthetic_tokens(x: np.ndarray, tokens: int, noise: float, rng: np.random.Generator) -> np.ndarray:
  """`tokens` rows per sample whose mean is exactly the sample's embedding: [n * tokens, d]."""
  eps = rng.standard_normal((x.shape[0], tokens, x.shape[1])).astype(np.float32) * noise
  eps -= eps.mean(axis=1, keepdims=True)
  return (x[:, None, :] + eps).reshape(-1, x.shape[1])


class Encoder:
  """Jitted `sae.encode` in fixed-size row blocks (one compilation)."""

  def __init__(self, params: dict, spec: sae_lib.SAESpec, block: int):
    self.params = {name: jax.numpy.asarray(v) for name, v in params.items()}
    self.block = block
    self._fn = jax.jit(lambda p, x: sae_lib.encode(p, x, spec.k, spec))

  def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    vs, is_ = [], []
    for s in range(0, n, self.block):
      chunk = x[s : s + self.block]
      m = chunk.shape[0]
      if m < self.block:
        chunk = np.concatenate([chunk, np.zeros((self.block - m, x.shape[1]), x.dtype)])
      code = self._fn(self.params, chunk)
      vs.append(np.asarray(code.values)[:m])
      is_.append(np.asarray(code.indices)[:m])
    return np.concatenate(vs), np.concatenate(is_)


def encode_pairs(
  pairs: Pairs,
  loaded: workdir_lib.LoadedSAE,
  acfg: Any,
  acc: metrics.ConceptAccumulator,
  keep_codes: bool = True,
) -> tuple[Any, Any, dict]:
  """Sparse codes of both sides, streamed into `acc` chunk by chunk; returns the codes too
  (None, None when not `keep_codes`: then nothing of size N beyond the embeddings is held)."""
  spec = loaded.spec
  mode = str(acfg.codes)
  if mode not in CODES_MODES:
    raise SaeJaxError(f"config.analysis.codes={mode!r}: expected one of {CODES_MODES}")
  block = int(acfg.block_size)
  c = loaded.params["D"].shape[0]
  info = {"codes": mode}
  if mode == "encode_pooled":
    enc = Encoder(loaded.params, spec, min(block, pairs.image.shape[0]))
    out = {"image": [], "text": []}
    for s in range(0, pairs.image.shape[0], block):
      img, txt = enc(pairs.image[s : s + block]), enc(pairs.text[s : s + block])
      acc.update(img, txt)
      if keep_codes:
        out["image"].append(img)
        out["text"].append(txt)
  else:
    if pairs.source != "synthetic":
      raise SaeJaxError(
        "config.analysis.codes='pool_token_codes' needs token-level activations per "
        "sample; this version supports it for the synthetic source only (the pooled "
        "file holds one row per sample): use codes='encode_pooled'"
      )
    tokens = int(acfg.tokens_per_sample)
    noise = float(acfg.token_noise)
    if tokens < 1:
      raise SaeJaxError(f"config.analysis.tokens_per_sample={tokens}: expected >= 1")
    info.update(tokens_per_sample=tokens, token_noise=noise)
    rng = np.random.default_rng([int(acfg.pair_seed), 7])
    step = max(1, block // tokens)
    enc = Encoder(loaded.params, spec, min(step, pairs.image.shape[0]) * tokens)
    width = min(c, tokens * spec.k)
    out = {"image": [], "text": []}
    for s in range(0, pairs.image.shape[0], step):
      sides = []
      for x in (pairs.image[s : s + step], pairs.text[s : s + step]):
        v, i = enc(synthetic_tokens(x, tokens, noise, rng))
        seg = np.repeat(np.arange(x.shape[0]), tokens)
        sides.append(pool_token_codes(v, i, seg, x.shape[0], c, width))
      acc.update(*sides)
      if keep_codes:
        out["image"].append(sides[0])
        out["text"].append(sides[1])
  cat = lambda parts: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  if not keep_codes:
    return None, None, info
  return cat(out["image"]), cat(out["text"]), info


# ------------------------------------------------------------------------------ synthetic check


def match_planted(D: np.ndarray, planted: Any) -> tuple[np.ndarray, np.ndarray]:
  """For each learned concept: the planted concept of largest cosine, and that cosine."""
  cos = np.asarray(D, np.float64) @ planted.dictionary.astype(np.float64).T
  best = np.argmax(cos, axis=1)
  return best, cos[np.arange(cos.shape[0]), best]


def synthetic_check(
  D: np.ndarray, cm: metrics.ConceptMetrics, planted: Any, top_fraction: float, threshold: float
) -> dict:
  """How well the metrics recover the planted structure (only defined for the synthetic source)."""
  from sklearn.metrics import roc_auc_score

  best, cos = match_planted(D, planted)
  kind = planted.kinds[best]
  ms = cm.modality_score if not cm.modality_reverse else 1.0 - cm.modality_score
  ok = (cos >= threshold) & np.isfinite(ms)
  out: dict = {"match_threshold": threshold, "matched": int(ok.sum()), "per_kind": {}}
  for k, name in enumerate(KINDS):
    sel = ok & (kind == k)
    covered = np.unique(best[sel]).size
    out["per_kind"][name] = {
      "planted": int(np.sum(planted.kinds == k)),
      "covered": int(covered),
      "learned_matched": int(sel.sum()),
      "modality_mean": float(np.mean(ms[sel])) if sel.any() else None,
    }

  def auc(lo, hi):
    a, b = ok & (kind == lo), ok & (kind == hi)
    if not a.any() or not b.any():
      return None
    y = np.concatenate([np.zeros(a.sum()), np.ones(b.sum())])
    return float(roc_auc_score(y, np.concatenate([ms[a], ms[b]])))

  out["auc_image_vs_text"] = auc(0, 1)
  out["auc_image_vs_shared"] = auc(0, 2)
  out["auc_shared_vs_text"] = auc(2, 1)
  order = np.argsort(-cm.energy, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  top = metrics.top_fraction_set(cm.energy, top_fraction)
  # Distractors co-fire in most rows, so an SAE often learns mixtures of them rather than each
  # atom: test membership in their span (norm of the projection of the unit learned row).
  dist_atoms = planted.dictionary[planted.kinds == 3].astype(np.float64)
  if dist_atoms.shape[0]:
    q, _ = np.linalg.qr(dist_atoms.T)
    in_span = np.linalg.norm(np.asarray(D, np.float64) @ q, axis=1)
  else:
    in_span = np.zeros(D.shape[0])
  out["top_energy_set_size"] = int(top.size)
  out["top_energy_set_distractor_span"] = [float(x) for x in in_span[top]]
  out["top_energy_set_in_distractor_span_fraction"] = float(np.mean(in_span[top] >= threshold))
  best_learned = np.argmax(np.asarray(D, np.float64) @ dist_atoms.T, axis=0) if dist_atoms.shape[0] else []
  out["distractor_best_learned_energy_ranks"] = [int(rank[i]) for i in best_learned]
  out["energy_share_in_distractor_span"] = float(cm.energy[in_span >= threshold].sum() / cm.energy.sum())
  return out


# ------------------------------------------------------------------------------------ outputs


def _run_name(acfg: Any, workdir: str) -> str:
  return str(acfg.run_name) or os.path.basename(os.path.normpath(workdir))


def _load_compare(path: str, fraction: float, reduction: str, reverse: bool) -> dict:
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


def write_table1(out_dir: str, rows: list[dict], fraction: float, reduction: str) -> None:
  payload = {
    "fraction": fraction,
    "bridge_reduction": reduction,
    "rows": [dict(run=r["name"], workdir=r["workdir"], **r["table1"]) for r in rows],
  }
  with open(os.path.join(out_dir, "table1.json"), "w") as f:
    json.dump(payload, f, indent=2)
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
  with open(os.path.join(out_dir, "table1.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def write_pairs_csv(path: str, res: metrics.BridgeResult, D: np.ndarray, ms: np.ndarray) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
      ["rank", "concept_i", "concept_j", "B_ij", "cooccurrence", "cosine", "modality_i", "modality_j"]
    )
    for r, (i, j, v, co) in enumerate(zip(res.pairs_i, res.pairs_j, res.pairs_value, res.pairs_cooc)):
      cosine = float(np.dot(D[i].astype(np.float64), D[j].astype(np.float64)))
      w.writerow(
        [r + 1, int(i), int(j), f"{v:.8g}", f"{co:.8g}", f"{cosine:.6f}", f"{ms[i]:.6f}", f"{ms[j]:.6f}"]
      )


def analyze(config: Any, workdir: str, loaded: workdir_lib.LoadedSAE, sae_dir: str = "") -> dict:
  """The stage on an already loaded SAE (tests and callers that hold one)."""
  acfg = config.analysis
  t0 = time.time()
  sae_dir = sae_dir or workdir
  D = np.asarray(loaded.params["D"], np.float32)
  c, d = D.shape
  fraction = float(acfg.top_fraction)
  reduction = str(acfg.bridge_reduction)
  if reduction not in metrics.REDUCTIONS:
    raise SaeJaxError(f"config.analysis.bridge_reduction={reduction!r}: expected one of {metrics.REDUCTIONS}")
  reverse = bool(acfg.modality_reverse)
  top_pairs = int(acfg.top_pairs)
  compute_dtype = str(acfg.compute_dtype)

  pairs = load_pairs(config, workdir, loaded, sae_dir)
  check_pairs(pairs, d, sae_dir)
  acc = metrics.ConceptAccumulator(D, block_size=int(acfg.block_size), compute_dtype=compute_dtype)
  need_b = top_pairs > 0 or reduction == "max"
  save_codes = bool(acfg.save_codes)
  image, text, code_info = encode_pairs(pairs, loaded, acfg, acc, keep_codes=need_b or save_codes)
  cm = metrics.concept_metrics(acc.sums(), reverse_modality=reverse)
  t_metrics = time.time() - t0

  bridge = None
  if need_b:
    mesh = None
    model_axis = int(config.mesh.model)
    if model_axis > 1:
      mesh = sharding.make_mesh(config.mesh)
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

  out_dir = os.path.join(workdir, ANALYSIS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  name = _run_name(acfg, workdir)
  arrays = dict(
    energy=cm.energy,
    energy_image=cm.energy_image,
    energy_text=cm.energy_text,
    fire_rate_image=cm.fire_rate_image,
    fire_rate_text=cm.fire_rate_text,
    modality_score=cm.modality_score,
    modality_reverse=np.array(reverse),
    n_silent=np.array(cm.n_silent),
    attribution=cm.attribution,
    bridge_score=score,
    bridge_reduction=np.array(reduction),
    bridge_diag=cm.bridge_diag,
    bridge_row=cm.bridge_row,
    bridge_col=cm.bridge_col,
    bridge_sym=cm.bridge_sym,
    D=D,
    run_name=np.array(name),
    codes_mode=np.array(code_info["codes"]),
    n_pairs=np.array(cm.n_pairs),
    mean_pair_dot=np.array(cm.mean_pair_dot),
  )
  if bridge is not None:
    arrays["bridge_max"] = bridge.max_score
  np.savez(os.path.join(out_dir, "concepts.npz"), **arrays)
  codes_path = os.path.join(out_dir, "codes.npz")
  if not save_codes and os.path.exists(codes_path):  # stale codes of an earlier run
    os.remove(codes_path)
  if save_codes:
    np.savez(
      os.path.join(out_dir, "codes.npz"),
      image_values=image[0],
      image_indices=image[1],
      text_values=text[0],
      text_indices=text[1],
      sample_ids=pairs.sample_ids,
      codes_mode=np.array(code_info["codes"]),
    )

  this = {
    "name": name,
    "workdir": workdir,
    "energy": cm.energy,
    "modality_score": cm.modality_score,
    "table1": metrics.table1(cm.energy, cm.attribution, score, fraction),
  }
  compare = str(acfg.compare_workdirs)
  others = [
    _load_compare(p.strip(), fraction, reduction, reverse)
    for p in compare.split(",")
    if p.strip() and os.path.normpath(p.strip()) != os.path.normpath(workdir)
  ]
  runs = [this] + others
  write_table1(out_dir, runs, fraction, reduction)
  pairs_csv = os.path.join(out_dir, "top_bridge_pairs.csv")
  if bridge is not None and top_pairs > 0:
    write_pairs_csv(pairs_csv, bridge, D, cm.modality_score)
  elif os.path.exists(pairs_csv):  # left by an earlier run: it would not match these concepts
    os.remove(pairs_csv)
  plots.plot_modality_kde(runs, os.path.join(out_dir, "fig_modality_kde.png"), reverse=reverse)
  plots.plot_cumulative_energy(runs, os.path.join(out_dir, "fig_cumulative_energy.png"), fraction)

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
    **code_info,
    "bridge_reduction": reduction,
    "modality_reverse": reverse,
    "n_silent": cm.n_silent,
    "top_fraction": fraction,
    "table1": this["table1"],
    "mean_pair_dot": cm.mean_pair_dot,
    "compute_dtype": compute_dtype,
    "seconds": {"encode_and_metrics": t_metrics, "bridge_blockwise": t_bridge, "total": time.time() - t0},
  }
  if pairs.planted is not None:
    summary["synthetic"] = synthetic_check(D, cm, pairs.planted, fraction, float(acfg.match_threshold))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def run_analysis(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Loads the SAE (this workdir or config.analysis.sae_workdir) and runs the analysis stage."""
  if not workdir:
    raise SaeJaxError("--workdir is required")
  acfg = config.analysis
  sae_dir = str(acfg.sae_workdir) or workdir
  step = int(acfg.sae_step)
  loaded = workdir_lib.load_sae(sae_dir, None if step < 0 else step)
  return analyze(config, workdir, loaded, sae_dir)
