"""What every trainer of the study shares: the model kinds, the shapes splits as COCO sources, the
learning-rate schedule, progress lines, the extraction encoder around a model in training, and
the atomic checkpoint save.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Callable

from sae_jax import workdir as workdir_lib
from sae_jax.data import coco
from sae_jax.errors import SaeJaxError

CONTRASTIVE_KINDS = ("clip", "siglip")
GENERATIVE_KINDS = ("qwen2_vl", "qwen3_vl", "paligemma", "chameleon")
KINDS = CONTRASTIVE_KINDS + GENERATIVE_KINDS
FAMILY_OF_KIND = {
  "clip": "clip",
  "siglip": "siglip",
  "qwen2_vl": "qwen_vl",
  "qwen3_vl": "qwen_vl",
  "paligemma": "paligemma",
  "chameleon": "chameleon",
}
QUALITY_FILE = "quality.json"


def split_source(data_dir: str, split: str, max_images: int = 0) -> coco.CocoCaptionsJson:
  return coco.CocoCaptionsJson(
    os.path.join(data_dir, f"captions_{split}.json"), os.path.join(data_dir, "images"), max_images=max_images
  )


def split_images(src: coco.CocoCaptionsJson, idx) -> list:
  return [coco.load_image(src.images[int(i)]) for i in idx]


def captions_by_image(src: coco.CocoCaptionsJson) -> list:
  by_id: dict = {}
  for c in src.captions:
    by_id.setdefault(c.image_id, []).append(c.text)
  return [by_id[im.image_id] for im in src.images]


def scene_records(data_dir: str, split: str, src: coco.CocoCaptionsJson) -> list:
  """The scene record of every image of `src`, in its image order."""
  path = os.path.join(data_dir, f"scenes_{split}.json")
  if not os.path.exists(path):
    raise SaeJaxError(f"{path} is missing: the generative models' targets come from the scene records")
  with open(path) as f:
    by_id = {s["image_id"]: s for s in json.load(f)}
  return [by_id[im.image_id] for im in src.images]


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
  if step < warmup:
    return lr * (step + 1) / warmup
  return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Progress:
  def __init__(self, what: str, total: int, every_s: float, log: Callable):
    self.what, self.total, self.every_s, self.log = what, total, every_s, log
    self.t0 = self.last = time.perf_counter()

  def update(self, step: int, loss: float, extra: str = "") -> None:
    now = time.perf_counter()
    if now - self.last >= self.every_s or step + 1 == self.total:
      self.last = now
      rate = (step + 1) / (now - self.t0)
      eta = (self.total - step - 1) / max(rate, 1e-9)
      self.log(
        f"{self.what}: step {step + 1}/{self.total} | loss {loss:.4f}{extra} | {rate:.2f} steps/s | "
        f"{now - self.t0:.0f} s, eta {eta:.0f} s"
      )


def training_encoder(kind: str, model, processor, templates: dict, chat_template: bool):
  """The study's extraction encoder around a model being trained (left in train mode)."""
  from sae_jax import encoders

  enc = encoders.encoder_class(FAMILY_OF_KIND[kind])(
    model, processor, device="cpu", templates=templates, chat_template=chat_template, name=kind
  )
  model.train()
  return enc


def save_checkpoint(model, processor, out_dir: str, quality: dict) -> dict:
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  model.save_pretrained(tmp)
  processor.save_pretrained(tmp)
  workdir_lib.atomic_write_json(os.path.join(tmp, QUALITY_FILE), quality)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)  # the checkpoint appears whole or not at all
  return quality
