"""The whole study, one command: data -> models -> extract -> SAE -> analyze -> retrieve -> report.

`run_study(config, workdir)` runs, for each name in `config.study.models` (settings in
`config.study.model.<name>`):

  data        the shapes world under `study.data_dir` (default <workdir>/data), unless present
  model       `source="train:<kind>"`: trained here into <workdir>/models/<name> (HF checkpoint);
              any other source is a hub id or a local directory used as is
  extract     train split -> <workdir>/<name>/train_extract/activations/shards (SAE training rows:
              `study.sae_rows`: the base variant's pooled vector of every train image and
              caption, or every token row);
              test split -> <workdir>/<name>/sae/activations/pooled_<variant>.npz (every variant)
  sae         Top-K SAE in <workdir>/<name>/sae on the train shards
  analyze     <workdir>/<name>/sae/analysis/ (Table 1, Fig. 2-3) on the test pairs
  sae_seeds   the SAEs of seeds config.seed + 1 .. + study.sae_seeds - 1 (same rows and settings) in
              <workdir>/<name>/sae_seed<s>/, each with its Table 1 on the same test pairs (Table 1's
              spread over seeds; every other table and figure reads the main SAE of config.seed)
  retrieve    <workdir>/<name>/sae/retrieval/ (Tables 2-3, Fig. 4) on the test pairs
  tasks       (shapes) the paper's other tasks on the test scenes (`shapes.write_tasks`): image->image
              (NIGHTS role) for every model, composed (CIRR role) for the generative ones, extracted
              through the M-BEIR path into <workdir>/<name>/tasks/<task>/ and scored per pooling
              variant (Recall@K of the base embeddings with bootstrap intervals over queries and the
              chance level) into <workdir>/<name>/tasks/results.json; the first-hit ranks behind
              them in <workdir>/<name>/tasks/<task>/first_hit_ranks.npz
  layers      (decoders) image->text R@1 of the mean-pooled test embeddings at every hidden layer,
              0 being the input embeddings (`run_layer_recall`): where image and text align, and
              where a decoder loses the alignment its input has

then writes <workdir>/report/ (`sae_jax.study.report`). Each finished step is recorded in
<workdir>/<name>/steps.json and skipped on a re-run; an interrupted step is re-run and resumes
through the stage's own resume (extraction part files and finished shards, SAE checkpoints).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from sae_jax import config_utils, retrieval, retrieval_tasks, uncertainty
from sae_jax import workdir as workdir_lib
from sae_jax.data import coco
from sae_jax.errors import SaeJaxError
from sae_jax.stages import analyze, extract, extract_mbeir, retrieve
from sae_jax.study import report
from sae_jax.study import shapes as shapes_lib
from sae_jax.study import trainers as train_encoder
from sae_jax.study.layout import (  # noqa: F401  (re-exported: the study's layout)
  SEED_SUMMARY,
  STEPS_FILE,
  base_variant,
  data_paths,
  model_dir,
  model_settings,
  sae_seed_workdir,
  sae_seeds,
  sae_workdir,
  tasks_results,
)
from sae_jax.training import trainer

STEPS = (
  "model",
  "extract_train",
  "extract_test",
  "sae",
  "analyze",
  "sae_seeds",
  "retrieve",
  "tasks",
  "layers",
)


def stage_config(config: Any, workdir: str, name: str, split: str) -> ml_collections.ConfigDict:
  """The config every stage of model `name` runs with (`split`: which split extraction reads)."""
  st = config.study
  m = model_settings(config, name)
  paths = data_paths(config, workdir)
  c = ml_collections.ConfigDict(config.to_dict())
  ex = c.extract
  ex.model_name = model_dir(config, workdir, name)
  ex.dataset = "coco"
  ex.captions_json = paths[f"{split}_json"]
  ex.image_dir = paths[f"{split}_images"]
  ex.batch_size = int(m.batch_size)
  ex.num_workers = 2
  ex.chat_template = bool(m.get("chat_template", False))
  pooling = config_utils.as_tuple(m.pooling)
  base = base_variant(config, name)
  if split == "train":  # SAE rows only: the shards (one pooled variant is written regardless)
    ex.max_images = int(st.train_extract_images)
    ex.pooling = (base,)
    ex.write_shards = True
    # Like-for-like by default: the SAE is analysed on pooled embeddings, so it trains on pooled
    # rows (one per image and one per caption); "tokens" is the paper's token-row training.
    ex.shard_rows = str(st.sae_rows)
  else:
    ex.max_images = 0
    ex.pooling = pooling
    ex.write_shards = False
  c.sae.c = int(m.c)
  c.sae.k = int(m.k)
  c.data.source = "shards"
  c.data.shard_dir = os.path.join(workdir, name, "train_extract", "activations", "shards")
  c.data.batch_size = int(st.sae_batch_size)
  c.train.num_steps = int(st.sae_steps)
  c.train.log_every = max(1, int(st.sae_steps) // 10)
  c.train.checkpoint_every = max(1, int(st.sae_steps) // 4)
  c.train.tensorboard = False
  c.analysis.variant = base
  c.analysis.run_name = str(m.label)
  c.analysis.source = "pooled"
  c.analysis.table1_resamples = int(st.table1_pair_resamples)
  c.retrieval.source = "pooled"
  c.retrieval.variants = pooling
  c.retrieval.base_variant = base
  c.retrieval.tasks = ("image_to_text", "text_to_image")
  # Table 2's validation-chosen removal and all-but-the-top: chosen on the training split's pairs
  # (image-disjoint from the scored test split), so every test pair is scored.
  c.retrieval.fit_file = os.path.join(workdir, name, "train_extract", "activations", f"pooled_{base}.npz")
  c.retrieval.select_on = "validation"
  c.retrieval.removal_compare = ("energy", "abs_attribution", "negatives", "margin")
  return c


def run_tasks(config: Any, workdir: str, name: str, log: Callable = print) -> dict:
  """The image->image and composed tasks of the shapes world for model `name`: {task: {variant:
  {"R@k": ..., "n_queries", "n_candidates"}}} (a contrastive model has no composed queries)."""
  paths = data_paths(config, workdir)
  meta = shapes_lib.write_tasks(config.shapes, paths["root"], log=log)
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
  from sae_jax import encoders

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


def seed_stage_config(config: Any, workdir: str, name: str, seed: int, d: int) -> ml_collections.ConfigDict:
  """The config of the SAE of `seed` (not config.seed): the main SAE's, with its own init and batch
  order, analysed on the main SAE's test pairs with only what Table 1 needs."""
  c = stage_config(config, workdir, name, "test")
  c.sae.d = int(d)
  offset = int(seed) - int(config.seed)
  c.seed = int(seed)
  c.data.shuffle_seed = int(config.data.shuffle_seed) + offset
  a = c.analysis
  a.run_name = f"{model_settings(config, name).label} (SAE seed {int(seed)})"
  a.embeddings_path = os.path.join(
    sae_workdir(workdir, name), "activations", f"pooled_{base_variant(config, name)}.npz"
  )
  a.save_codes = False
  a.table1_resamples = 0
  a.compare_workdirs = ""
  if str(a.bridge_reduction) != "max":  # the blockwise bridge is needed only for the "max" reduction
    a.top_pairs = 0
  return c


