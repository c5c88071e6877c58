"""The shapes world: deterministic by seed, captions name exactly the objects drawn, COCO layout."""

import collections
import json
import os
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import study_common
from sae_jax.data import coco
from sae_jax.errors import SaeJaxError
from sae_jax.study import shapes, shapes_files, shapes_tasks


def _cfg(seed=0, train=24, test=8):
  cfg = study_common.get_config().shapes
  cfg.seed, cfg.train_images, cfg.test_images = seed, train, test
  return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes"))
  shapes_files.write_shapes(_cfg(), out, log=None)
  return out


def _load(out, split):
  with open(os.path.join(out, f"captions_{split}.json")) as f:
    caps = json.load(f)
  with open(os.path.join(out, f"scenes_{split}.json")) as f:
    scenes = json.load(f)
  return caps, scenes


def test_deterministic_by_seed(world, tmp_path):
  again, other = str(tmp_path / "again"), str(tmp_path / "other")
  shapes_files.write_shapes(_cfg(), again, log=None)
  shapes_files.write_shapes(_cfg(seed=1), other, log=None)
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
    src = coco.CocoCaptionsJson(shapes_files.captions_json(world, split), shapes_files.image_dir(world))
    assert len(src.images) == n and len(src) == 5 * n
    item = src[7]
    assert item["caption_id"] // 10 == item["image_id"]
    assert coco.load_image(item["image"]).size == (64, 64)
  train_ids = {
    im.image_id
    for im in coco.CocoCaptionsJson(
      shapes_files.captions_json(world, "train"), shapes_files.image_dir(world)
    ).images
  }
  test_ids = {
    im.image_id
    for im in coco.CocoCaptionsJson(
      shapes_files.captions_json(world, "test"), shapes_files.image_dir(world)
    ).images
  }
  assert not train_ids & test_ids


def test_complete_data_is_kept_and_other_settings_refused(world):
  meta = shapes_files.write_shapes(_cfg(), world, log=None)
  assert meta["counts"]["train"] == {"images": 24, "captions": 120}
  with pytest.raises(SaeJaxError, match="other settings"):
    shapes_files.write_shapes(_cfg(train=30), world, log=None)
  bad = ml_collections.ConfigDict(_cfg().to_dict())
  bad.max_objects = 4
  with pytest.raises(SaeJaxError, match="config.shapes.max_objects"):
    shapes_files.write_shapes(bad, world + "-bad", log=None)


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


def test_image_to_image_task_positive_is_the_same_scene_drawn_again(world):
  _, scenes = _load(world, "test")
  task = shapes_tasks.image_to_image_task(scenes, seed=0)
  assert task["positives"] == [[i] for i in range(len(scenes))]
  for q, c in zip(task["queries"], task["candidates"]):
    assert shapes_tasks.same_content(q, c)  # same objects, sizes, cells and background
    assert c["texture"] != q["texture"] and c["texture_seed"] != q["texture_seed"]
    for a, b in zip(q["objects"], c["objects"]):
      assert a["jitter"] != b["jitter"] and 0.88 <= b["scale"] <= 1.12
    assert not np.array_equal(shapes.render_scene(q), shapes.render_scene(c))
  # Every other candidate shows different content (the positive is unique).
  for i, q in enumerate(task["queries"]):
    assert [j for j, c in enumerate(task["candidates"]) if shapes_tasks.same_content(q, c)] == [i]


def test_composed_task_target_and_distractors_against_the_scene_records(world):
  _, scenes = _load(world, "train")
  task = shapes_tasks.composed_task(scenes, seed=0)
  qs, cands, roles, sources = task["queries"], task["candidates"], task["roles"], task["sources"]
  assert len(qs) >= 0.8 * len(scenes) and len(cands) == 3 * len(qs)
  assert {q["kind"] for q in qs} == set(shapes_tasks.MODIFICATIONS)
  for n, q in enumerate(qs):
    (t,) = task["positives"][n]
    assert roles[t : t + 3] == ["target", "reference_only", "text_only"]
    ref, text = q["scene"], q["text"]
    target, ref_only, text_only = cands[t : t + 3]
    assert shapes_tasks.text_holds(text, ref, target)  # the positive: the reference, modified as said
    assert shapes_tasks.same_content(ref_only, ref) and not shapes_tasks.text_holds(text, ref, ref_only)
    src = sources[t + 2]
    assert not shapes_tasks.same_content(src, ref) and shapes_tasks.text_holds(text, src, text_only)
    assert not shapes_tasks.text_holds(text, ref, text_only)  # matches the text, not this reference
    for c in cands:  # no other candidate of the pool is this query's answer
      if c is not target:
        assert not shapes_tasks.text_holds(text, ref, c) or shapes_tasks.same_content(c, target)
  # The independent reading of the texts rejects wrong answers.
  ref = qs[0]["scene"]
  assert not shapes_tasks.text_holds("remove the red star", ref, ref)
  with pytest.raises(SaeJaxError, match="modification kind"):
    shapes_tasks.modify(ref, "rotate", np.random.default_rng(0))


def test_tasks_are_written_in_the_mbeir_layout_the_extraction_reads(world):
  from sae_jax import retrieval_tasks
  from sae_jax.data import mbeir

  meta = shapes_files.write_tasks(_cfg(), world, log=None)
  assert shapes_files.write_tasks(_cfg(), world, log=None) == meta  # complete: kept
  root = os.path.join(world, "tasks")
  for task, name in shapes_files.TASK_FILES.items():
    qs = mbeir.MBeirQueries(os.path.join(root, f"{name}_queries.jsonl"), world)
    pool = mbeir.MBeirPool(os.path.join(root, f"{name}_pool.jsonl"), world)
    with open(os.path.join(root, f"{name}_scenes.json")) as f:
      built = json.load(f)
    assert len(qs) == meta["counts"][task]["queries"] and len(pool) == len(built["candidates"])
    _, test_scenes = _load(world, "test")
    by_id = {s["image_id"]: s for s in test_scenes}
    for i, q in enumerate(qs.records):
      scene = built["queries"][i] if task == "image_to_image" else built["queries"][i]["scene"]
      # The query image is the test image of its scene; the positive is the built one.
      assert os.path.basename(q["image"].path) == f"test_{scene['image_id']:08d}.png"
      assert by_id[scene["image_id"]]["objects"] == scene["objects"]
      assert q["positives"] == [f"{name}:c{j}" for j in built["positives"][i]]
      if task == "image_text_to_image":
        assert q["text"] == built["queries"][i]["text"] and q["modality"] == "image,text"
    for j in (0, len(pool) - 1):
      img = np.asarray(Image.open(pool.records[j]["image"].path))
      np.testing.assert_array_equal(img, shapes.render_scene(built["candidates"][j], 64))
    fake = lambda recs: {
      "embeddings": np.zeros((len(recs), 2), np.float32),
      "ids": np.array([r["id"] for r in recs]),
      "modality": np.array([r["modality"] for r in recs]),
      "image_paths": np.array([r["image"].path for r in recs]),
    }
    qrels = {r["id"]: r["positives"] for r in qs.records}
    arrays = retrieval_tasks.mbeir_task_arrays(fake(qs.records), fake(pool.records), qrels)
    assert retrieval_tasks.build_task(task, arrays) is not None  # the modalities name the task
