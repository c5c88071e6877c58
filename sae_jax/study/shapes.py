"""The shapes world: a procedural paired image-caption data set (scenes, rendering, captions, questions).

Each scene is a background (a named colour, optionally a texture the captions never mention) and
1-3 objects, each a shape, a colour, a size (small/large) and a cell of a 3x3 grid (with pixel
jitter the captions never mention). Every image gets 5 captions from varied templates and synonyms;
every caption names each object of the scene exactly once by its colour and shape, so the text
carries phrasing the image does not and the image carries texture and jitter the text does not.

`shapes_files.write_shapes(cfg, out)` writes it in the official COCO layout:
  images/<split>_<id>.png        RGB, cfg.image_size square
  captions_<split>.json          official COCO captions schema ({"images", "annotations"})
  scenes_<split>.json            the scene record of every image (what was drawn)
  shapes.json                    the generator settings; written last, so its presence = complete
Scene i of a split depends only on (seed, split, i): images are identical whatever the split size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

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
SPLIT_ID_BASE = {"train": 1, "test": 5_000_000}  # disjoint image ids across splits


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
