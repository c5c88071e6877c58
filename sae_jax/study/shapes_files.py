"""Writes the shapes world to disk: both splits in the official COCO captions layout
(`write_shapes`), the two other tasks in the M-BEIR layout (`write_tasks`), and a small COCO
val2017-style set drawn from scenes (`write_coco_mini`, the extraction tests' data)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.study import shapes, shapes_tasks

# ------------------------------------------------------------------------------------------ writer


def split_sizes(cfg: Any) -> dict:
  return {"train": int(cfg.train_images), "test": int(cfg.test_images)}


def _check(cfg: Any) -> None:
  for name in ("train_images", "test_images", "image_size", "max_objects"):
    if int(cfg[name]) < 1:
      raise SaeJaxError(f"config.shapes.{name}={cfg[name]}: expected a positive integer")
  if int(cfg.max_objects) > 3:
    raise SaeJaxError(f"config.shapes.max_objects={cfg.max_objects}: expected 1, 2 or 3")
  if int(cfg.image_size) < 24:
    raise SaeJaxError(f"config.shapes.image_size={cfg.image_size}: expected at least 24 pixels")


def settings(cfg: Any) -> dict:
  return {
    "seed": int(cfg.seed),
    "train_images": int(cfg.train_images),
    "test_images": int(cfg.test_images),
    "image_size": int(cfg.image_size),
    "max_objects": int(cfg.max_objects),
    "captions_per_image": shapes.CAPTIONS_PER_IMAGE,
  }


def is_complete(out: str, cfg: Any) -> bool:
  """True when `out` holds a finished data set written with these settings."""
  path = os.path.join(out, "shapes.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    old = json.load(f)
  if old.get("settings") != settings(cfg):
    raise SaeJaxError(
      f"{path}: holds a shapes data set with other settings ({old.get('settings')} vs {settings(cfg)}); "
      "use another --out or delete it"
    )
  return True


def image_id(split: str, index: int) -> int:
  return shapes.SPLIT_ID_BASE[split] + int(index)


def write_shapes(cfg: Any, out: str, log=print) -> dict:
  """Writes the data set (both splits) under `out`; skips the work when it is already complete."""
  from PIL import Image

  _check(cfg)
  if is_complete(out, cfg):
    with open(os.path.join(out, "shapes.json")) as f:
      return json.load(f)
  img_dir = os.path.join(out, "images")
  os.makedirs(img_dir, exist_ok=True)
  t0 = time.perf_counter()
  counts = {}
  for split, n in split_sizes(cfg).items():
    images, annotations, scenes = [], [], []
    for i in range(n):
      scene = shapes.make_scene(cfg.seed, split, i, int(cfg.max_objects))
      iid = image_id(split, i)
      name = f"{split}_{iid:08d}.png"
      path = os.path.join(img_dir, name)
      if not os.path.exists(path):  # a killed run keeps the images it finished
        Image.fromarray(shapes.render_scene(scene, int(cfg.image_size))).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
      images.append(
        {"id": iid, "file_name": name, "width": int(cfg.image_size), "height": int(cfg.image_size)}
      )
      for j, text in enumerate(shapes.make_captions(scene, cfg.seed, split, i)):
        annotations.append({"id": iid * 10 + j, "image_id": iid, "caption": text})
      scenes.append({"image_id": iid, **scene})
      if log and (i + 1) % 2000 == 0:
        log(f"shapes {split}: {i + 1}/{n} images ({time.perf_counter() - t0:.0f} s)")
    info = {"description": f"shapes world, split {split}", "version": "1", **settings(cfg)}
    workdir_lib.atomic_write_json(
      os.path.join(out, f"captions_{split}.json"),
      {"info": info, "images": images, "annotations": annotations},
      None,
    )
    workdir_lib.atomic_write_json(os.path.join(out, f"scenes_{split}.json"), scenes, None)
    counts[split] = {"images": n, "captions": len(annotations)}
  meta = {"settings": settings(cfg), "counts": counts, "seconds": round(time.perf_counter() - t0, 2)}
  workdir_lib.atomic_write_json(os.path.join(out, "shapes.json"), meta)
  if log:
    log(f"shapes: wrote {counts} to {out} in {meta['seconds']:.1f} s")
  return meta


def captions_json(out: str, split: str) -> str:
  return os.path.join(out, f"captions_{split}.json")


def image_dir(out: str) -> str:
  return os.path.join(out, "images")


TASK_FILES = {"image_to_image": "nights", "image_text_to_image": "cirr"}


def write_tasks(cfg: Any, out: str, log=print) -> dict:
  """Writes the image->image and composed tasks on the test split's scenes in the M-BEIR layout
  (`sae_jax.data.mbeir`; image paths relative to `out`, the data root) under `out/tasks/`:
    <name>_queries.jsonl, <name>_pool.jsonl   queries (image / image,text) and candidates (image)
    <name>_scenes.json                         the scene record of every query and candidate
    images/<name>_c<j>.png                     the candidates (queries are the test images)
    tasks.json                                 written last: its presence = complete
  `name` is "nights" (image_to_image) or "cirr" (image_text_to_image)."""
  from PIL import Image

  root = os.path.join(out, "tasks")
  done = os.path.join(root, "tasks.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  if not is_complete(out, cfg):
    raise SaeJaxError(f"{out}: the shapes data set is not complete (write_shapes first)")
  with open(os.path.join(out, "scenes_test.json")) as f:
    scenes = json.load(f)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  size = int(cfg.image_size)
  query_path = lambda s: os.path.join("images", f"test_{s['image_id']:08d}.png")
  counts = {}
  for task, name in TASK_FILES.items():
    built = (shapes_tasks.image_to_image_task if task == "image_to_image" else shapes_tasks.composed_task)(
      scenes, int(cfg.seed)
    )
    queries, pool = [], []
    for j, c in enumerate(built["candidates"]):
      rel = os.path.join("tasks", "images", f"{name}_c{j:06d}.png")
      path = os.path.join(out, rel)
      if not os.path.exists(path):
        Image.fromarray(shapes.render_scene(c, size)).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
      pool.append({"did": f"{name}:c{j}", "txt": None, "img_path": rel, "modality": "image"})
    for i, q in enumerate(built["queries"]):
      scene = q if task == "image_to_image" else q["scene"]
      rec = {
        "qid": f"{name}:q{i}",
        "query_img_path": query_path(scene),
        "query_txt": None if task == "image_to_image" else q["text"],
        "query_modality": "image" if task == "image_to_image" else "image,text",
        "pos_cand_list": [f"{name}:c{j}" for j in built["positives"][i]],
      }
      queries.append(rec)
    for what, recs in (("queries", queries), ("pool", pool)):
      workdir_lib.atomic_write_text(
        os.path.join(root, f"{name}_{what}.jsonl"), "".join(json.dumps(r) + "\n" for r in recs)
      )
    workdir_lib.atomic_write_json(os.path.join(root, f"{name}_scenes.json"), built, None)
    counts[task] = {"file": name, "queries": len(queries), "candidates": len(pool)}
  meta = {"settings": settings(cfg), "counts": counts}
  workdir_lib.atomic_write_json(done, meta)
  if log:
    log(f"shapes tasks: wrote {counts} to {root}")
  return meta


# ------------------------------------------------------------------------- a COCO val2017-style mini set

# The ids of an 11-image COCO val2017 sample; the mini set uses them (and COCO's file naming) so a tiny
# preset or a test addresses images as it would in the real layout.
COCO_MINI_IDS = (139, 285, 724, 1296, 1353, 1425, 1584, 1761, 1818, 2149, 2473)


def write_coco_mini(out: str, size: int = 224, seed: int = 0) -> str:
  """A small data set in the official COCO val2017 layout from shapes scenes; returns `out`.

  `out/captions.json` (the captions schema with `info`, `licenses`, `images`, `annotations`: 5
  captions per image) and `out/images/<id:012d>.jpg` for the ids `COCO_MINI_IDS`. The JPEGs cover
  what real photographs bring to a loader: one is 8-bit grayscale and one carries EXIF metadata
  (camera make, an orientation tag); all are decoded to RGB by `sae_jax.data.coco.load_image`.
  This is what the `:tiny` model presets read from `$COCO_MINI`.
  """
  from PIL import Image

  img_dir = os.path.join(out, "images")
  os.makedirs(img_dir, exist_ok=True)
  images, annotations = [], []
  for i, iid in enumerate(COCO_MINI_IDS):
    scene = shapes.make_scene(seed, "test", i)
    name = f"{iid:012d}.jpg"
    img = Image.fromarray(shapes.render_scene(scene, size))
    options: dict = {"quality": 90}
    if i == 4:
      img = img.convert("L")
    if i == 5:
      exif = Image.Exif()
      exif[0x010F] = "sae-jax shapes world"  # Make
      exif[0x0112] = 1  # Orientation: upright
      options["exif"] = exif.tobytes()
    tmp = os.path.join(img_dir, name + ".tmp")
    img.save(tmp, format="JPEG", **options)
    os.replace(tmp, os.path.join(img_dir, name))
    images.append({"license": 1, "file_name": name, "height": size, "width": size, "id": iid})
    for j, text in enumerate(shapes.make_captions(scene, seed, "test", i)):
      annotations.append({"image_id": iid, "id": iid * 10 + j, "caption": text})
  doc = {
    "info": {"description": "shapes world in the COCO val2017 layout", "version": "1", "seed": int(seed)},
    "licenses": [{"id": 1, "name": "generated by sae-jax (no third-party content)", "url": ""}],
    "images": images,
    "annotations": annotations,
  }
  workdir_lib.atomic_write_json(os.path.join(out, "captions.json"), doc, None)
  return out
