"""Where the study keeps each model's files, shared by the driver (`study`) and the report.

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

from sae_jax import config_utils
from sae_jax.errors import SaeJaxError
from sae_jax.study import shapes as shapes_lib

STEPS_FILE = "steps.json"
SEED_SUMMARY = "seed_summary.json"  # in each extra seed's SAE workdir, written when its Table 1 is done


def data_paths(config: Any, workdir: str) -> dict:
  """captions JSON and image dir of the train and test splits."""
  st = config.study
  if st.dataset == "shapes":
    root = st.data_dir or os.path.join(workdir, "data")
    return {
      "root": root,
      "train_json": shapes_lib.captions_json(root, "train"),
      "train_images": shapes_lib.image_dir(root),
      "test_json": shapes_lib.captions_json(root, "test"),
      "test_images": shapes_lib.image_dir(root),
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
