"""Where the study keeps each model's files, and the config each stage of a model runs with;
shared by the driver, the study's analysis and the report.

<workdir>/data/                  the shapes world (study.dataset="shapes", study.data_dir="")
<workdir>/models/<name>/         HF checkpoint of a model trained here (source "train:<kind>")
<workdir>/<name>/steps.json      the finished steps of that model and their summaries
<workdir>/<name>/train_extract/  train split activations (SAE training shards)
<workdir>/<name>/sae/            the SAE workdir: test split pooled embeddings, analysis/, retrieval/
<workdir>/<name>/sae_seed<s>/    the SAEs of the other seeds (study.sae_seeds): checkpoints, analysis/
<workdir>/<name>/tasks/          the image->image and composed tasks: results.json, <task>/activations/
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from sae_jax import config_utils
from sae_jax.errors import SaeJaxError
from sae_jax.study import shapes_files

STEPS_FILE = "steps.json"
SEED_SUMMARY = "seed_summary.json"  # in each extra seed's SAE workdir, written when its Table 1 is done


def data_paths(config: Any, workdir: str) -> dict:
  """captions JSON and image dir of the train and test splits."""
  st = config.study
  if st.dataset == "shapes":
    root = st.data_dir or os.path.join(workdir, "data")
    return {
      "root": root,
      "train_json": shapes_files.captions_json(root, "train"),
      "train_images": shapes_files.image_dir(root),
      "test_json": shapes_files.captions_json(root, "test"),
      "test_images": shapes_files.image_dir(root),
      "name": "shapes",
    }
  if st.dataset == "coco":
    for f in ("coco_train_json", "coco_train_images", "coco_test_json", "coco_test_images"):
      if not st[f]:
        raise SaeJaxError(f'config.study.{f} is empty; study.dataset="coco" needs all four COCO paths')
    return {
      "root": "",
      "train_json": st.coco_train_json,
      "train_images": st.coco_train_images,
      "test_json": st.coco_test_json,
      "test_images": st.coco_test_images,
      "name": "MSCOCO",
    }
  raise SaeJaxError(f'config.study.dataset={st.dataset!r}: expected "shapes" or "coco"')


def model_settings(config: Any, name: str) -> Any:
  if name not in config.study.model:
    raise SaeJaxError(
      f"config.study.models: {name!r} has no settings in config.study.model (known: {sorted(config.study.model)})"
    )
  return config.study.model[name]


def model_dir(config: Any, workdir: str, name: str) -> str:
  src = str(model_settings(config, name).source)
  return os.path.join(workdir, "models", name) if src.startswith("train:") else src


def sae_workdir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, "sae")


def sae_seeds(config: Any) -> tuple:
  """The SAE seeds of Table 1's spread: config.seed (the main SAE) and the next study.sae_seeds - 1."""
  n = int(config.study.sae_seeds)
  if n < 1:
    raise SaeJaxError(f"config.study.sae_seeds={n}: expected >= 1 (1 = the main SAE only)")
  return tuple(int(config.seed) + k for k in range(n))


def sae_seed_workdir(config: Any, workdir: str, name: str, seed: int) -> str:
  """The SAE workdir of `seed`: the main one for config.seed, else <workdir>/<name>/sae_seed<seed>."""
  if int(seed) == int(config.seed):
    return sae_workdir(workdir, name)
  return os.path.join(workdir, name, f"sae_seed{int(seed)}")


def tasks_results(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, "tasks", "results.json")


def base_variant(config: Any, name: str) -> str:
  pooling = config_utils.as_tuple(model_settings(config, name).pooling)
  return "embed" if "embed" in pooling else ("mean" if "mean" in pooling else pooling[0])


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
