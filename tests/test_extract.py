"""Extraction end to end on the generated COCO-layout fixture with tiny random-weight models; data sources; bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_jax.data import coco, mbeir, online
from sae_jax.data import shards as shards_lib
from sae_jax.encoders import base, pooling
from sae_jax.errors import SaeJaxError
from sae_jax.stages import extract as extract_stage
from sae_jax.stages import extract_mbeir
from sae_jax.training import trainer
from tests.helpers.env import COCO_MINI
from tests.helpers.faults import Crash, CrashingEncoder


def _config(model, **extract_overrides):
  from configs import clip_coco, qwen2vl_coco

  cfg = {"clip": clip_coco, "qwen2_vl": qwen2vl_coco}[model].get_config("tiny")
  for k, v in extract_overrides.items():
    setattr(cfg.extract, k, v)
  return cfg


@functools.lru_cache(maxsize=None)
def _encoder(model):
  from sae_jax import encoders

  return encoders.load_encoder(_config(model).extract)


def _run(model, workdir, encoder=None, source=None, **overrides):
  cfg = _config(model, **overrides)
  return extract_stage.Extractor(cfg, str(workdir), encoder=encoder or _encoder(model), source=source).run()


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("clip")
  return wd, _run("clip", wd)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("qwen")
  return wd, _run("qwen2_vl", wd)


def _source():
  return coco.CocoCaptionsJson(str(COCO_MINI / "captions.json"), str(COCO_MINI / "images"))


def _shards(wd):
  d = os.path.join(wd, "activations", "shards")
  index = shards_lib.read_index(d)
  load = lambda suffix: np.concatenate(
    [np.load(os.path.join(d, s["name"] + suffix)) for s in index["shards"]]
  )
  return index, load(".npy"), load(".token_types.npy"), load(".sample_ids.npy")


def test_clip_end_to_end_pooled_and_shards(clip_run):
  wd, summary = clip_run
  src = _source()
  assert summary["counts"] == {
    "images": 11,
    "captions": 55,
    "pairs": 55,
    "skipped_missing": 0,
    "skipped_corrupt": 0,
    "shard_rows": 66,
    "shards": 1,
  }
  z = np.load(os.path.join(wd, "activations", "pooled_embed.npz"))
  enc = _encoder("clip")
  assert z["image"].shape == z["text"].shape == (55, enc.d) and z["image_unique"].shape == (11, enc.d)
  assert sorted(z["caption_ids"].tolist()) == sorted(c.caption_id for c in src.captions)
  assert sorted(z["image_unique_ids"].tolist()) == sorted(im.image_id for im in src.images)
  np.testing.assert_array_equal(z["sample_ids"], z["caption_ids"])
  cap = {c.caption_id: c for c in src.captions}
  for r in (0, 17, 54):  # rows are real pairs: the caption's own image, and independent recomputation
    c = cap[int(z["caption_ids"][r])]
    assert int(z["image_ids"][r]) == c.image_id and str(z["captions"][r]) == c.text
    np.testing.assert_allclose(z["text"][r], enc.encode(texts=[c.text]).embeds[0].numpy(), atol=1e-5)
    img = coco.load_image(src.image_by_id[c.image_id])
    np.testing.assert_allclose(z["image"][r], enc.encode(images=[img]).embeds[0].numpy(), atol=1e-5)
  index, rows, types, ids = _shards(wd)
  assert index["d"] == enc.d and index["total_rows"] == 66
  assert (types == pooling.TOKEN_IMAGE).sum() == 11 and (types == pooling.TOKEN_TEXT).sum() == 55
  # shard rows are the same embeddings as the pooled ones (CLIP SAEs train on final embeddings)
  j = int(np.nonzero(ids == extract_stage.CAPTION_ID_OFFSET + int(z["caption_ids"][3]))[0][0])
  np.testing.assert_allclose(rows[j], z["text"][3], atol=1e-6)


def test_pairing_first_keeps_each_images_first_caption(clip_run, tmp_path):
  wd, _ = clip_run
  summary = _run("clip", tmp_path, pairing="first", write_shards=False)
  assert summary["counts"]["pairs"] == 11 and summary["counts"]["captions"] == 55
  z = np.load(tmp_path / "activations" / "pooled_embed.npz")
  zall = np.load(wd / "activations" / "pooled_embed.npz")
  src = _source()
  first = {}
  for c in src.captions:
    first.setdefault(c.image_id, c.caption_id)
  assert sorted(z["caption_ids"].tolist()) == sorted(first.values())
  assert len(set(z["image_ids"].tolist())) == 11
  for r in range(11):
    j = int(np.nonzero(zall["caption_ids"] == z["caption_ids"][r])[0][0])
    np.testing.assert_allclose(z["text"][r], zall["text"][j], atol=1e-6)
    np.testing.assert_allclose(z["image"][r], zall["image"][j], atol=1e-6)
  assert not (tmp_path / "activations" / "shards").exists()


def test_qwen2vl_end_to_end_pooled_variants_and_token_shards(qwen_run):
  wd, summary = qwen_run
  src = _source()
  enc = _encoder("qwen2_vl")
  assert summary["counts"]["images"] == 11 and summary["counts"]["pairs"] == 55
  index, rows, types, ids = _shards(wd)
  assert index["total_rows"] == summary["counts"]["shard_rows"] == rows.shape[0] > 55 + 11
  assert set(np.unique(types).tolist()) == {0, 1, 2, 3}
  img0 = src.images[0]
  out = enc.encode(images=[coco.load_image(img0)])
  n_img_tokens = int((out.token_types == pooling.TOKEN_IMAGE).sum())
  mine = ids == img0.image_id
  assert int((types[mine] == pooling.TOKEN_IMAGE).sum()) == n_img_tokens > 0
  np.testing.assert_allclose(rows[mine], base.to_numpy(out.hidden[0]), atol=1e-4)
  c = src.captions[7]
  out_t = enc.encode(texts=[c.text])
  mine = ids == extract_stage.CAPTION_ID_OFFSET + c.caption_id
  np.testing.assert_array_equal(types[mine], out_t.token_types[0].numpy())
  np.testing.assert_allclose(rows[mine], base.to_numpy(out_t.hidden[0]), atol=1e-4)
  for v in ("mean", "last_token", "mean_no_image", "mean_no_prompt"):
    z = np.load(os.path.join(wd, "activations", f"pooled_{v}.npz"))
    assert z["image"].shape == z["text"].shape == (55, 32) and z["image_unique"].shape == (11, 32)
    r = int(np.nonzero(z["caption_ids"] == c.caption_id)[0][0])
    ref = pooling.pool(
      v, base.to_numpy(out_t.hidden), out_t.attention_mask.numpy(), out_t.token_types.numpy()
    )
    np.testing.assert_allclose(z["text"][r], ref[0], atol=1e-4)
    ri = int(np.nonzero(z["image_unique_ids"] == img0.image_id)[0][0])
    ref = pooling.pool(v, base.to_numpy(out.hidden), out.attention_mask.numpy(), out.token_types.numpy())
    np.testing.assert_allclose(z["image_unique"][ri], ref[0], atol=1e-4)
  # the masks change the embeddings (they remove real positions)
  zm = np.load(os.path.join(wd, "activations", "pooled_mean.npz"))
  zi = np.load(os.path.join(wd, "activations", "pooled_mean_no_image.npz"))
  assert np.abs(zm["image"] - zi["image"]).max() > 1e-3
  np.testing.assert_allclose(zm["text"], zi["text"], atol=1e-6)  # captions have no image tokens


def test_pooled_shard_rows_are_the_pooled_vectors_of_each_image_and_caption(qwen_run, tmp_path):
  """shard_rows="pooled": one row per image and per caption, equal to the pooled file's vectors of
  pooling[0]; a crash mid-run resumes to the same rows."""
  ref_wd, _ = qwen_run
  enc = _encoder("qwen2_vl")
  kw = dict(shard_rows="pooled", pooling=("mean_no_prompt", "mean"))
  with pytest.raises(Crash):
    _run("qwen2_vl", tmp_path, encoder=CrashingEncoder(enc, 9), **kw)
  summary = _run("qwen2_vl", tmp_path, **kw)
  assert summary["counts"]["shard_rows"] == 11 + 55
  _, rows, types, ids = _shards(tmp_path)
  z = np.load(ref_wd / "activations" / "pooled_mean_no_prompt.npz")
  img = ids < extract_stage.CAPTION_ID_OFFSET
  assert set(types[img].tolist()) == {pooling.TOKEN_IMAGE} and set(types[~img].tolist()) == {2}
  order = {int(i): r for r, i in enumerate(z["image_unique_ids"])}
  np.testing.assert_allclose(rows[img], z["image_unique"][[order[int(i)] for i in ids[img]]], atol=1e-5)
  order = {int(i): r for r, i in enumerate(z["caption_ids"])}
  cap = ids[~img] - extract_stage.CAPTION_ID_OFFSET
  np.testing.assert_allclose(rows[~img], z["text"][[order[int(i)] for i in cap]], atol=1e-5)
  with pytest.raises(SaeJaxError, match="config.extract.shard_rows='rows'"):
    _run("qwen2_vl", tmp_path / "bad", shard_rows="rows")


def test_online_pooled_rows_are_the_pooled_vectors_of_each_image_and_caption(qwen_run):
  """data.source="online" with shard_rows="pooled" streams the rows the offline shards hold: one
  pooled vector (pooling[0]) per image and caption, each sample once per pass over a window."""
  ref_wd, _ = qwen_run
  cfg = _config("qwen2_vl", shard_rows="pooled", pooling=("mean_no_prompt", "mean"))
  cfg.data.source = "online"
  cfg.extract.online_buffer_batches = 2
  fn = online.online_batch_fn(cfg, encoder=_encoder("qwen2_vl"))
  rows = np.concatenate([fn(0), fn(1)])
  z = np.load(ref_wd / "activations" / "pooled_mean_no_prompt.npz")
  ref = np.concatenate([z["image_unique"], z["text"]])
  assert ref.shape[0] == 11 + 55
  dist = ((rows[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
  assert dist.min(1).max() < 1e-8  # every row is a pooled vector, none a token row
  assert len(set(dist.argmin(1).tolist())) == 66  # the 66 samples, each at least once
  cfg.extract.shard_rows = "rows"
  with pytest.raises(SaeJaxError, match="config.extract.shard_rows='rows'"):
    online.online_batch_fn(cfg, encoder=_encoder("qwen2_vl"))


def test_rerun_of_complete_extraction_is_a_noop(clip_run):
  wd, summary = clip_run
  shard = os.path.join(wd, "activations", "shards", "shard-00000.npy")
  before = os.stat(shard).st_mtime_ns
  again = _run("clip", wd)
  assert again["counts"] == summary["counts"] and os.stat(shard).st_mtime_ns == before


def test_resume_after_crash_gives_the_same_shards(qwen_run, tmp_path):
  ref_wd, ref_summary = qwen_run
  enc = _encoder("qwen2_vl")
  with pytest.raises(Crash):
    _run("qwen2_vl", tmp_path, encoder=CrashingEncoder(enc, 9))
  act = tmp_path / "activations"
  assert not list(act.glob("pooled_*.npz"))  # nothing half-written
  partial = shards_lib.read_index(str(act / "shards"), allow_empty=True)
  assert 0 < partial["total_rows"] < ref_summary["counts"]["shard_rows"]
  summary = _run("qwen2_vl", tmp_path)
  assert summary["counts"] == ref_summary["counts"]
  assert summary["rows_written_this_run"] == ref_summary["counts"]["shard_rows"] - partial["total_rows"]
  _, rows, types, ids = _shards(tmp_path)
  _, rrows, rtypes, rids = _shards(ref_wd)
  np.testing.assert_array_equal(ids, rids)
  np.testing.assert_array_equal(types, rtypes)
  np.testing.assert_allclose(rows, rrows, atol=1e-5)
  for v in ("mean", "last_token"):
    a, b = np.load(act / f"pooled_{v}.npz"), np.load(ref_wd / "activations" / f"pooled_{v}.npz")
    np.testing.assert_allclose(a["text"], b["text"], atol=1e-5)
    np.testing.assert_array_equal(a["caption_ids"], b["caption_ids"])


def test_train_from_shards_then_resume(qwen_run, tmp_path):
  wd, _ = qwen_run
  cfg = _config("qwen2_vl")
  cfg.data.source = "shards"
  cfg.data.shard_dir = str(wd / "activations" / "shards")
  cfg.train.num_steps = 4
  cfg.train.checkpoint_every = 2
  cfg.train.log_every = 2
  cfg.train.tensorboard = False
  cfg.train.async_checkpoint = False
  trainer.train_and_evaluate(cfg, str(tmp_path))
  cfg.train.num_steps = 6
  trainer.train_and_evaluate(cfg, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(ln)["step"] for ln in f if ln.strip()]
  assert steps[-1] == 6 and 2 in steps
  cfg.sae.d = 48
  with pytest.raises(SaeJaxError, match="config.sae.d=48 .* width 32"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "other"))


def _copy_fixture(tmp_path):
  dst = tmp_path / "coco"
  shutil.copytree(COCO_MINI, dst)
  for p in dst.rglob("*"):
    p.chmod(0o755 if p.is_dir() else 0o644)
  dst.chmod(0o755)
  return dst


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path):
  root = _copy_fixture(tmp_path)
  (root / "images" / "000000000139.jpg").unlink()
  with open(root / "images" / "000000000285.jpg", "r+b") as f:
    f.read()
    f.seek(0)
    f.truncate()
    f.write(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
  src = coco.CocoCaptionsJson(str(root / "captions.json"), str(root / "images"))
  assert src.skipped["missing"] == 1 and len(src.images) == 10 and len(src) == 50
  with pytest.raises(coco.ImageLoadError, match="image 285: .*000000000285.jpg is corrupt") as e:
    coco.load_image(src.image_by_id[285])
  assert "\n" not in str(e.value)
  summary = _run("clip", tmp_path / "wd", source=src)
  assert summary["counts"]["skipped_missing"] == 1 and summary["counts"]["skipped_corrupt"] == 1
  assert summary["counts"]["images"] == 9 and summary["counts"]["pairs"] == 45
  z = np.load(tmp_path / "wd" / "activations" / "pooled_embed.npz")
  assert z["text"].shape[0] == 45 and not {139, 285} & set(z["image_ids"].tolist())


@pytest.mark.parametrize(
  "defect,pattern",
  [
    ("no_captions", r"image 139 \(000000000139.jpg\) has no captions"),
    ("empty_caption", r"caption \d+ of image \d+ is empty"),
    ("unknown_image", r"caption \d+ refers to image id 999999"),
  ],
)
def test_bad_caption_files_are_one_clear_line(tmp_path, defect, pattern):
  root = _copy_fixture(tmp_path)
  with open(root / "captions.json") as f:
    d = json.load(f)
  if defect == "no_captions":
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 139]
  elif defect == "empty_caption":
    d["annotations"][3]["caption"] = "   "
  else:
    d["annotations"][0]["image_id"] = 999999
  _write_json(root / "captions.json", d)
  with pytest.raises(SaeJaxError, match=pattern) as e:
    coco.CocoCaptionsJson(str(root / "captions.json"), str(root / "images"))
  assert "\n" not in str(e.value) and "captions.json" in str(e.value)


def test_layer_out_of_range_fails_before_writing(tmp_path):
  cfg = _config("qwen2_vl", layer=7)
  with pytest.raises(SaeJaxError, match=r"config.extract.layer=7 is out of range .*2 layers"):
    extract_stage.run_extraction(cfg, str(tmp_path))
  assert not (tmp_path / "activations").exists()


def test_different_width_into_same_workdir_is_refused(clip_run, tmp_path):
  wd, _ = clip_run
  work = tmp_path / "w"
  shutil.copytree(wd, work)
  with pytest.raises(SaeJaxError, match=r"different config.extract \(fields .*'d'.*model_name"):
    _run("qwen2_vl", work)
  with pytest.raises(SaeJaxError, match=r"existing shards have d=16 .* this writer has d=32"):
    shards_lib.ShardWriter(str(work / "activations" / "shards"), d=32)


def test_karpathy_json_source_matches_official_json(tmp_path):
  src = _source()
  images = []
  for im in src.images:
    caps = [c for c in src.captions if c.image_id == im.image_id]
    images.append(
      {
        "filepath": "",
        "filename": os.path.basename(im.path),
        "cocoid": im.image_id,
        "split": "test",
        "sentences": [{"raw": c.text, "sentid": c.caption_id} for c in caps],
      }
    )
  images.append(
    {
      "filepath": "",
      "filename": "x.jpg",
      "cocoid": 5,
      "split": "train",
      "sentences": [{"raw": "other split", "sentid": 1}],
    }
  )
  _write_json(tmp_path / "k.json", {"images": images, "dataset": "coco"})
  k = coco.KarpathyJson(str(tmp_path / "k.json"), str(COCO_MINI / "images"), split="test")
  assert [(c.caption_id, c.image_id, c.text) for c in k.captions] == [
    (c.caption_id, c.image_id, c.text) for c in src.captions
  ]
  assert [im.path for im in k.images] == [im.path for im in src.images]
  assert k[3]["caption"] == src[3]["caption"]


def test_parquet_source_lmms_lab_layout(tmp_path):
  src = _source()
  rows = {"question_id": [], "image": [], "question": [], "answer": [], "id": [], "file_name": []}
  for im in src.images:
    rows["question_id"].append(os.path.basename(im.path))
    rows["image"].append({"bytes": open(im.path, "rb").read(), "path": os.path.basename(im.path)})
    rows["question"].append("Please carefully observe the image and come up with a caption for the image")
    rows["answer"].append([c.text for c in src.captions if c.image_id == im.image_id])
    rows["id"].append(im.image_id)
    rows["file_name"].append(os.path.basename(im.path))
  pq.write_table(pa.table(rows), tmp_path / "val-00000-of-00001.parquet", row_group_size=4)
  p = coco.CocoParquet(str(tmp_path / "*.parquet"))
  assert [im.image_id for im in p.images] == [im.image_id for im in src.images]
  assert [c.text for c in p.captions] == [c.text for c in src.captions]
  np.testing.assert_array_equal(
    np.asarray(coco.load_image(p.images[5])), np.asarray(coco.load_image(src.images[5]))
  )


def test_mbeir_queries_pool_qrels_and_extraction(tmp_path):
  src = _source()
  root = tmp_path / "mbeir"
  (root / "img").mkdir(parents=True)
  for im in src.images[:4]:
    shutil.copy(im.path, root / "img" / os.path.basename(im.path))
  caps = {im.image_id: [c for c in src.captions if c.image_id == im.image_id] for im in src.images[:4]}
  queries, pool = [], []
  for j, im in enumerate(src.images[:4]):
    name = "img/" + os.path.basename(im.path)
    queries.append(
      {
        "qid": f"3:{j}",
        "query_txt": None,
        "query_img_path": name,
        "query_modality": "image",
        "pos_cand_list": [f"9:{j}"],
        "task_id": 3,
      }
    )
    pool.append({"did": f"9:{j}", "txt": caps[im.image_id][0].text, "img_path": None, "modality": "text"})
  queries.append(
    {
      "qid": "7:0",
      "query_txt": "make it night",
      "query_img_path": "img/" + os.path.basename(src.images[0].path),
      "query_modality": "image,text",
      "pos_cand_list": ["9:5"],
      "task_id": 7,
    }
  )
  queries.append(
    {
      "qid": "7:1",
      "query_txt": "gone",
      "query_img_path": "img/missing.jpg",
      "query_modality": "image,text",
      "pos_cand_list": ["9:5"],
      "task_id": 7,
    }
  )
  pool.append(
    {
      "did": "9:5",
      "txt": None,
      "img_path": "img/" + os.path.basename(src.images[1].path),
      "modality": "image",
    }
  )
  for name, recs in (("q.jsonl", queries), ("pool.jsonl", pool)):
    with open(root / name, "w") as f:
      f.write("\n".join(json.dumps(r) for r in recs) + "\n")
  with open(root / "qrels.txt", "w") as f:
    f.write("3:0 0 9:0 1 3\n3:1 0 9:1 1 3\n3:1 0 9:4 0 3\n")
  assert mbeir.read_qrels(str(root / "qrels.txt")) == {"3:0": ["9:0"], "3:1": ["9:1"]}
  q = mbeir.MBeirQueries(str(root / "q.jsonl"), str(root))
  assert len(q) == 6 and q[4]["modality"] == "image,text" and q[4]["text"] == "make it night"
  cfg = _config(
    "qwen2_vl",
    dataset="mbeir",
    mbeir_queries=str(root / "q.jsonl"),
    mbeir_pool=str(root / "pool.jsonl"),
    mbeir_image_root=str(root),
    pooling=("mean", "last_token"),
  )
  enc = _encoder("qwen2_vl")
  summary = extract_mbeir.run_mbeir_extraction(cfg, str(tmp_path / "wd"), encoder=enc)
  assert summary["counts"] == {"queries": 5, "pool": 5} and summary["skipped"] == {"queries": 1, "pool": 0}
  z = np.load(tmp_path / "wd" / "activations" / "mbeir_queries_pooled_mean.npz")
  assert z["ids"].tolist() == ["3:0", "3:1", "3:2", "3:3", "7:0"]
  assert z["modality"].tolist() == ["image"] * 4 + ["image,text"]
  out = enc.encode(images=[coco.load_image(src.images[0])], texts=["make it night"])
  ref = pooling.mean_pool(base.to_numpy(out.hidden), out.attention_mask.numpy())
  np.testing.assert_allclose(z["embeddings"][4], ref[0], atol=1e-4)
  with open(tmp_path / "wd" / "activations" / "mbeir_qrels.json") as f:
    assert json.load(f)["7:0"] == ["9:5"]
  bad = root / "bad.jsonl"
  bad.write_text('{"qid": "1", "query_modality": "image,text", "query_txt": "", "query_img_path": "a.jpg"}\n')
  with pytest.raises(SaeJaxError, match=r"record 1: modality 'image,text' but \"query_txt\" is empty"):
    mbeir.MBeirQueries(str(bad), str(root))


def test_online_batches_are_real_activations_deterministic_and_resumable(qwen_run):
  from sae_jax.data import pipeline

  wd, _ = qwen_run
  cfg = _config("qwen2_vl")
  cfg.data.source = "online"
  cfg.extract.online_buffer_batches = 3
  fn = online.online_batch_fn(cfg, encoder=_encoder("qwen2_vl"))
  b4 = fn(4)
  assert b4.shape == (64, 32) and b4.dtype == np.float32
  _, rows, _, _ = _shards(wd)
  # every online row is one of the extracted token activations (same model, same inputs)
  dist = ((b4[:, None, :] - rows[None, :, :]) ** 2).sum(-1).min(1)
  assert dist.max() < 1e-6
  assert len({r.tobytes() for r in b4}) > 32  # shuffled rows, not one repeated
  fresh = online.online_batch_fn(cfg, encoder=_encoder("qwen2_vl"))
  np.testing.assert_array_equal(fresh(4), b4)
  # through the grain pipeline: iterator state round-trips
  it = iter(pipeline.make_dataset(cfg, fn))
  first = [next(it) for _ in range(4)]
  state = it.get_state()
  nxt = next(it)
  it2 = iter(pipeline.make_dataset(cfg, fresh))
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2), nxt)
  np.testing.assert_array_equal(first[3], fn(3))
