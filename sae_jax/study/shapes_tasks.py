"""The shapes world's two other retrieval tasks, in the paper's roles: image -> image (NIGHTS:
the positive of a query image is the same scene rendered again) and composed (CIRR: a reference
image and a modification text -> the target image, among distractors that match only one of them)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from sae_jax.errors import SaeJaxError
from sae_jax.study import shapes

# ------------------------------------------------------------------- the paper's other two tasks
# image -> image (the role of NIGHTS): the positive of a query image is the same scene rendered
# again. composed (the role of CIRR): a reference image and a modification text -> the target image,
# among distractors that match only the reference or only the text.

MODIFICATIONS = ("recolour", "add", "remove")


def rerender(scene: dict, rng: np.random.Generator) -> dict:
  """The same scene (objects: shape, colour, size, cell; background) drawn again: another texture,
  new jitter and rotation, and a size noise of up to 12% (`scale`) the captions never mention."""
  texture = [t for t in shapes.TEXTURES if t != scene["texture"]][int(rng.integers(len(shapes.TEXTURES) - 1))]
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
    colours = [c for c in shapes.COLOURS if c != objs[i]["colour"]]
    colour = colours[int(rng.integers(len(colours)))]
    new = [dict(o, colour=colour) if j == i else dict(o) for j, o in enumerate(objs)]
    return f"make the {objs[i]['shape']} {colour}", dict(scene, objects=new)
  if kind == "add":
    free = sorted(set(range(9)) - {3 * o["row"] + o["col"] for o in objs})
    if len(objs) >= 3 or not free:
      return None
    cell = free[int(rng.integers(len(free)))]
    while True:
      colour = list(shapes.COLOURS)[int(rng.integers(len(shapes.COLOURS)))]
      shape = shapes.SHAPES[int(rng.integers(len(shapes.SHAPES)))]
      if all((o["colour"], o["shape"]) != (colour, shape) for o in objs):
        break
    size = shapes.SIZES[int(rng.integers(2))]
    o = {"shape": shape, "colour": colour, "size": size, "row": cell // 3, "col": cell % 3}
    o.update(jitter=[0.0, 0.0], angle=0.0)
    where = shapes.POSITION_WORDS[(o["row"], o["col"])][0]
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
    cells = [rc for rc, names in shapes.POSITION_WORDS.items() if names[0] == " ".join(w[7:])]
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
    ((row, col),) = [rc for rc, names in shapes.POSITION_WORDS.items() if names[0] == where]
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
