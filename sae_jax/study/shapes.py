"""The shapes world: a procedural paired image-caption data set, written in the official COCO layout.

Each scene is a background (a named colour, optionally a texture the captions never mention) and
1-3 objects, each a shape, a colour, a size (small/large) and a cell of a 3x3 grid (with pixel
jitter the captions never mention). Every image gets 5 captions from varied templates and synonyms;
every caption names each object of the scene exactly once by its colour and shape, so the text
carries phrasing the image does not and the image carries texture and jitter the text does not.

`write_shapes(cfg, out)` writes
  images/<split>_<id>.png        RGB, cfg.image_size square
  captions_<split>.json          official COCO captions schema ({"images", "annotations"})
  scenes_<split>.json            the scene record of every image (what was drawn)
  shapes.json                    the generator settings; written last, so its presence = complete
Scene i of a split depends only on (seed, split, i): images are identical whatever the split size.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError

COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (240, 220, 40),
  "orange": (245, 140, 20),
  "purple": (140, 50, 180),
  "white": (250, 250, 250),
  "black": (15, 15, 15),
}
BACKGROUNDS = {
  "grey": (128, 128, 128),
  "beige": (225, 210, 175),
  "teal": (40, 120, 120),
  "pink": (240, 180, 200),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")
# Caption words of each shape (the first is the canonical name).
SHAPE_WORDS = {
  "circle": ("circle", "disc", "dot"),
  "square": ("square", "box"),
  "triangle": ("triangle",),
  "star": ("star",),
  "cross": ("cross", "plus sign"),
  "ring": ("ring", "hoop"),
  "diamond": ("diamond", "rhombus"),
}
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
# Position words per (row, col); the first is the canonical name.
POSITION_WORDS = {
  (0, 0): ("top left", "upper left"),
  (0, 1): ("top", "top center", "upper middle"),
  (0, 2): ("top right", "upper right"),
  (1, 0): ("left", "middle left"),
  (1, 1): ("center", "middle"),
  (1, 2): ("right", "middle right"),
  (2, 0): ("bottom left", "lower left"),
  (2, 1): ("bottom", "bottom center", "lower middle"),
  (2, 2): ("bottom right", "lower right"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TEXTURES = ("none", "noise", "stripes", "gradient")
SPLITS = ("train", "test")
CAPTIONS_PER_IMAGE = 5
_FILLERS = ("", "", "", "simple ", "plain ", "clean ")
_OPENERS = ("a picture of ", "an image of ", "a drawing of ", "this image shows ", "we can see ", "")
_SPLIT_ID_BASE = {"train": 1, "test": 5_000_000}  # disjoint image ids across splits


# ------------------------------------------------------------------------------------------ scenes


def make_scene(seed: int, split: str, index: int, max_objects: int = 3) -> dict:
  """The scene record of image `index` of `split`: background, texture and objects (no pixels)."""
  rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
  bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  texture = TEXTURES[rng.integers(len(TEXTURES))]
  n = int(rng.integers(1, max_objects + 1))
  cells = rng.choice(9, size=n, replace=False)
  objects, used = [], set()
  for cell in cells:
    while True:  # distinct (colour, shape) per scene, so every caption phrase names one object
      colour = list(COLOURS)[rng.integers(len(COLOURS))]
      shape = SHAPES[rng.integers(len(SHAPES))]
      if (colour, shape) not in used:
        break
    used.add((colour, shape))
    objects.append(
      {
        "shape": shape,
        "colour": colour,
        "size": SIZES[rng.integers(2)],
        "row": int(cell) // 3,
        "col": int(cell) % 3,
        "jitter": [float(v) for v in rng.uniform(-1.0, 1.0, size=2)],
        "angle": float(rng.uniform(-15, 15)),
      }
    )
  return {"background": bg, "texture": texture, "objects": objects, "texture_seed": int(rng.integers(2**31))}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
  a0 = np.deg2rad(angle)
  if shape == "triangle":
    t = a0 - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in t]
  if shape == "square":
    t = a0 + np.pi / 4 + np.arange(4) * np.pi / 2
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in t]
  if shape == "diamond":
    pts = [(0.0, -r), (0.65 * r, 0.0), (0.0, r), (-0.65 * r, 0.0)]
  elif shape == "cross":
    w = r * 0.35
    pts = [
      (-w, -r),
      (w, -r),
      (w, -w),
      (r, -w),
      (r, w),
      (w, w),
      (w, r),
      (-w, r),
      (-w, w),
      (-r, w),
      (-r, -w),
      (-w, -w),
    ]
  else:
    pts = None
  if pts is not None:
    c, s = np.cos(a0), np.sin(a0)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
  if shape == "star":
    t = a0 - np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(rad, t)]
  raise ValueError(shape)


def render_scene(scene: dict, size: int = 64) -> np.ndarray:
  """The image of a scene record: uint8 [size, size, 3] (drawn at 4x and downsampled: antialiased)."""
  from PIL import Image, ImageDraw

  ss = 4
  big = size * ss
  rng = np.random.default_rng(scene["texture_seed"])
  bg = np.array(BACKGROUNDS[scene["background"]], np.float32)
  canvas = np.broadcast_to(bg, (size, size, 3)).copy()
  tex = scene["texture"]
  if tex == "noise":
    canvas += rng.normal(0, 12, size=(size, size, 1))
  elif tex == "stripes":
    period = rng.integers(4, 9)
    canvas += 14 * np.sign(np.sin(2 * np.pi * np.arange(size) / period))[None, :, None]
  elif tex == "gradient":
    canvas += np.linspace(-25, 25, size)[:, None, None]
  img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((big, big), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  cell = big / 3
  for o in scene["objects"]:
    r = cell * (0.22 if o["size"] == "small" else 0.40) * o.get("scale", 1.0)
    jx, jy = o["jitter"]
    slack = cell / 2 - r  # jitter keeps the object inside its cell
    cx = (o["col"] + 0.5) * cell + jx * slack * 0.8
    cy = (o["row"] + 0.5) * cell + jy * slack * 0.8
    fill = COLOURS[o["colour"]]
    if o["shape"] == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o["shape"] == "ring":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(r * 0.35)))
    else:
      draw.polygon(_polygon(o["shape"], cx, cy, r, o["angle"]), fill=fill)
  return np.asarray(img.resize((size, size), Image.BOX), np.uint8)


# ---------------------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _phrase(o: dict, rng: np.random.Generator, with_position: bool, with_size: bool) -> str:
  words = [_pick(rng, SIZE_WORDS[o["size"]])] if with_size else []
  words += [o["colour"], _pick(rng, SHAPE_WORDS[o["shape"]])]
  np_ = " ".join(words)
  article = "an" if np_[0] in "aeiou" else "a"
  text = f"{article} {np_}"
  if with_position:
    where = _pick(rng, POSITION_WORDS[(o["row"], o["col"])])
    prep = "at the" if rng.random() < 0.5 else "in the"
    text += f" {prep} {where}"
  return text


def _join(parts: list) -> str:
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: dict, b: dict) -> str:
  if a["col"] < b["col"]:
    return _pick_static(("to the left of", "left of"), a, b)
  if a["col"] > b["col"]:
    return _pick_static(("to the right of", "right of"), a, b)
  return "above" if a["row"] < b["row"] else "below"


def _pick_static(options, a, b) -> str:
  return options[(a["row"] + b["col"]) % len(options)]


def make_captions(scene: dict, seed: int, split: str, index: int, n: int = CAPTIONS_PER_IMAGE) -> list:
  """`n` distinct captions of a scene; each names every object exactly once (colour + shape word)."""
  rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index), 7])
  objs = scene["objects"]
  k = len(objs)
  out: list = []
  templates = ["list", "there_is", "count", "opener", "relation" if k > 1 else "position"]
  tries = 0
  while len(out) < n:
    kind = templates[len(out)] if tries < 50 else _pick(rng, ("list", "opener", "there_is"))
    tries += 1
    order = rng.permutation(k)
    pos = bool(rng.random() < 0.6)
    size = bool(rng.random() < 0.6)
    phrases = [_phrase(objs[i], rng, pos, size) for i in order]
    filler = _pick(rng, _FILLERS)
    if kind == "list":
      cap = _join(phrases)
    elif kind == "there_is":
      verb = "is" if k == 1 else "are"
      cap = f"there {verb} {_join(phrases)} on a {filler}{scene['background']} background"
    elif kind == "count":
      noun = "shape" if k == 1 else "shapes"
      cap = f"{COUNT_WORDS[k]} {noun}: {_join(phrases)}"
    elif kind == "opener":
      cap = f"{_pick(rng, _OPENERS)}{_join(phrases)}"
    elif kind == "position":
      o = objs[0]
      cap = f"{_phrase(o, rng, False, True)} {_pick(rng, ('sitting', 'placed', 'drawn'))} in the " + _pick(
        rng, POSITION_WORDS[(o["row"], o["col"])]
      )
    else:  # relation between the first two objects of a random order, then the rest
      a, b = objs[order[0]], objs[order[1]]
      cap = f"{_phrase(a, rng, False, size)} {_relation(a, b)} {_phrase(b, rng, False, size)}"
      rest = [_phrase(objs[i], rng, pos, size) for i in order[2:]]
      if rest:
        cap += f", and {_join(rest)}"
    cap = cap.strip()
    if cap not in out:
      out.append(cap)
  return out


# ------------------------------------------------------------------- generalist training targets
# What the generative models of the study learn besides captioning (sae_jax/study/trainers/):
# a one-word summary of a scene and short questions about it, all read off the scene record.

QUESTION_KINDS = ("colour", "shape", "count", "position")


SUMMARY_ATTRIBUTES = ("shape", "colour")


def summary_word(scene: dict, attribute: str = "shape") -> str:
  """The one-word summary of a scene: the `attribute` ("shape": canonical name, or "colour") of its
  largest object (the first large object of the record, else the first object)."""
  if attribute not in SUMMARY_ATTRIBUTES:
    raise SaeJaxError(f"summary attribute {attribute!r}: expected one of {SUMMARY_ATTRIBUTES}")
  objs = scene["objects"]
  large = [o for o in objs if o["size"] == "large"]
  return (large or objs)[0][attribute]


def question(scene: dict, kind: str, rng: np.random.Generator) -> tuple:
  """(question, answer) of `kind` about a scene. An object is named by an attribute that is unique in
  the scene; when none is (two objects of one shape, say), the question falls back to the count."""
  objs = scene["objects"]
  if kind not in QUESTION_KINDS:
    raise SaeJaxError(f"question kind {kind!r}: expected one of {QUESTION_KINDS}")
  if kind == "colour":
    unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
    if unique:
      o = unique[int(rng.integers(len(unique)))]
      return f"What colour is the {o['shape']}?", o["colour"]
  elif kind == "shape":
    unique = [o for o in objs if sum(p["colour"] == o["colour"] for p in objs) == 1]
    if unique:
      o = unique[int(rng.integers(len(unique)))]
      return f"What shape is the {o['colour']} object?", o["shape"]
  elif kind == "position":
    o = objs[int(rng.integers(len(objs)))]
    return f"Where is the {o['colour']} {o['shape']}?", POSITION_WORDS[(o["row"], o["col"])][0]
  return "How many shapes are there?", COUNT_WORDS[len(objs)]


def question_texts() -> list:
  """Every question and answer text `question` can produce (for tokenizer corpora)."""
  out = ["How many shapes are there?"] + list(COUNT_WORDS.values())
  out += [f"What colour is the {s}?" for s in SHAPES] + [f"What shape is the {c} object?" for c in COLOURS]
  out += [f"Where is the {c} {s}?" for c in COLOURS for s in SHAPES]
  out += list(COLOURS) + list(SHAPES) + [w[0] for w in POSITION_WORDS.values()]
  return out


# ------------------------------------------------------------------- the paper's other two tasks
# image -> image (the role of NIGHTS): the positive of a query image is the same scene rendered
# again. composed (the role of CIRR): a reference image and a modification text -> the target image,
# among distractors that match only the reference or only the text.

MODIFICATIONS = ("recolour", "add", "remove")


def rerender(scene: dict, rng: np.random.Generator) -> dict:
  """The same scene (objects: shape, colour, size, cell; background) drawn again: another texture,
  new jitter and rotation, and a size noise of up to 12% (`scale`) the captions never mention."""
  texture = [t for t in TEXTURES if t != scene["texture"]][int(rng.integers(len(TEXTURES) - 1))]
  objects = [
    dict(
      o,
      jitter=[float(v) for v in rng.uniform(-1.0, 1.0, size=2)],
      angle=float(rng.uniform(-15, 15)),
      scale=float(rng.uniform(0.88, 1.12)),
    )
    for o in scene["objects"]
  ]
  out = dict(scene, texture=texture, objects=objects, texture_seed=int(rng.integers(2**31)))
  return out


def same_content(a: dict, b: dict) -> bool:
  """True when two scene records show the same objects (shape, colour, size, cell) on one background."""
  key = lambda s: (
    s["background"],
    sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in s["objects"]),
  )
  return key(a) == key(b)


def modify(scene: dict, kind: str, rng: np.random.Generator) -> Optional[tuple]:
  """(text, target scene) of a modification of `kind`, or None where the scene does not allow it.

  recolour  "make the <shape> <colour>": an object whose shape is unique in the scene gets a colour
            no object of that shape has
  add       "add a <size> <colour> <shape> at the <position>": a new object in a free cell
  remove    "remove the <colour> <shape>": one object of a scene of two or more
  """
  objs = scene["objects"]
  if kind == "recolour":
    unique = [i for i, o in enumerate(objs) if sum(p["shape"] == o["shape"] for p in objs) == 1]
    if not unique:
      return None
    i = unique[int(rng.integers(len(unique)))]
    colours = [c for c in COLOURS if c != objs[i]["colour"]]
    colour = colours[int(rng.integers(len(colours)))]
    new = [dict(o, colour=colour) if j == i else dict(o) for j, o in enumerate(objs)]
    return f"make the {objs[i]['shape']} {colour}", dict(scene, objects=new)
  if kind == "add":
    free = sorted(set(range(9)) - {3 * o["row"] + o["col"] for o in objs})
    if len(objs) >= 3 or not free:
      return None
    cell = free[int(rng.integers(len(free)))]
    while True:
      colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
      shape = SHAPES[int(rng.integers(len(SHAPES)))]
      if all((o["colour"], o["shape"]) != (colour, shape) for o in objs):
        break
    size = SIZES[int(rng.integers(2))]
    o = {"shape": shape, "colour": colour, "size": size, "row": cell // 3, "col": cell % 3}
    o.update(jitter=[0.0, 0.0], angle=0.0)
    where = POSITION_WORDS[(o["row"], o["col"])][0]
    return f"add a {size} {colour} {shape} at the {where}", dict(scene, objects=[dict(p) for p in objs] + [o])
  if kind == "remove":
    if len(objs) < 2:
      return None
    i = int(rng.integers(len(objs)))
    rest = [dict(o) for j, o in enumerate(objs) if j != i]
    return f"remove the {objs[i]['colour']} {objs[i]['shape']}", dict(scene, objects=rest)
  raise SaeJaxError(f"modification kind {kind!r}: expected one of {MODIFICATIONS}")


def _content(objs: list) -> list:
  return sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in objs)


def text_holds(text: str, reference: dict, target: dict) -> bool:
  """Whether `target` shows what modification `text` makes of `reference`, judged on the scene
  records as multisets of (shape, colour, size, cell) (an independent reading of the text)."""
  w = text.split()
  ref, new = _content(reference["objects"]), _content(target["objects"])
  if reference["background"] != target["background"]:
    return False
  if w[0] == "make":  # make the <shape> <colour>
    hit = [o for o in ref if o[0] == w[2]]
    return (
      len(hit) == 1
      and hit[0][1] != w[3]
      and new == sorted([o if o[0] != w[2] else (o[0], w[3]) + o[2:] for o in ref])
    )
  if w[0] == "add":  # add a <size> <colour> <shape> at the <position...>
    cells = [rc for rc, names in POSITION_WORDS.items() if names[0] == " ".join(w[7:])]
    return len(cells) == 1 and new == sorted(ref + [(w[4], w[3], w[2]) + cells[0]])
  if w[0] == "remove":  # remove the <colour> <shape>
    gone = [o for o in ref if (o[1], o[0]) == (w[2], w[3])]
    return len(gone) == 1 and new == sorted(o for o in ref if o is not gone[0])
  return False


def image_to_image_task(scenes: list, seed: int) -> dict:
  """NIGHTS role: query q = scene q as drawn; candidate q = scene q drawn again (`rerender`), its
  only positive. Returns {"queries": scenes, "candidates": scenes, "positives": [[q], ...]}."""
  rng = np.random.default_rng([int(seed), 11])
  cands = [rerender(s, rng) for s in scenes]
  return {"queries": list(scenes), "candidates": cands, "positives": [[i] for i in range(len(scenes))]}


def composed_task(scenes: list, seed: int) -> dict:
  """CIRR role: query q = (scene, modification text); candidates, per query, the target (the modified
  scene drawn again, the positive), a reference-only distractor (the reference drawn again: matches
  the image, not the text) and a text-only distractor (another scene with the same modification
  applied: matches the text, not the reference); `sources[c]` is the scene candidate c was made from.
  Queries whose scene allows no modification of the kind drawn try the next kind."""
  rng = np.random.default_rng([int(seed), 13])
  queries, cands, positives, roles, sources = [], [], [], [], []
  for qi, scene in enumerate(scenes):
    first = int(rng.integers(len(MODIFICATIONS)))
    for k in range(len(MODIFICATIONS)):
      kind = MODIFICATIONS[(first + k) % len(MODIFICATIONS)]
      made = modify(scene, kind, rng)
      if made is None:
        continue
      text, target = made
      other = source = None
      for step in range(1, len(scenes)):  # the next scene the same text applies to
        s2 = scenes[(qi + step) % len(scenes)]
        t2 = None if same_content(s2, scene) else _apply_text(text, s2)
        if t2 is not None and not same_content(t2, target):
          other, source = t2, s2
          break
      if other is None:
        continue
      queries.append({"scene": scene, "text": text, "kind": kind})
      positives.append([len(cands)])
      cands += [rerender(target, rng), rerender(scene, rng), rerender(other, rng)]
      roles += ["target", "reference_only", "text_only"]
      sources += [scene, scene, source]
      break
  return {"queries": queries, "candidates": cands, "positives": positives, "roles": roles, "sources": sources}


def _apply_text(text: str, scene: dict) -> Optional[dict]:
  """The scene modification `text` (from `modify`) describes, applied to another scene; None where
  it does not apply (no such object, a duplicate colour-shape or an occupied cell)."""
  words = text.split()
  objs = scene["objects"]
  if words[0] == "make":
    shape, colour = words[2], words[3]
    hit = [o for o in objs if o["shape"] == shape]
    if len(hit) != 1 or hit[0]["colour"] == colour:
      return None
    new = [dict(o, colour=colour) if o["shape"] == shape else dict(o) for o in objs]
  elif words[0] == "add":
    size, colour, shape = words[2], words[3], words[4]
    where = " ".join(words[7:])
    ((row, col),) = [rc for rc, names in POSITION_WORDS.items() if names[0] == where]
    if len(objs) >= 3 or any(
      (o["row"], o["col"]) == (row, col) or (o["colour"], o["shape"]) == (colour, shape) for o in objs
    ):
      return None
    o = {
      "shape": shape,
      "colour": colour,
      "size": size,
      "row": row,
      "col": col,
      "jitter": [0.0, 0.0],
      "angle": 0.0,
    }
    new = [dict(p) for p in objs] + [o]
  else:
    colour, shape = words[2], words[3]
    if len(objs) < 2 or not any((o["colour"], o["shape"]) == (colour, shape) for o in objs):
      return None
    new = [dict(o) for o in objs if (o["colour"], o["shape"]) != (colour, shape)]
  return dict(scene, objects=new)


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
    "captions_per_image": CAPTIONS_PER_IMAGE,
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
  return _SPLIT_ID_BASE[split] + int(index)


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
      scene = make_scene(cfg.seed, split, i, int(cfg.max_objects))
      iid = image_id(split, i)
      name = f"{split}_{iid:08d}.png"
      path = os.path.join(img_dir, name)
      if not os.path.exists(path):  # a killed run keeps the images it finished
        Image.fromarray(render_scene(scene, int(cfg.image_size))).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
      images.append(
        {"id": iid, "file_name": name, "width": int(cfg.image_size), "height": int(cfg.image_size)}
      )
      for j, text in enumerate(make_captions(scene, cfg.seed, split, i)):
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
    built = (image_to_image_task if task == "image_to_image" else composed_task)(scenes, int(cfg.seed))
    queries, pool = [], []
    for j, c in enumerate(built["candidates"]):
      rel = os.path.join("tasks", "images", f"{name}_c{j:06d}.png")
      path = os.path.join(out, rel)
      if not os.path.exists(path):
        Image.fromarray(render_scene(c, size)).save(path + ".tmp.png")
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
    scene = make_scene(seed, "test", i)
    name = f"{iid:012d}.jpg"
    img = Image.fromarray(render_scene(scene, size))
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
    for j, text in enumerate(make_captions(scene, seed, "test", i)):
      annotations.append({"image_id": iid, "id": iid * 10 + j, "caption": text})
  doc = {
    "info": {"description": "shapes world in the COCO val2017 layout", "version": "1", "seed": int(seed)},
    "licenses": [{"id": 1, "name": "generated by sae-jax (no third-party content)", "url": ""}],
    "images": images,
    "annotations": annotations,
  }
  workdir_lib.atomic_write_json(os.path.join(out, "captions.json"), doc, None)
  return out
