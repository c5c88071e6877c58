"""Activation shards, the global shuffle, and grain iterator resumption."""

import os

import numpy as np
import pytest

from configs import base
from sae_jax.data import pipeline
from sae_jax.data.shards import ActivationStore, ShardWriter, read_index
from sae_jax.data.synthetic import KINDS, PlantedSource, default_synthetic_config, open_planted
from sae_jax.errors import SaeJaxError


def _write(directory, n=1000, d=16, rows_per_shard=300, seed=0):
  rng = np.random.default_rng(seed)
  rows = rng.standard_normal((n, d)).astype(np.float32)
  rows[:, 0] = np.arange(n)  # row id in column 0, to check the shuffle
  w = ShardWriter(str(directory), d=d, rows_per_shard=rows_per_shard, metadata={"model": "test"})
  for start in range(0, n, 128):
    w.add(
      rows[start : start + 128],
      token_types=np.full(len(rows[start : start + 128]), 2),
      sample_ids=np.arange(start, min(start + 128, n)),
    )
  index = w.close()
  return rows, index


def test_shard_round_trip_and_format(tmp_path):
  rows, index = _write(tmp_path)
  assert index["total_rows"] == 1000 and [s["rows"] for s in index["shards"]] == [300, 300, 300, 100]
  assert index["metadata"] == {"model": "test"} and index["format"] == "sae_jax.activations.v1"
  assert not [f for f in os.listdir(tmp_path) if "tmp" in f]
  store = ActivationStore(str(tmp_path))
  pick = np.array([999, 0, 301, 299, 600, 5])
  np.testing.assert_array_equal(store.rows(pick), rows[pick])
  np.testing.assert_array_equal(np.load(tmp_path / "shard-00001.sample_ids.npy"), np.arange(300, 600))


def test_writer_resumes_after_finished_shards(tmp_path):
  w = ShardWriter(str(tmp_path), d=4, rows_per_shard=10)
  w.add(np.ones((25, 4), np.float32))  # two finished shards, 5 rows buffered, then "killed"
  assert read_index(str(tmp_path))["total_rows"] == 20
  w2 = ShardWriter(str(tmp_path), d=4, rows_per_shard=10)
  assert w2.finished_shards == 2
  with pytest.raises(SaeJaxError, match=r"existing shards have d=4 dtype=float32, this writer has d=8"):
    ShardWriter(str(tmp_path), d=8)


def test_writer_rejects_bad_rows(tmp_path):
  w = ShardWriter(str(tmp_path), d=4)
  with pytest.raises(SaeJaxError, match=r"rows have shape \(3, 5\), expected \[n, 4\]"):
    w.add(np.zeros((3, 5)))
  with pytest.raises(SaeJaxError, match="NaN or Inf"):
    w.add(np.full((3, 4), np.nan))


def test_feistel_is_a_bijection_and_depends_on_seed():
  for n in (1, 2, 7, 1000, 4097):
    p = pipeline.feistel_permutation(np.arange(n), n, seed=(3, 1))
    np.testing.assert_array_equal(np.sort(p), np.arange(n))
  a = pipeline.feistel_permutation(np.arange(1000), 1000, seed=(0, 0))
  b = pipeline.feistel_permutation(np.arange(1000), 1000, seed=(0, 1))
  assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9


def test_shard_batches_cover_each_row_once_per_epoch(tmp_path):
  rows, _ = _write(tmp_path, n=1000)
  batches = pipeline.ShardBatches(str(tmp_path), batch_size=100, seed=5)
  assert batches.batches_per_epoch == 10
  epoch0 = np.concatenate([batches(i)[:, 0] for i in range(10)])
  epoch1 = np.concatenate([batches(i)[:, 0] for i in range(10, 20)])
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(1000))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(1000))
  assert (epoch0 != epoch1).mean() > 0.9
  np.testing.assert_array_equal(batches(3), pipeline.ShardBatches(str(tmp_path), 100, 5)(3))


def test_grain_iterator_state_resumes_the_stream(tmp_path):
  _write(tmp_path, n=1000)
  config = base.get_config()
  config.data.source, config.data.shard_dir, config.data.batch_size = "shards", str(tmp_path), 100
  it = iter(pipeline.make_dataset(config))
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it2 = iter(pipeline.make_dataset(config))
  it2.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(it2), want)
  assert not np.array_equal(first[0], expected[0])


def test_planted_source_labels_and_statistics():
  cfg = default_synthetic_config()
  src = PlantedSource(cfg)
  np.testing.assert_allclose(np.linalg.norm(src.dictionary, axis=1), 1, rtol=1e-6)
  counts = np.bincount(src.kinds, minlength=4)
  assert list(counts) == [cfg.n_image, cfg.n_text, cfg.n_shared, cfg.n_distractor]
  p = src.paired(2000, seed=1)
  img_on, txt_on = p.image_codes > 0, p.text_codes > 0
  kind = lambda k: src.kinds == KINDS.index(k)
  assert not img_on[:, kind("text")].any() and not txt_on[:, kind("image")].any()
  np.testing.assert_array_equal(img_on[:, kind("shared")], txt_on[:, kind("shared")])  # same content
  assert img_on[:, kind("image")].sum(1).max() == cfg.active_image
  assert txt_on[:, kind("text")].sum(1).max() == cfg.active_text > cfg.active_image  # text-heavier
  fire_rate = img_on[:, kind("distractor")].mean()
  assert abs(fire_rate - cfg.distractor_prob) < 0.02
  energy = (p.image_codes + p.text_codes).mean(0)
  top = np.argsort(-energy)[: cfg.n_distractor]
  assert set(src.kinds[top]) == {KINDS.index("distractor")}
  resid = p.image - p.image_codes @ src.dictionary
  assert abs(resid.std() - cfg.noise_std) < 0.002
  np.testing.assert_array_equal(src.paired(5, seed=1).image, src.paired(5, seed=1).image)
  np.testing.assert_array_equal(src.training_batch(7, 64), src.training_batch(7, 64))
  assert not np.array_equal(src.training_batch(7, 64), src.training_batch(8, 64))


def test_open_planted_gives_the_pairs_and_the_truth_of_the_source():
  cfg = default_synthetic_config()
  src = PlantedSource(cfg)
  opened = open_planted(cfg, 50, seed=3)
  want = src.paired(50, seed=3)
  np.testing.assert_array_equal(opened.image, want.image)
  np.testing.assert_array_equal(opened.text, want.text)
  np.testing.assert_array_equal(opened.sample_ids, np.arange(50))
  np.testing.assert_array_equal(opened.truth.dictionary, src.dictionary)
  np.testing.assert_array_equal(opened.truth.kinds, src.kinds)
  distractor = src.kinds == KINDS.index("distractor")
  np.testing.assert_array_equal(opened.truth.distractor_ids, np.flatnonzero(distractor))
  np.testing.assert_array_equal(opened.truth.distractors, src.dictionary[distractor])
  assert open_planted(cfg, 5, seed=3, with_truth=False).truth is None


def test_planted_source_bad_config():
  cfg = default_synthetic_config()
  cfg.active_text = 999
  with pytest.raises(SaeJaxError, match="config.data.synthetic.active_text=999 exceeds n_text=48"):
    PlantedSource(cfg)
