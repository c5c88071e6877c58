"""The study's own analysis beyond the stages: the shapes world's other retrieval tasks
(image->image in NIGHTS' role, composed in CIRR's) with intervals and chance, and the decoders'
image->text R@1 at every hidden layer."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

from sae_jax import config_utils, retrieval, retrieval_tasks, uncertainty
from sae_jax import workdir as workdir_lib
from sae_jax.data import coco
from sae_jax.errors import SaeJaxError
from sae_jax.stages import extract_mbeir
from sae_jax.study import shapes_files
from sae_jax.study.layout import base_variant, data_paths, stage_config, tasks_results


def run_tasks(config: Any, workdir: str, name: str, log: Callable = print) -> dict:
  """The image->image and composed tasks of the shapes world for model `name`: {task: {variant:
  {"R@k": ..., "n_queries", "n_candidates"}}} (a contrastive model has no composed queries)."""
  paths = data_paths(config, workdir)
  meta = shapes_files.write_tasks(config.shapes, paths["root"], log=log)
  out: dict = {}
  ks = tuple(int(k) for k in config_utils.as_tuple(config.retrieval.ks))
  for task, entry in meta["counts"].items():
    c = stage_config(config, workdir, name, "test")
    ex = c.extract
    ex.dataset = "mbeir"
    ex.mbeir_queries = os.path.join(paths["root"], "tasks", f"{entry['file']}_queries.jsonl")
    ex.mbeir_pool = os.path.join(paths["root"], "tasks", f"{entry['file']}_pool.jsonl")
    ex.mbeir_image_root = paths["root"]
    ex.mbeir_parquet_dir = ""
    wd = os.path.join(workdir, name, "tasks", task)
    if task == "image_text_to_image" and str(base_variant(config, name)) == "embed":
      continue  # a contrastive model encodes images and texts apart: no composed query
    summary = extract_mbeir.run_mbeir_extraction(c, wd)
    act = os.path.join(wd, "activations")
    ranks = {}
    with open(os.path.join(act, "mbeir_qrels.json")) as f:
      qrels = json.load(f)
    by_variant = {}
    for v in summary["variants"]:
      with (
        np.load(os.path.join(act, f"mbeir_queries_pooled_{v}.npz")) as q,
        np.load(os.path.join(act, f"mbeir_pool_pooled_{v}.npz")) as p,
      ):
        arrays = retrieval_tasks.mbeir_task_arrays(
          {k: q[k] for k in q.files}, {k: p[k] for k in p.files}, qrels, task=task, source=act
        )
      td = retrieval_tasks.build_task(task, arrays, act)
      rec, ids = retrieval.evaluate(
        td.queries, td.candidates, td.positives_indptr, td.positives_indices, ks=ks, exclude=td.exclude
      )
      ranks[v] = np.asarray(
        jax.jit(retrieval.first_hit_rank)(ids, td.positives_indptr, td.positives_indices), np.int64
      )
      by_variant[v] = {
        **rec,
        **task_intervals(config, ranks[v], td, ks),
        "n_queries": td.n_queries,
        "n_candidates": td.n_candidates,
      }
    workdir_lib.atomic_savez(os.path.join(wd, "first_hit_ranks.npz"), **ranks)
    out[task] = by_variant
    log(
      f"study {name}: {task} "
      + ", ".join(f"{v} R@1 {r['R@1']:.2f}" for v, r in by_variant.items())
      + f" ({entry['queries']} queries, {entry['candidates']} candidates)"
    )
  workdir_lib.atomic_write_json(tasks_results(workdir, name), out)
  return out


def task_intervals(config: Any, ranks: np.ndarray, td: retrieval_tasks.TaskData, ks: tuple) -> dict:
  """The 95% bootstrap interval over queries of each R@K (`R@K_ci95`, config.retrieval.bootstrap_*)
  and the Recall@K of a random ranking (`chance`), as the retrieval stage records them."""
  ci = uncertainty.recall_with_ci(
    ranks, ks, n_boot=int(config.retrieval.bootstrap_n), seed=int(config.retrieval.bootstrap_seed)
  )
  # A query whose own reference is dropped from the ranking (CIRR) ranks one candidate fewer.
  n_pos = np.diff(np.asarray(td.positives_indptr))
  dropped = np.zeros(n_pos.shape, bool) if td.exclude is None else np.asarray(td.exclude) >= 0
  chance = {f"R@{k}": 0.0 for k in ks}
  for group in (~dropped, dropped):
    if group.any():
      pool = td.n_candidates - int(dropped[group][0])
      part = uncertainty.chance_recall(np.minimum(n_pos[group], pool), pool, ks)
      for k in chance:
        chance[k] += part[k] * group.sum() / n_pos.shape[0]
  return {**{k: v for k, v in ci.items() if k.endswith("_ci95")}, "chance": chance}


def layer_recall(
  image_layers: np.ndarray, text_layers: np.ndarray, text_owner: np.ndarray, n_boot: int, seed: int
) -> list:
  """Image->text R@1 (cosine) at each layer, with its 95% bootstrap interval over the image queries.

  image_layers [L, N, d], text_layers [L, M, d] (mean-pooled per layer), text_owner [M]: the image
  each text belongs to (its positives). Returns [{"layer": l, "R@1": ..., "R@1_ci95": [lo, hi]}]."""
  n_layers, n, _ = image_layers.shape
  if text_layers.shape[0] != n_layers or text_layers.shape[1] != text_owner.shape[0]:
    raise SaeJaxError(
      f"layer_recall: text_layers {text_layers.shape} and text_owner {text_owner.shape} do not match "
      f"image_layers {image_layers.shape} ([L, M, d] and [M])"
    )
  order = np.argsort(text_owner, kind="stable").astype(np.int32)  # captions grouped by image
  indptr = np.searchsorted(text_owner[order], np.arange(n + 1)).astype(np.int32)
  draws = uncertainty.bootstrap_draws(n, n_boot, seed)
  out = []
  for layer in range(n_layers):
    _, ids = retrieval.evaluate(image_layers[layer], text_layers[layer], indptr, order, ks=(1,))
    ranks = np.asarray(jax.jit(retrieval.first_hit_rank)(ids, indptr, order))
    out.append({"layer": layer, **uncertainty.recall_with_ci(ranks, (1,), draws=draws)})
  return out


def run_layer_recall(config: Any, workdir: str, name: str, log: Callable = print) -> dict:
  """Mean-pooled image->text R@1 of model `name` on the test split at every hidden layer (0: the
  input embeddings, the last: the layer the study analyses), through the study's own loader and
  templates; {} for a contrastive model (its image and text towers have no shared layers)."""
  if base_variant(config, name) == "embed":
    return {}
  from sae_jax import encoders  # torch: the `extract` extra

  c = stage_config(config, workdir, name, "test")
  enc = encoders.load_encoder(c.extract)
  if enc.kind != "decoder":
    return {}
  src = coco.open_paired(c.extract)  # the pairs the test extraction reads
  row = {im.image_id: i for i, im in enumerate(src.images)}
  texts = [cap.text for cap in src.captions]
  owner = np.asarray([row[cap.image_id] for cap in src.captions], np.int64)
  bs = int(c.extract.batch_size)
  image_layers = np.concatenate(
    [
      enc.mean_pooled_per_layer(enc.prepare(images=[coco.load_image(im) for im in src.images[s : s + bs]]))
      for s in range(0, len(src.images), bs)
    ],
    axis=1,
  )
  text_layers = np.concatenate(
    [enc.mean_pooled_per_layer(enc.prepare(texts=texts[s : s + bs])) for s in range(0, len(texts), bs)],
    axis=1,
  )
  layers = layer_recall(
    image_layers,
    text_layers,
    owner,
    int(config.retrieval.bootstrap_n),
    int(config.retrieval.bootstrap_seed),
  )
  chance = uncertainty.chance_recall(np.bincount(owner, minlength=len(src.images)), len(texts), (1,))
  log(f"study {name}: mean-pooled image->text R@1 by layer " + ", ".join(f"{r['R@1']:.2f}" for r in layers))
  return {
    "task": "image_to_text",
    "variant": "mean",
    "n_queries": len(src.images),
    "n_candidates": len(texts),
    "chance": chance,
    "layers": layers,
  }
