"""The shapes world: deterministic by seed, captions name exactly the objects drawn, COCO layout."""

import collections
import json
import os
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import base
from sae_jax.data import coco, shapes
from sae_jax.errors import SaeJaxError


def _cfg(seed=0, train=24, test=8):
  cfg = base.get_config().shapes
  cfg.seed, cfg.train_images, cfg.test_images = seed, train, test
  return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes"))
  shapes.write_shapes(_cfg(), out, log=None)
  return out


def _load(out, split):
  with open(os.path.join(out, f"captions_{split}.json")) as f:
    caps = json.load(f)
  with open(os.path.join(out, f"scenes_{split}.json")) as f:
    scenes = json.load(f)
  return caps, scenes


def test_deterministic_by_seed(world, tmp_path):
  again, other = str(tmp_path / "again"), str(tmp_path / "other")
  shapes.write_shapes(_cfg(), again, log=None)
  shapes.write_shapes(_cfg(seed=1), other, log=None)
  for split in shapes.SPLITS:
    assert _load(world, split) == _load(again, split)
    assert _load(world, split)[1] != _load(other, split)[1]
  caps, _ = _load(world, "train")
  for im in caps["images"]:
    a = np.asarray(Image.open(os.path.join(world, "images", im["file_name"])))
    b = np.asarray(Image.open(os.path.join(again, "images", im["file_name"])))
    np.testing.assert_array_equal(a, b)
  # Scene i does not depend on the split size.
  small = shapes.make_scene(0, "train", 5)
  rec = dict(_load(world, "train")[1][5])
  rec.pop("image_id")
  assert small == rec


_COLOUR = "|".join(shapes.COLOURS)
_SHAPE_OF_WORD = {w: s for s, words in shapes.SHAPE_WORDS.items() for w in words}
_SHAPE = "|".join(sorted(_SHAPE_OF_WORD, key=len, reverse=True))
_SIZE_OF_WORD = {w: s for s, words in shapes.SIZE_WORDS.items() for w in words}
_MENTION = re.compile(rf"(?:\b({'|'.join(_SIZE_OF_WORD)}) )?\b({_COLOUR}) ({_SHAPE})\b")


def test_captions_mention_exactly_the_objects_drawn(world):
  for split in shapes.SPLITS:
    caps, scenes = _load(world, split)
    by_image = collections.defaultdict(list)
    for a in caps["annotations"]:
      by_image[a["image_id"]].append(a["caption"])
    assert len(scenes) == len(caps["images"])
    for scene in scenes:
      texts = by_image[scene["image_id"]]
      assert len(texts) == shapes.CAPTIONS_PER_IMAGE and len(set(texts)) == len(texts)
      drawn = collections.Counter((o["colour"], o["shape"]) for o in scene["objects"])
      size_of = {(o["colour"], o["shape"]): o["size"] for o in scene["objects"]}
      for t in texts:
        found = _MENTION.findall(t)
        named = collections.Counter((c, _SHAPE_OF_WORD[s]) for _, c, s in found)
        assert named == drawn, (t, scene)
        for size_word, c, s in found:
          if size_word:
            assert _SIZE_OF_WORD[size_word] == size_of[(c, _SHAPE_OF_WORD[s])], t
        n = re.match(r"(one|two|three) shapes?:", t)
        if n:
          assert {"one": 1, "two": 2, "three": 3}[n.group(1)] == len(scene["objects"]), t
        assert scene["texture"] not in t or scene["texture"] == "none"