def run_sae_seeds(config: Any, workdir: str, name: str, d: int, log: Callable = print) -> dict:
  """Trains and analyses the SAEs of the seeds after config.seed (`sae_seeds`); returns {"seeds": [...],
  "table1": {seed: Table 1 row}, "eval_fvu": {seed: FVU}} of those extra seeds. A seed whose
  seed_summary.json exists is read back (resume)."""
  out: dict = {"seeds": [], "table1": {}, "eval_fvu": {}}
  for seed in sae_seeds(config)[1:]:
    wd = sae_seed_workdir(config, workdir, name, seed)
    path = os.path.join(wd, SEED_SUMMARY)
    if os.path.exists(path):
      with open(path) as f:
        s = json.load(f)
      log(f"study {name}: SAE seed {seed} done earlier, read back")
    else:
      c = seed_stage_config(config, workdir, name, seed, d)
      t = trainer.train_and_evaluate(c, wd)
      a = analyze.run_analysis(c, wd)
      s = {"seed": int(seed), "eval_fvu": t.get("eval_fvu"), "step": t["step"], "table1": a["table1"]}
      workdir_lib.atomic_write_json(path, s)
      row = s["table1"]
      log(
        f"study {name}: SAE seed {seed}: eval FVU {s['eval_fvu']}, "
        + ", ".join(f"{k} {row[k]:.4f}" for k in analyze.J_KEYS)
      )
    out["seeds"].append(int(seed))
    out["table1"][str(seed)] = s["table1"]
    out["eval_fvu"][str(seed)] = s["eval_fvu"]
  return out


