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
  concepts    <workdir>/<name>/sae/concepts/ (index.html, cards, concepts.json): every concept on the
              test pairs, labelled against the shapes world's truth (`concept_truth`)
  tasks       (shapes) the paper's other tasks on the test scenes (`shapes_files.write_tasks`): image->image
              (NIGHTS role) for every model, composed (CIRR role) for the generative ones, extracted
              through the M-BEIR path into <workdir>/<name>/tasks/<task>/ and scored per pooling
              variant (Recall@K of the base embeddings with bootstrap intervals over queries and the
              chance level) into <workdir>/<name>/tasks/results.json; the first-hit ranks behind
              them in <workdir>/<name>/tasks/<task>/first_hit_ranks.npz
  layers      (decoders) image->text R@1 of the mean-pooled test embeddings at every hidden layer,
              0 being the input embeddings (`run_layer_recall`): where image and text align, and
              where a decoder loses the alignment its input has

Each step is a function of the model's `ModelContext` returning the summary recorded for it
(`STEPS`, in order); then `run_study` writes <workdir>/report/ (`sae_jax.study.report`). Each finished step is recorded in
<workdir>/<name>/steps.json and skipped on a re-run; an interrupted step is re-run and resumes
through the stage's own resume (extraction part files and finished shards, SAE checkpoints).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Any, Callable

import ml_collections

from sae_jax import config_utils
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.stages import analyze, concepts, extract, retrieve
from sae_jax.study import analysis, concept_truth, report, shapes_files
from sae_jax.study import trainers as train_encoder
from sae_jax.study.layout import (
  SEED_SUMMARY,
  STEPS_FILE,
  data_paths,
  model_dir,
  model_settings,
  sae_seed_workdir,
  sae_seeds,
  sae_workdir,
  seed_stage_config,
  stage_config,
)
from sae_jax.training import trainer


@dataclasses.dataclass
class ModelContext:
  """What every step of one model reads: the config, the study's workdir, the model's name, the
  log, and the summaries of the steps done so far (`done`, as in <workdir>/<name>/steps.json)."""

  config: Any
  workdir: str
  name: str
  log: Callable
  done: dict

  @property
  def d(self) -> int:
    """The width of the extracted rows (the SAE's input), known once `extract_train` has run."""
    return int(self.done["extract_train"]["summary"]["d"])

  def stage(self) -> ml_collections.ConfigDict:
    """The test-split stage config with the SAE's width set (the SAE, analysis and retrieval steps)."""
    c = stage_config(self.config, self.workdir, self.name, "test")
    c.sae.d = self.d
    return c


def step_model(ctx: ModelContext) -> dict:
  """Trains the model here (`source="train:<kind>"`) or records the hub id / directory it uses."""
  m = model_settings(ctx.config, ctx.name)
  src = str(m.source)
  if not src.startswith("train:"):
    return {"source": src, "trained_here": False}
  return train_encoder.train_encoder(
    ctx.config,
    src[len("train:") :],
    data_paths(ctx.config, ctx.workdir)["root"],
    model_dir(ctx.config, ctx.workdir, ctx.name),
    ctx.log,
    chat_template=bool(m.get("chat_template", False)),
  )


def _extract(ctx: ModelContext, split: str) -> dict:
  root = os.path.join(ctx.workdir, ctx.name)
  wd = os.path.join(root, "train_extract") if split == "train" else sae_workdir(ctx.workdir, ctx.name)
  s = extract.run_extraction(stage_config(ctx.config, ctx.workdir, ctx.name, split), wd)
  return {k: s[k] for k in ("counts", "d", "model", "family", "variants", "elapsed_s")}


def step_extract_train(ctx: ModelContext) -> dict:
  """The SAE's training rows from the train split (`study.sae_rows`)."""
  return _extract(ctx, "train")


def step_extract_test(ctx: ModelContext) -> dict:
  """The test split's pooled embeddings of every variant (what is analysed and retrieved)."""
  return _extract(ctx, "test")


def step_sae(ctx: ModelContext) -> dict:
  return trainer.train_and_evaluate(ctx.stage(), sae_workdir(ctx.workdir, ctx.name))


def step_analyze(ctx: ModelContext) -> dict:
  s = analyze.run_analysis(ctx.stage(), sae_workdir(ctx.workdir, ctx.name))
  return {k: s[k] for k in ("c", "d", "k", "n_pairs", "table1", "embeddings_path")}


def step_sae_seeds(ctx: ModelContext) -> dict:
  return run_sae_seeds(ctx.config, ctx.workdir, ctx.name, ctx.d, ctx.log)


def step_retrieve(ctx: ModelContext) -> dict:
  res = retrieve.run_retrieval(ctx.stage(), sae_workdir(ctx.workdir, ctx.name))
  return {
    t: {v: {k: x for k, x in r.items() if k.startswith("R@")} for v, r in by.items()} for t, by in res.items()
  }


def step_concepts(ctx: ModelContext) -> dict:
  """The concept browser of the main SAE on the test pairs, labelled against the shapes world's truth."""
  c = ctx.stage()
  paths = data_paths(ctx.config, ctx.workdir)
  c.concepts.coco_json = paths["test_json"]
  c.concepts.image_root = paths["test_images"]
  wd = sae_workdir(ctx.workdir, ctx.name)
  attributes = None
  if ctx.config.study.dataset == "shapes":
    pooled = os.path.join(wd, "activations", f"pooled_{c.analysis.variant}.npz")
    attributes = concept_truth.shapes_attributes(paths["root"], "test", pooled)
  s = concepts.run_concepts(c, wd, attributes)
  return {k: s[k] for k in ("composition", "n_cards", "truth", "seconds")}


def step_tasks(ctx: ModelContext) -> dict:
  if ctx.config.study.dataset != "shapes":
    return {}
  return analysis.run_tasks(ctx.config, ctx.workdir, ctx.name, ctx.log)


def step_layers(ctx: ModelContext) -> dict:
  return analysis.run_layer_recall(ctx.config, ctx.workdir, ctx.name, ctx.log)


# The steps of one model, in order; each returns the summary recorded in <name>/steps.json.
STEPS: dict = {
  "model": step_model,
  "extract_train": step_extract_train,
  "extract_test": step_extract_test,
  "sae": step_sae,
  "analyze": step_analyze,
  "sae_seeds": step_sae_seeds,
  "retrieve": step_retrieve,
  "concepts": step_concepts,
  "tasks": step_tasks,
  "layers": step_layers,
}


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
  """Every step of one model; returns {step: {"seconds", "summary"}} (steps done earlier are read back)."""
  root = os.path.join(workdir, name)
  os.makedirs(root, exist_ok=True)
  steps_path = os.path.join(root, STEPS_FILE)
  ctx = ModelContext(config, workdir, name, log, _read_steps(steps_path))
  done = ctx.done
  seeds = done.get("sae_seeds")
  if seeds is not None and seeds["summary"].get("seeds") != list(sae_seeds(config)[1:]):
    del done["sae_seeds"]  # config.study.sae_seeds changed: train and analyse the seeds not done yet
  for step, run_step in STEPS.items():
    if step in done:
      log(f"study {name}: {step} done earlier, skipped")
      continue
    t0 = time.perf_counter()
    log(f"study {name}: {step} ...")
    summary = run_step(ctx)
    done[step] = {"seconds": round(time.perf_counter() - t0, 1), "summary": summary}
    workdir_lib.atomic_write_json(steps_path, done)
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
    shapes_files.write_shapes(config.shapes, paths["root"], log=log)
    shapes_files.write_tasks(config.shapes, paths["root"], log=log)  # once, before any worker reads it
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
