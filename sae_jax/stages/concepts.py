"""The concepts stage: a browser of an SAE's concepts over the analysed pairs, labelled against a truth.

`run_concepts(config, workdir, attributes=None)` (driven by `config.concepts`, see configs/base.py)
reads the SAE, the pairs the analysis used (`analyze.load_pairs`, `config.analysis`), the analysis'
`analysis/concepts.npz` and, when present, the removed atoms of `retrieval/removal_projector.npz`,
and writes `<workdir>/concepts/`:

  index.html      one sortable row per concept: energy, modality, bridge, attribution on matched (A+)
                  and on shuffled unmatched pairs (A-), fire rates, membership of S_E / S_A / S_B /
                  the removal set, the label
  cards/<id>.html a card per concept of those sets (and of `concepts.extra_ids`): top-activating
                  images (thumbs/, when the images are known) and captions with their activations,
                  histograms per modality, the nearest concepts by decoder cosine
  concepts.json   the same data for scripts, with each set's composition by label

Labels: `attributes` maps a name to an `Attribute` (binary labels per pair row, image row or text row,
e.g. the shapes world's truth); every concept gets the attribute value its activation predicts best
by ROC AUC (`concept_stats.sparse_auroc`), the modality among them, and is `content-free` when it
fires on >= `concepts.content_free_rate` of the rows of both modalities. Without attributes only
the content-free flag and the modality label are given.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import scipy.sparse

from sae_jax import concept_stats, metrics, removal
from sae_jax import workdir as workdir_lib
from sae_jax.block_encoder import encode_rows
from sae_jax.errors import SaeJaxError
from sae_jax.stages import analyze, concepts_html

CONCEPTS_DIR = "concepts"
DOMAINS = ("pair", "image", "text")


class Attribute(NamedTuple):
  """Binary labels of one attribute: `labels` [N, V] (row n has value v), rows of `domain`: "pair"
  (row n = pair n; scored on its image rows, its text rows and both), "image" or "text"."""

  values: list
  labels: np.ndarray
  domain: str = "pair"


class Rows(NamedTuple):
  """What a card shows of the analysed rows: captions [N] (or None), image ids [N] (or None), and the
  image file of each image id (empty when unknown)."""

  captions: Optional[np.ndarray]
  image_ids: Optional[np.ndarray]
  image_files: dict


# ------------------------------------------------------------------------------------ inputs


def _read_sets(workdir: str, fraction: float, reduction: str) -> tuple[dict, dict]:
  """(per-concept arrays of analysis/concepts.npz, {set name: ids}) incl. the removal set."""
  path = os.path.join(workdir, analyze.ANALYSIS_DIR, "concepts.npz")
  if not os.path.exists(path):
    raise SaeJaxError(f"{path} is missing: run experiments.analyze on {workdir} first")
  with np.load(path, allow_pickle=False) as f:
    conc = {k: np.asarray(f[k]) for k in f.files}
  bridge = conc.get(f"bridge_{reduction}", conc["bridge_score"])
  sets = {
    "S_E": metrics.top_fraction_set(conc["energy"], fraction),
    "S_A": metrics.top_fraction_set(conc["attribution"], fraction),
    "S_B": metrics.top_fraction_set(bridge, fraction),
  }
  proj = os.path.join(workdir, "retrieval", "removal_projector.npz")
  if os.path.exists(proj):
    with np.load(proj, allow_pickle=False) as f:
      info = json.loads(str(f["info"]))
    sets["removed"] = np.asarray(sorted(int(a) for a in info.get("atoms", [])), np.int64)
  return conc, sets


def read_rows(pairs: analyze.Pairs, ccfg: Any) -> Rows:
  """Captions and image ids of the pairs (pooled file) and the image files of a COCO-style json."""
  captions = None
  if pairs.path:
    with workdir_lib.open_npz(pairs.path) as f:
      if "captions" in f:
        captions = np.asarray(f["captions"]).astype(str)
  files: dict = {}
  coco = str(ccfg.coco_json)
  if coco and os.path.exists(coco):
    with open(coco) as f:
      images = json.load(f).get("images", [])
    root = str(ccfg.image_root) or os.path.join(os.path.dirname(coco), "images")
    files = {int(im["id"]): os.path.join(root, im["file_name"]) for im in images}
  return Rows(captions, pairs.image_ids, files)


# ------------------------------------------------------------------------------------ labels


def _check_attributes(attributes: dict, n: int) -> None:
  for name, a in attributes.items():
    if a.domain not in DOMAINS:
      raise SaeJaxError(f"attribute {name!r}: domain {a.domain!r}, expected one of {DOMAINS}")
    if np.shape(a.labels) != (n, len(a.values)):
      raise SaeJaxError(f"attribute {name!r}: labels {np.shape(a.labels)}, expected {(n, len(a.values))}")


def label_concepts(
  image_codes: scipy.sparse.csc_matrix,
  text_codes: scipy.sparse.csc_matrix,
  attributes: dict,
  min_auroc: float,
  content_free_rate: float,
) -> dict:
  """Per concept: its best label ("attr=value (rows)"), that AUROC, its category (attribute name,
  "content-free", "dead" or "unlabelled") and the content-free flag."""
  n = image_codes.shape[0]
  _check_attributes(attributes, n)
  both = scipy.sparse.vstack([image_codes, text_codes]).tocsc()
  # The label columns of each row set, so that each set's codes are ranked once.
  modality = np.zeros((2 * n, 2), bool)
  modality[:n, 0] = modality[n:, 1] = True
  columns: dict = {
    "image": [],
    "text": [],
    "both": [(modality, [("modality", "image", "both"), ("modality", "text", "both")])],
  }
  for attr, a in attributes.items():
    y = np.asarray(a.labels, bool)
    names = lambda rows, a=a, attr=attr: [(attr, str(v), rows) for v in a.values]
    if a.domain == "pair":
      columns["image"].append((y, names("image")))
      columns["text"].append((y, names("text")))
      columns["both"].append((np.vstack([y, y]), names("both")))
    else:
      columns[a.domain].append((y, names(a.domain)))
  names, aucs = [], []
  for rows, codes in (("both", both), ("image", image_codes), ("text", text_codes)):
    if columns[rows]:
      aucs.append(concept_stats.sparse_auroc(codes, np.concatenate([y for y, _ in columns[rows]], axis=1)))
      names += [nm for _, nms in columns[rows] for nm in nms]
  auc = np.concatenate(aucs, axis=1)
  fire_i, fire_t = concept_stats.fire_rates(image_codes), concept_stats.fire_rates(text_codes)
  fired = (fire_i > 0) | (fire_t > 0)
  best, val = concept_stats.best_labels(auc, names, min_auroc, fired)
  content_free = (fire_i >= content_free_rate) & (fire_t >= content_free_rate)
  label, category = [], []
  for i in range(auc.shape[0]):
    if content_free[i]:
      category.append("content-free")
    elif not fired[i]:
      category.append("dead")
    elif best[i] < 0:
      category.append("unlabelled")
    else:
      category.append(names[best[i]][0])
    b = int(np.nanargmax(np.where(np.isnan(auc[i]), -np.inf, auc[i]))) if fired[i] and auc.shape[1] else -1
    label.append("" if b < 0 else f"{names[b][0]}={names[b][1]} ({names[b][2]})")
  return {
    "label": label,
    "label_auroc": val,
    "category": category,
    "content_free": content_free,
    "fire_rate_image": fire_i,
    "fire_rate_text": fire_t,
  }


# ------------------------------------------------------------------------------------ the stage


def _unique_image_rows(image_ids: Optional[np.ndarray], n: int) -> np.ndarray:
  """The first row of each image (an image repeats once per caption), or every row."""
  if image_ids is None:
    return np.arange(n)
  _, first = np.unique(np.asarray(image_ids), return_index=True)
  return np.sort(first)


def _card_ids(ccfg: Any, sets: dict, c: int) -> np.ndarray:
  extra = [int(x) for x in str(ccfg.extra_ids).split(",") if x.strip()]
  bad = [i for i in extra if not 0 <= i < c]
  if bad:
    raise SaeJaxError(f"config.concepts.extra_ids: {bad} outside 0..{c - 1}")
  return np.unique(
    np.concatenate([np.asarray(s, np.int64) for s in sets.values()] + [np.asarray(extra, np.int64)])
  )


def pair_codes(workdir: str, loaded: workdir_lib.LoadedSAE, pairs: analyze.Pairs, block: int) -> tuple:
  """Sparse codes (values, indices) of the image and text rows: the analysis' analysis/codes.npz
  when it holds these pairs' codes (analysis.save_codes), else encoded here; and where they came from."""
  path = os.path.join(workdir, analyze.ANALYSIS_DIR, "codes.npz")
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      same = str(f["codes_mode"]) == "encode_pooled" and np.array_equal(f["sample_ids"], pairs.sample_ids)
      if same:
        return (f["image_values"], f["image_indices"]), (f["text_values"], f["text_indices"]), "analysis"
  code_i = encode_rows(loaded.params, loaded.spec, pairs.image, block)
  code_t = encode_rows(loaded.params, loaded.spec, pairs.text, block)
  return code_i, code_t, "encoded"


