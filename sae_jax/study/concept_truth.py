"""The shapes world's truth per analysed pair, as the concepts stage's attributes.

Scene attributes (from scenes_<split>.json, per pair row, scored on image and text rows): colour,
shape, size, position (grid cell), count, background, texture. Caption attributes (text rows):
template (the i-th caption of an image uses the i-th template of `shapes.make_captions`) and
phrasing (the shape and size words the caption uses).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from sae_jax.stages.concepts import Attribute
from sae_jax.study import shapes

SCENE_ATTRIBUTES = ("colour", "shape", "size", "position", "count", "background", "texture")
TEMPLATES = ("list", "there_is", "count", "opener", "relation_or_position")


def _scene_values(scene: dict) -> dict:
  objs = scene["objects"]
  return {
    "colour": {o["colour"] for o in objs},
    "shape": {o["shape"] for o in objs},
    "size": {o["size"] for o in objs},
    "position": {f"{shapes.ROWS[o['row']]}-{shapes.COLS[o['col']]}" for o in objs},
    "count": {str(len(objs))},
    "background": {scene["background"]},
    "texture": {scene.get("texture", "none")},
  }


def _phrasing_words() -> list:
  words = {w for ws in shapes.SHAPE_WORDS.values() for w in ws}
  words |= {w for ws in shapes.SIZE_WORDS.values() for w in ws}
  return sorted(words)


def _binary(sets: list, values: list) -> np.ndarray:
  index = {v: j for j, v in enumerate(values)}
  y = np.zeros((len(sets), len(values)), bool)
  for n, s in enumerate(sets):
    for v in s:
      y[n, index[v]] = True
  return y


def shapes_attributes(data_root: str, split: str, pooled_path: str) -> Optional[dict]:
  """{name: Attribute} for the pairs of `pooled_path` (its image_ids, caption_ids, captions), or None
  when the file lacks the ids (not a pooled file of the shapes world)."""
  scenes_path = os.path.join(data_root, f"scenes_{split}.json")
  if not os.path.exists(scenes_path) or not os.path.exists(pooled_path):
    return None
  with np.load(pooled_path, allow_pickle=False) as f:
    if "image_ids" not in f or "caption_ids" not in f:
      return None
    image_ids, caption_ids = np.asarray(f["image_ids"]), np.asarray(f["caption_ids"])
    captions = np.asarray(f["captions"]).astype(str) if "captions" in f else None
  with open(scenes_path) as f:
    scenes = {int(s["image_id"]): s for s in json.load(f)}
  per_row = [_scene_values(scenes[int(i)]) for i in image_ids]
  out = {}
  for name in SCENE_ATTRIBUTES:
    values = sorted(set().union(*(r[name] for r in per_row)))
    out[name] = Attribute(values, _binary([r[name] for r in per_row], values), "pair")
  # Caption j of an image is written with template j (make_captions retries a duplicate with the same one).
  template = [{TEMPLATES[min(int(c) % 10, len(TEMPLATES) - 1)]} for c in caption_ids]
  out["template"] = Attribute(list(TEMPLATES), _binary(template, list(TEMPLATES)), "text")
  if captions is not None:
    words = _phrasing_words()
    used = [{w for w in words if f" {w} " in f" {cap} "} for cap in captions]
    out["phrasing"] = Attribute(words, _binary(used, words), "text")
  return out