def _read_steps(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def run_model(config: Any, workdir: str, name: str, log: Callable = print) -> dict:
  """Every step of one model; returns {step: summary} (steps done earlier are read back)."""
  m = model_settings(config, name)
  paths = data_paths(config, workdir)
  root = os.path.join(workdir, name)
  os.makedirs(root, exist_ok=True)
  steps_path = os.path.join(root, STEPS_FILE)
  done = _read_steps(steps_path)
  sae_dir = sae_workdir(workdir, name)

  def record(step, summary, seconds):
    done[step] = {"seconds": round(seconds, 1), "summary": summary}
    workdir_lib.atomic_write_json(steps_path, done)

  for step in STEPS:
    if (
      step == "sae_seeds"
      and step in done
      and done[step]["summary"].get("seeds") != list(sae_seeds(config)[1:])
    ):
      del done[step]  # config.study.sae_seeds changed: train and analyse the seeds not done yet
    if step in done:
      log(f"study {name}: {step} done earlier, skipped")
      continue
    t0 = time.perf_counter()
    log(f"study {name}: {step} ...")
    if step == "model":
      src = str(m.source)
      if src.startswith("train:"):
        q = train_encoder.train_encoder(
          config,
          src[len("train:") :],
          paths["root"],
          model_dir(config, workdir, name),
          log,
          chat_template=bool(m.get("chat_template", False)),
        )
      else:
        q = {"source": src, "trained_here": False}
      record(step, q, time.perf_counter() - t0)
    elif step in ("extract_train", "extract_test"):
      split = step.split("_")[1]
      wd = os.path.join(root, "train_extract") if split == "train" else sae_dir
      s = extract.run_extraction(stage_config(config, workdir, name, split), wd)
      record(
        step,
        {k: s[k] for k in ("counts", "d", "model", "family", "variants", "elapsed_s")},
        time.perf_counter() - t0,
      )
    elif step == "sae":
      c = stage_config(config, workdir, name, "test")
      c.sae.d = int(done["extract_train"]["summary"]["d"])
      s = trainer.train_and_evaluate(c, sae_dir)
      record(step, s, time.perf_counter() - t0)
    elif step == "analyze":
      c = stage_config(config, workdir, name, "test")
      c.sae.d = int(done["extract_train"]["summary"]["d"])
      s = analyze.run_analysis(c, sae_dir)
      record(
        step,
        {k: s[k] for k in ("c", "d", "k", "n_pairs", "table1", "embeddings_path")},
        time.perf_counter() - t0,
      )
    elif step == "sae_seeds":
      d = int(done["extract_train"]["summary"]["d"])
      record(step, run_sae_seeds(config, workdir, name, d, log), time.perf_counter() - t0)
    elif step == "retrieve":
      c = stage_config(config, workdir, name, "test")
      c.sae.d = int(done["extract_train"]["summary"]["d"])
      res = retrieve.run_retrieval(c, sae_dir)
      brief = {
        t: {v: {k: x for k, x in r.items() if k.startswith("R@")} for v, r in by.items()}
        for t, by in res.items()
      }
      record(step, brief, time.perf_counter() - t0)
    elif step == "tasks":
      if config.study.dataset == "shapes":
        record(step, run_tasks(config, workdir, name, log), time.perf_counter() - t0)
      else:
        record(step, {}, time.perf_counter() - t0)
    elif step == "layers":
      record(step, run_layer_recall(config, workdir, name, log), time.perf_counter() - t0)
    log(f"study {name}: {step} done in {time.perf_counter() - t0:.1f} s")
  return done


def _run_model_in_worker(config_dict: dict, workdir: str, name: str) -> dict:
  import torch

  config = ml_collections.ConfigDict(config_dict)
  torch.set_num_threads(int(config.encoder_training.threads))
  return run_model(config, workdir, name, lambda msg: print(msg, flush=True))


def start_order(config: Any, names: tuple) -> tuple:
  """The order in which worker processes take the models: longest expected (`cost_s`) first, so
  that the last to start are short and the cores stay busy to the end; ties keep `names`' order."""
  for n in names:
    if float(model_settings(config, n).cost_s) < 0:
      raise SaeJaxError(f"config.study.model.{n}.cost_s={model_settings(config, n).cost_s}: expected >= 0")
  return tuple(sorted(names, key=lambda n: -float(model_settings(config, n).cost_s)))


def run_study(config: Any, workdir: str, log: Callable = print) -> dict:
  """Runs (or resumes) the study of `config.study` in `workdir` and writes <workdir>/report/."""
  if not workdir:
    raise SaeJaxError("--workdir is required")
  st = config.study
  names = config_utils.as_tuple(st.models)
  if not names:
    raise SaeJaxError("config.study.models is empty; expected model names from config.study.model")
  for n in names:
    model_settings(config, n)
  os.makedirs(workdir, exist_ok=True)
  import torch

  torch.set_num_threads(int(config.encoder_training.threads))  # model training and extraction
  t0 = time.perf_counter()
  paths = data_paths(config, workdir)
  if st.dataset == "shapes":
    shapes_lib.write_shapes(config.shapes, paths["root"], log=log)
    shapes_lib.write_tasks(config.shapes, paths["root"], log=log)  # once, before any worker reads it
  workers = int(st.workers)
  if workers < 1:
    raise SaeJaxError(f"config.study.workers={workers}: expected >= 1")
  steps = {}
  if workers == 1 or len(names) == 1:
    for n in names:
      steps[n] = run_model(config, workdir, n, log)
  else:
    # Models are independent until the report: one process per model, `workers` at a time, each
    # with encoder_training.threads torch threads (spawned: torch and JAX do not survive a fork).
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
      futures = {
        n: pool.submit(_run_model_in_worker, config.to_dict(), workdir, n) for n in start_order(config, names)
      }
      for n in names:
        steps[n] = futures[n].result()
  out = report.write_report(config, workdir, log=log)
  log(f"study: done in {time.perf_counter() - t0:.1f} s; report {out['md']}")
  return {"steps": steps, "report": out, "seconds": time.perf_counter() - t0}