def concept_statistics(
  ccfg: Any,
  D: np.ndarray,
  codes: tuple,
  image_ids: Optional[np.ndarray],
  conc: dict,
  sets: dict,
  attributes: dict,
) -> dict:
  """Everything the pages show, from the codes ((values, indices) of the image and of the text rows)
  and the analysis' per-concept arrays `conc` and sets: top rows, A-, labels, cards, neighbours."""
  t0 = time.perf_counter()
  (code_i, code_t), c, block = codes, D.shape[0], int(ccfg.block_size)
  sp_i = concept_stats.sparse_codes(*code_i, c, block)
  sp_t = concept_stats.sparse_codes(*code_t, c, block)
  n_top, n = int(ccfg.n_top), np.shape(code_i[0])[0]
  uniq = _unique_image_rows(image_ids, n)  # an image's top rows are its first row only
  top_i = concept_stats.top_rows(code_i[0][uniq], code_i[1][uniq], c, n_top, block)
  top_t = concept_stats.top_rows(*code_t, c, n_top, block)
  t_top = time.perf_counter() - t0
  draws = int(ccfg.negatives_draws)
  a_minus = (
    removal.negatives_attribution(D, code_i, code_t, draws, int(ccfg.negatives_seed))
    if draws > 0 and n > 1
    else np.full(c, np.nan)
  )
  t_neg = time.perf_counter() - t0 - t_top
  labels = label_concepts(sp_i, sp_t, attributes, float(ccfg.min_auroc), float(ccfg.content_free_rate))
  cards = _card_ids(ccfg, sets, c)
  near_i, near_c = concept_stats.nearest_by_cosine(D, cards, int(ccfg.n_near))
  seconds = {"top_rows": t_top, "negatives": t_neg, "statistics": time.perf_counter() - t0}
  return dict(
    conc=conc,
    sets=sets,
    labels=labels,
    a_minus=a_minus,
    top_image=(top_i.values, uniq[np.maximum(top_i.rows, 0)], top_i.rows >= 0),
    top_text=(top_t.values, top_t.rows, top_t.rows >= 0),
    codes=(sp_i, sp_t),
    cards=cards,
    nearest=(near_i, near_c),
    seconds=seconds,
    truth=sorted(attributes),
  )


