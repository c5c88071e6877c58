"""extract.dataset="tfds": tfds.data_source under tfds.testing.mock_data (rows, captions per image,
the multi-process split, resume) and a tfds directory written from the shapes world, read back image
for image against the COCO JSON source. The `tfds` extra is part of `test`: imported plainly, so a broken
install fails."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow_datasets as tfds

import sae_jax.data  # noqa: E402
from configs import clip_coco, study_common  # noqa: E402
from sae_jax import encoders  # noqa: E402
from sae_jax.data import coco, paired, tfds_source  # noqa: E402
from sae_jax.errors import SaeJaxError  # noqa: E402
from sae_jax.stages import extract as extract_stage  # noqa: E402
from sae_jax.study import shapes_files  # noqa: E402
from tests.helpers.faults import Crash, CrashingEncoder  # noqa: E402

MOCK_EXAMPLES = 8


def _mock():
  return tfds.testing.mock_data(num_examples=MOCK_EXAMPLES)


def _tfds_config(**extract):
  cfg = clip_coco.get_config("tiny")
  ex = cfg.extract
  ex.dataset, ex.tfds_name, ex.tfds_split, ex.tfds_data_dir = "tfds", "coco_captions", "test", ""
  ex.captions_per_image, ex.chunk_size, ex.batch_size, ex.rows_per_shard = 2, 2, 2, 8
  ex.eval_dataset = ""
  for k, v in extract.items():
    setattr(ex, k, v)
  return cfg


@pytest.fixture(scope="module")
def clip_encoder():
  return encoders.load_encoder(_tfds_config().extract)


def _pooled(workdir, variant="embed"):
  with np.load(os.path.join(workdir, "activations", f"pooled_{variant}.npz")) as z:
    return {k: z[k] for k in z.files}


def _assert_same_pooled(a, b):
  assert set(a) == set(b)
  for k in a:
    if a[k].dtype.kind == "f":
      np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mock_coco_captions_rows_and_captions_per_image():
  with _mock():
    raw = tfds.data_source("coco_captions", split="test")  # what tfds itself returns, record by record
    records = [raw[i] for i in range(MOCK_EXAMPLES)]
    src = tfds_source.TfdsCaptions("coco_captions", "test")
    cut = tfds_source.TfdsCaptions("coco_captions", "test", max_images=3, captions_per_image=5)
    pixels = np.asarray(coco.load_image(src.images[4]))
  assert [im.image_id for im in src.images] == [int(r["image/id"]) for r in records]
  per_image = {im.image_id: [c.text for c in src.captions if c.image_id == im.image_id] for im in src.images}
  for r in records:
    assert per_image[int(r["image/id"])] == [str(t) for t in r["captions"]["text"]]
  assert len(src) == sum(len(r["captions"]["text"]) for r in records)  # one pair per caption
  assert len({c.caption_id for c in src.captions}) == len(src)  # unique (positional: mock ids repeat)
  np.testing.assert_array_equal(pixels, records[4]["image"])
  assert len(cut.images) == 3 and len(cut.captions) == 15
  assert [c.text for c in cut.captions[:5]] == per_image[cut.images[0].image_id][:5]


def test_missing_dataset_and_missing_extra_are_one_line(tmp_path, monkeypatch):
  cfg = _tfds_config(tfds_name="shapes_captions", tfds_data_dir=str(tmp_path))
  with pytest.raises(
    SaeJaxError, match="config.extract.tfds_name='shapes_captions'.*tfds.data_source failed"
  ) as e:
    paired.open_source(cfg.extract)
  assert "\n" not in str(e.value)
  # As without the extra: the module is not importable.
  monkeypatch.delattr(sae_jax.data, "tfds_source")
  monkeypatch.setitem(sys.modules, "sae_jax.data.tfds_source", None)
  with pytest.raises(SaeJaxError, match=r'needs tensorflow-datasets .*pip install "sae-jax\[tfds\]"'):
    paired.open_source(cfg.extract)


def test_mock_extraction_two_processes_merge_to_one_and_a_crash_resumes(clip_encoder, tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  with _mock():
    cfg = _tfds_config(max_images=6, rows_per_shard=2)
    ref = extract_stage.Extractor(cfg, str(one), encoder=clip_encoder).run()
    assert ref["counts"]["images"] == 6 and ref["counts"]["captions"] == 12
    with pytest.raises(Crash):  # process 1 dies after 2 forward passes (one chunk of its images saved)
      extract_stage.run_part(cfg, str(two), 1, 2, encoder=CrashingEncoder(clip_encoder, 2))
    extract_stage.run_part(cfg, str(two), 0, 2, encoder=clip_encoder)
    merged = extract_stage.run_part(cfg, str(two), 1, 2, encoder=clip_encoder)
  assert merged["merged"] and merged["counts"] == ref["counts"]
  assert 0 < merged["part"]["rows_written_this_run"] < merged["part"]["counts"]["shard_rows"]
  a = _pooled(one)
  _assert_same_pooled(a, _pooled(two))
  assert a["image"].shape == (12, clip_encoder.d_embed) and len(set(a["image_ids"].tolist())) == 6


@pytest.fixture(scope="module")
def shapes_tfds(tmp_path_factory):
  """The shapes world (6 train images) and the same split stored as a tfds dataset."""
  out = str(tmp_path_factory.mktemp("shapes"))
  cfg = study_common.get_config().shapes
  cfg.train_images, cfg.test_images = 6, 2
  shapes_files.write_shapes(cfg, out, log=None)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds_source.write_coco_as_tfds(
    shapes_files.captions_json(out, "train"),
    shapes_files.image_dir(out),
    data_dir,
    "shapes_captions",
    "train",
  )
  return out, data_dir


def test_shapes_world_as_tfds_reads_back_image_for_image(shapes_tfds, clip_encoder, tmp_path):
  out, data_dir = shapes_tfds
  cfg = _tfds_config(
    tfds_name="shapes_captions", tfds_split="train", tfds_data_dir=data_dir, captions_per_image=0
  )
  via_tfds = paired.open_source(cfg.extract)
  via_json = coco.CocoCaptionsJson(shapes_files.captions_json(out, "train"), shapes_files.image_dir(out))
  assert [im.image_id for im in via_tfds.images] == [im.image_id for im in via_json.images]
  assert via_tfds.captions == via_json.captions  # ids (the stored COCO annotation ids), images, texts
  for a, b in zip(via_tfds.images, via_json.images):
    np.testing.assert_array_equal(np.asarray(coco.load_image(a)), np.asarray(coco.load_image(b)))
  # The same extraction from either source.
  cfg.extract.max_images, cfg.extract.captions_per_image = 3, 2
  extract_stage.Extractor(cfg, str(tmp_path / "tfds"), encoder=clip_encoder).run()
  json_cfg = _tfds_config(dataset="coco", max_images=3)
  json_cfg.extract.captions_json, json_cfg.extract.image_dir = (
    shapes_files.captions_json(out, "train"),
    shapes_files.image_dir(out),
  )
  extract_stage.Extractor(json_cfg, str(tmp_path / "json"), encoder=clip_encoder).run()
  _assert_same_pooled(_pooled(tmp_path / "tfds"), _pooled(tmp_path / "json"))


def test_tfds_evaluation_split(shapes_tfds, clip_encoder, tmp_path):
  out, data_dir = shapes_tfds
  tfds_source.write_coco_as_tfds(
    shapes_files.captions_json(out, "test"), shapes_files.image_dir(out), data_dir, "shapes_test", "test"
  )
  cfg = _tfds_config(tfds_name="shapes_test", tfds_data_dir=data_dir, eval_dataset="tfds")
  cfg.extract.eval_tfds_split, cfg.extract.eval_captions_per_image = "test", 5
  summary = extract_stage.Extractor(cfg, str(tmp_path), encoder=clip_encoder, split="eval").run()
  assert (
    summary["split"] == "eval" and summary["counts"]["images"] == 2 and summary["counts"]["captions"] == 10
  )
  ev = np.load(tmp_path / "activations" / "eval" / "pooled_embed.npz")
  via_json = coco.CocoCaptionsJson(shapes_files.captions_json(out, "test"), shapes_files.image_dir(out))
  assert ev["caption_ids"].tolist() == [c.caption_id for c in via_json.captions]