def test_pixels_show_the_scene(world):
  """At each filled object's centre the pixel has the object's colour; elsewhere the background's."""
  caps, scenes = _load(world, "test")
  checked = 0
  for im, scene in zip(caps["images"], scenes):
    img = np.asarray(Image.open(os.path.join(world, "images", im["file_name"])), np.int32)
    size = img.shape[0]
    cell = size / 3
    for o in scene["objects"]:
      if o["shape"] in ("ring", "cross", "star") or o["size"] == "small":
        continue  # hollow or thin at the centre / too small for jitter-free sampling
      r = cell * 0.40
      slack = cell / 2 - r
      cx = (o["col"] + 0.5) * cell + o["jitter"][0] * slack * 0.8
      cy = (o["row"] + 0.5) * cell + o["jitter"][1] * slack * 0.8
      px = img[int(cy), int(cx)]
      assert np.abs(px - np.array(shapes.COLOURS[o["colour"]])).max() <= 3, (o, px)
      checked += 1
    occupied = {(o["row"], o["col"]) for o in scene["objects"]}
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in occupied]
    if scene["texture"] == "none" and free:
      r, c = free[0]
      px = img[int((r + 0.5) * cell), int((c + 0.5) * cell)]
      np.testing.assert_array_equal(px, shapes.BACKGROUNDS[scene["background"]])
  assert checked > 0


def test_coco_source_reads_it(world):
  for split, n in (("train", 24), ("test", 8)):
    src = coco.CocoCaptionsJson(shapes.captions_json(world, split), shapes.image_dir(world))
    assert len(src.images) == n and len(src) == 5 * n
    item = src[7]
    assert item["caption_id"] // 10 == item["image_id"]
    assert coco.load_image(item["image"]).size == (64, 64)
  train_ids = {
    im.image_id
    for im in coco.CocoCaptionsJson(shapes.captions_json(world, "train"), shapes.image_dir(world)).images
  }
  test_ids = {
    im.image_id
    for im in coco.CocoCaptionsJson(shapes.captions_json(world, "test"), shapes.image_dir(world)).images
  }
  assert not train_ids & test_ids


def test_complete_data_is_kept_and_other_settings_refused(world):
  meta = shapes.write_shapes(_cfg(), world, log=None)
  assert meta["counts"]["train"] == {"images": 24, "captions": 120}
  with pytest.raises(SaeJaxError, match="other settings"):
    shapes.write_shapes(_cfg(train=30), world, log=None)
  bad = ml_collections.ConfigDict(_cfg().to_dict())
  bad.max_objects = 4
  with pytest.raises(SaeJaxError, match="config.shapes.max_objects"):
    shapes.write_shapes(bad, world + "-bad", log=None)


def test_summary_word_and_questions_answer_from_the_scene(world):
  """The generative models' targets: the largest object's shape, and each question's answer is the
  named object's attribute (named by something no other object of the scene shares)."""
  _, scenes = _load(world, "train")
  rng = np.random.default_rng(0)
  asked = collections.Counter()
  for scene in scenes:
    objs = scene["objects"]
    word = shapes.summary_word(scene)
    large = [o for o in objs if o["size"] == "large"]
    assert word == (large[0] if large else objs[0])["shape"]
    for kind in shapes.QUESTION_KINDS:
      q, a = shapes.question(scene, kind, rng)
      m = re.fullmatch(r"What colour is the (\w+)\?", q)
      if m:
        (o,) = [o for o in objs if o["shape"] == m.group(1)]  # exactly one object has that shape
        assert a == o["colour"]
        asked["colour"] += 1
        continue
      m = re.fullmatch(r"What shape is the (\w+) object\?", q)
      if m:
        (o,) = [o for o in objs if o["colour"] == m.group(1)]
        assert a == o["shape"]
        asked["shape"] += 1
        continue
      m = re.fullmatch(r"Where is the (\w+) (\w+)\?", q)
      if m:
        (o,) = [o for o in objs if (o["colour"], o["shape"]) == m.groups()]
        assert a == shapes.POSITION_WORDS[(o["row"], o["col"])][0]
        asked["position"] += 1
        continue
      assert q == "How many shapes are there?" and a == shapes.COUNT_WORDS[len(objs)], (kind, q, a)
      asked["count"] += 1
      assert kind == "count" or len(objs) > 1  # a fallback only where no attribute is unique
  assert min(asked[k] for k in shapes.QUESTION_KINDS) > 0
  texts = set(shapes.question_texts())
  for scene in scenes:
    for kind in shapes.QUESTION_KINDS:
      q, a = shapes.question(scene, kind, rng)
      assert q in texts and a in texts
  with pytest.raises(SaeJaxError, match="question kind"):
    shapes.question(scenes[0], "size", rng)