def concepts(
  config: Any,
  workdir: str,
  loaded: workdir_lib.LoadedSAE,
  attributes: Optional[dict] = None,
  sae_dir: str = "",
) -> dict:
  """The stage on a loaded SAE: pairs -> statistics and labels -> concepts/ (pages and json)."""
  t0 = time.perf_counter()
  sae_dir = sae_dir or workdir
  pairs = analyze.load_pairs(config, workdir, loaded, sae_dir)
  analyze.check_pairs(pairs, int(np.shape(loaded.params["D"])[1]), sae_dir)
  acfg, ccfg = config.analysis, config.concepts
  conc, sets = _read_sets(workdir, float(acfg.top_fraction), str(acfg.bridge_reduction))
  t_codes = time.perf_counter()
  code_i, code_t, codes_from = pair_codes(workdir, loaded, pairs, int(ccfg.block_size))
  t_codes = time.perf_counter() - t_codes
  D = np.asarray(loaded.params["D"], np.float32)
  result = concept_statistics(ccfg, D, (code_i, code_t), pairs.image_ids, conc, sets, dict(attributes or {}))
  result["seconds"]["codes"] = t_codes
  rows = read_rows(pairs, config.concepts)
  out_dir = os.path.join(workdir, CONCEPTS_DIR)
  t_pages = time.perf_counter()
  summary = concepts_html.write_pages(out_dir, config.concepts, result, rows, D)
  summary["seconds"] = {
    **result["seconds"],
    "pages": time.perf_counter() - t_pages,
    "total": time.perf_counter() - t0,
  }
  summary["out_dir"] = out_dir
  summary["n_pairs"] = int(pairs.image.shape[0])
  summary["codes_from"] = codes_from
  workdir_lib.atomic_write_json(os.path.join(out_dir, "summary.json"), summary, indent=2)
  return summary


def run_concepts(
  config: Any, workdir: str, attributes: Optional[dict] = None, log: Optional[Callable[[str], None]] = None
) -> dict:
  """Loads the SAE (this workdir or config.concepts.sae_workdir) and runs the concepts stage."""
  if not workdir:
    raise SaeJaxError("--workdir is required")
  sae_dir = str(config.concepts.sae_workdir) or str(config.analysis.sae_workdir) or workdir
  step = int(config.analysis.sae_step)
  loaded = workdir_lib.load_sae(sae_dir, None if step < 0 else step)
  summary = concepts(config, workdir, loaded, attributes, sae_dir)
  if log is not None:
    log(
      f"concepts: wrote {summary['out_dir']}/ ({summary['n_cards']} cards) in {summary['seconds']['total']:.1f} s"
    )
    for line in summary["composition_lines"]:
      log(f"  {line}")
    if config.preset_note:
      log(f"  {config.preset_note}")
  return summary
