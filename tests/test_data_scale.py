"""Data at scale: the block shuffle (coverage, purity, process split, SIGKILL resume), bf16 rows kept
bf16 to the device, the fast finiteness check, and the device feed's checkpointed position."""

import os
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import base
from sae_jax.data import pipeline
from sae_jax.data.shards import ShardWriter
from tests.helpers.env import ROOT
from tests.helpers.faults import Crash, CrashingEncoder
from tests.helpers.run_training import final_state, tiny_config

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
BF16 = np.dtype(ml_dtypes.bfloat16)


def _write(directory, n=1000, d=8, rows_per_shard=300, dtype="float32"):
  """Rows whose columns 0 and 1 hold (id // 256, id % 256): exact in bf16 too."""
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((n, d)).astype(np.float32)
  rows[:, 0], rows[:, 1] = np.arange(n) // 256, np.arange(n) % 256
  w = ShardWriter(str(directory), d=d, dtype=dtype, rows_per_shard=rows_per_shard)
  for start in range(0, n, 128):
    w.add(rows[start : start + 128])
  w.close()
  return rows


def _ids(batch):
  b = np.asarray(batch, np.float32)
  return (b[:, 0] * 256 + b[:, 1]).astype(np.int64)


def _block(n=1000, **kw):
  args = dict(batch_size=100, seed=3, block_rows=64, buffer_rows=256)
  args.update(kw)
  return args


def test_block_shuffle_visits_every_row_once_per_epoch(tmp_path):
  _write(tmp_path)  # shards of 300, 300, 300, 100 rows: blocks of 64 with a short last one each
  batches = pipeline.BlockShuffleBatches(str(tmp_path), **_block())
  epochs = [np.concatenate([_ids(batches(i)) for i in range(10 * e, 10 * e + 10)]) for e in range(3)]
  for ids in epochs:
    np.testing.assert_array_equal(np.sort(ids), np.arange(1000))
  assert (epochs[0] != epochs[1]).mean() > 0.9 and (epochs[1] != epochs[2]).mean() > 0.9
  # A batch size that does not divide the store: batches span two epochs, each epoch is still whole.
  odd = pipeline.BlockShuffleBatches(str(tmp_path), **_block(batch_size=96))
  stream = np.concatenate([_ids(odd(i)) for i in range(32)])  # 3072 rows: epochs 0, 1, 2 and a bit
  for e in range(3):
    np.testing.assert_array_equal(np.sort(stream[1000 * e : 1000 * (e + 1)]), np.arange(1000))
  # The order of a given seed does not depend on the batch size: the same stream of rows.
  np.testing.assert_array_equal(stream[:3000], np.concatenate(epochs))


def test_block_shuffle_is_a_pure_function_of_seed_and_epoch(tmp_path):
  _write(tmp_path)
  a = pipeline.BlockShuffleBatches(str(tmp_path), **_block())
  forward = [a(i) for i in range(25)]
  b = pipeline.BlockShuffleBatches(str(tmp_path), **_block(threads=1))
  for i in [24, 3, 17, 0, 11, 9, 20]:  # random access, fresh object, other thread count
    np.testing.assert_array_equal(b(i), forward[i])
  other = pipeline.BlockShuffleBatches(str(tmp_path), **_block(seed=4))
  assert (_ids(other(0)) != _ids(forward[0])).mean() > 0.9
  # Rows come from whole blocks: a batch of 100 inside one buffer of 4 blocks (of 64 rows) reads at
  # most 4 blocks, 8 when it straddles two buffers; the rows inside a buffer are shuffled.
  starts = np.concatenate([[0], np.cumsum([300, 300, 300, 100])])
  for batch in forward[:10]:
    ids = _ids(batch)
    shard = np.searchsorted(starts, ids, side="right") - 1
    blocks = set(zip(shard, (ids - starts[shard]) // 64))
    assert len(blocks) <= 8
    assert not np.all(np.diff(ids) > 0)
  # The buffer layout matches the rows: buffer t of epoch 0 holds exactly its blocks' rows, in the
  # order the batches show them.
  order = np.concatenate([a.buffer_rows_order(0, t) for t in range(len(a.epoch_layout(0)[1]) - 1)])
  np.testing.assert_array_equal(order, np.concatenate([_ids(x) for x in forward[:10]]))


def test_block_shuffle_split_over_processes_is_the_same_stream(tmp_path):
  _write(tmp_path)
  whole = pipeline.BlockShuffleBatches(str(tmp_path), **_block())
  parts = [
    pipeline.BlockShuffleBatches(str(tmp_path), **_block(), process_index=p, process_count=4)
    for p in range(4)
  ]
  for i in (0, 2, 9, 10, 13, 27):  # inside buffers, across buffers and across epochs
    np.testing.assert_array_equal(np.concatenate([p(i) for p in parts]), whole(i))
  # Each process holds only the rows of its slices (process 1: rows 25-49 of each batch of 100).
  size = int(np.diff(whole.epoch_layout(0)[1])[0])
  rows, _, _ = parts[1]._buffer(0, 0)
  assert rows.shape[0] == np.sum((np.arange(size) % 100 >= 25) & (np.arange(size) % 100 < 50)) < size


def test_bf16_shards_stay_bf16_and_grain_threads_give_the_same_stream(tmp_path):
  rows = _write(tmp_path, dtype="bfloat16")
  config = base.get_config()
  config.data.source, config.data.shard_dir, config.data.batch_size = "shards", str(tmp_path), 100
  config.data.shuffle, config.data.block_rows, config.data.shuffle_buffer_rows = "block", 64, 256
  config.data.reader_threads = 3
  native = pipeline.batch_fn(config, 0, 1, True)
  b = native(4)
  assert b.dtype == BF16
  np.testing.assert_array_equal(b.astype(np.float32), rows[_ids(b)].astype(BF16).astype(np.float32))
  # Init and evaluation batches: float32 through the exact shuffle (no RAM buffer for a few batches).
  init = pipeline.batch_fn(config)(4)
  assert init.dtype == np.float32
  np.testing.assert_array_equal(init, pipeline.ShardBatches(str(tmp_path), 100, 0)(4))
  np.testing.assert_array_equal(init, rows[_ids(init)].astype(BF16).astype(np.float32))
  config.data.shuffle = "global"
  assert pipeline.batch_fn(config, 0, 1, True)(4).dtype == BF16
  config.data.shuffle = "block"
  it = iter(pipeline.make_dataset(config, native))
  for i in range(12):
    np.testing.assert_array_equal(next(it), native(i))


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
def test_all_finite_matches_isfinite(dtype):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((700, 1000)).astype(dtype)  # 700k elements: several chunks
  assert pipeline.all_finite(x)
  big = np.full((3, 5), ml_dtypes.finfo(dtype).max, dtype)
  assert pipeline.all_finite(big) and pipeline.all_finite(-big)
  for bad in (np.nan, np.inf, -np.inf):
    for where in ((0, 0), (699, 999), (350, 17)):
      y = x.copy()
      y[where] = bad
      assert not pipeline.all_finite(y)
      _, valid = pipeline.check_batch(y, 1000, "skip", "test")
      np.testing.assert_array_equal(valid, np.isfinite(y.astype(np.float32)).all(axis=1))


def test_block_shuffle_checks_rows_as_it_fills_its_buffers(tmp_path):
  from sae_jax.errors import SaeJaxError

  _write(tmp_path, d=8)
  shard = np.load(tmp_path / "shard-00001.npy", mmap_mode="r+")  # storage damage after writing
  shard[17, 5], shard[250, 2] = np.nan, -np.inf  # rows 317 and 550
  shard.flush()
  del shard
  config = base.get_config()
  config.data.source, config.data.shard_dir, config.data.batch_size = "shards", str(tmp_path), 100
  config.data.shuffle, config.data.block_rows, config.data.shuffle_buffer_rows = "block", 64, 256
  config.data.nonfinite = "skip"
  fn = pipeline.batch_fn(config, 0, 1, True)
  it = iter(pipeline.make_checked_dataset(config, fn, 8))
  masked = []
  for i in range(10):
    batch, valid = next(it)
    ids = _ids(fn(i))  # the rows as read, before the bad ones are zeroed
    np.testing.assert_array_equal(valid, np.isin(ids, [317, 550], invert=True).astype(np.float32))
    assert np.isfinite(batch.astype(np.float32)).all()  # bad rows zeroed
    masked += [(i, int(k)) for k in np.nonzero(valid == 0)[0]]
  assert len(masked) == 2
  config.data.nonfinite = "error"
  it = iter(pipeline.make_checked_dataset(config, fn, 8))
  with pytest.raises(
    SaeJaxError, match=rf"batch {masked[0][0]}: 1 row\(s\) contain NaN/Inf \(first at row {masked[0][1]}\)"
  ):
    for _ in range(10):
      next(it)


def test_device_feed_checkpoints_the_batch_in_use_not_the_ones_ahead(tmp_path):
  _write(tmp_path)
  config = base.get_config()
  config.data.source, config.data.shard_dir, config.data.batch_size = "shards", str(tmp_path), 100
  config.data.shuffle, config.data.block_rows, config.data.shuffle_buffer_rows = "block", 64, 256
  fn = pipeline.batch_fn(config, 0, 1, True)
  puts = []

  def put(e):
    puts.append(1)
    return jax.device_put(e[0]), e[1]

  feed = pipeline.DeviceFeed(iter(pipeline.make_checked_dataset(config, fn, 8)), put, ahead=2)
  first = [np.asarray(next(feed)[0]) for _ in range(3)]
  assert len(puts) == 5  # batches 3 and 4 are already on the device
  state = feed.get_state()
  expected = [np.asarray(next(feed)[0]) for _ in range(4)]
  again = pipeline.DeviceFeed(iter(pipeline.make_checked_dataset(config, fn, 8)), put, ahead=2)
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(np.asarray(next(again)[0]), want)
  np.testing.assert_array_equal(first[0], fn(0))
  np.testing.assert_array_equal(expected[0], fn(3))


def _train_args(work, shards, steps):
  return [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=configs/synthetic.py:tiny",
    f"--workdir={work}",
    "--config.data.source=shards",
    f"--config.data.shard_dir={shards}",
    "--config.data.shuffle=block",
    "--config.data.block_rows=32",
    "--config.data.shuffle_buffer_rows=512",
    "--config.data.batch_size=64",
    "--config.sae.c=64",
    "--config.sae.k=8",
    f"--config.train.num_steps={steps}",
    "--config.train.checkpoint_every=10",
    "--config.train.log_every=10",
    "--config.train.async_checkpoint=False",
    "--config.train.tensorboard=False",
  ]


def test_block_shuffle_training_resumes_exactly_after_sigkill(tmp_path):
  """bf16 shards, block shuffle, 2 batches on the device ahead: a run killed mid-epoch and resumed
  ends with the parameters of an uninterrupted run (1500 rows: an epoch is ~23 steps of 64)."""
  config = tiny_config()
  d = config.data.synthetic.d
  shards = tmp_path / "shards"
  rng = np.random.default_rng(0)
  w = ShardWriter(str(shards), d=d, dtype="bfloat16", rows_per_shard=400)
  w.add(rng.standard_normal((1500, d)).astype(np.float32))
  w.close()
  steps = 90
  ref = subprocess.run(
    _train_args(tmp_path / "ref", shards, steps),
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert ref.returncode == 0, ref.stderr[-2000:]
  work = tmp_path / "killed"
  proc = subprocess.Popen(
    _train_args(work, shards, steps), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 300
  while not (work / "checkpoints" / "30").is_dir() and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit())
  assert done and done[-1] < steps, f"killed too late to test resumption: {done}"
  again = subprocess.run(
    _train_args(work, shards, steps), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
  )
  assert again.returncode == 0, again.stderr[-2000:]
  assert "Resumed from" in again.stdout
  config.sae.c, config.sae.k = 64, 8
  a, b = final_state(str(tmp_path / "ref"), config), final_state(str(work), config)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- extraction split across processes ------------------------------------------------------------


def _clip_config(**extract):
  from configs import clip_coco

  cfg = clip_coco.get_config("tiny")
  cfg.extract.chunk_size = 2  # 6 image chunks over the 11 fixture images
  cfg.extract.rows_per_shard = 4  # finished shards are what a resumed run skips
  cfg.extract.pooling = ("embed", "mean")
  cfg.extract.contrastive_tokens = True
  for k, v in extract.items():
    setattr(cfg.extract, k, v)
  return cfg


def _merged_rows(wd):
  from sae_jax.data.shards import ActivationStore

  store = ActivationStore(os.path.join(wd, "activations", "shards"))
  rows = store.rows(np.arange(len(store)))
  ids = np.concatenate(
    [np.load(os.path.join(store.directory, s["name"] + ".sample_ids.npy")) for s in store.index["shards"]]
  )
  order = np.lexsort((rows[:, 0], ids))
  return store.index, ids[order], rows[order]


def _assert_same_extraction(wd, ref):
  index, ids, rows = _merged_rows(wd)
  rindex, rids, rrows = _merged_rows(ref)
  assert index["format"] == "sae_jax.activations.v2" and rindex["format"] == "sae_jax.activations.v1"
  np.testing.assert_array_equal(ids, rids)  # the same rows as a set
  np.testing.assert_allclose(rows, rrows, atol=1e-5)
  for v in ("embed", "mean"):
    a = np.load(os.path.join(wd, "activations", f"pooled_{v}.npz"))
    b = np.load(os.path.join(ref, "activations", f"pooled_{v}.npz"))
    assert set(a.files) == set(b.files)
    for key in b.files:
      if b[key].dtype.kind == "f":
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)  # row for row
      else:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  from sae_jax.stages import extract as extract_stage

  wd = tmp_path_factory.mktemp("one")
  summary = extract_stage.run_extraction(_clip_config(), str(wd))
  return str(wd), summary


def test_process_split_from_config_and_launcher_env():
  from sae_jax.errors import SaeJaxError
  from sae_jax.stages import extract_parts

  ex = _clip_config().extract
  assert extract_parts.process_split(ex, {}) == (0, 1)
  assert extract_parts.process_split(ex, {"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
  assert extract_parts.process_split(ex, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
  ex.process_index, ex.process_count = 2, 3
  assert extract_parts.process_split(ex, {"RANK": "0", "WORLD_SIZE": "4"}) == (2, 3)
  ex.process_index = 3
  with pytest.raises(SaeJaxError, match="process_index/process_count=3/3"):
    extract_parts.process_split(ex, {})


def test_two_parts_one_killed_and_resumed_merge_to_the_single_process_extraction(one_process, tmp_path):
  from sae_jax import encoders
  from sae_jax.stages import extract as extract_stage

  ref, ref_summary = one_process
  cfg = _clip_config(process_count=2)
  enc = encoders.load_encoder(cfg.extract)
  cfg.extract.process_index = 1
  with pytest.raises(Crash):  # process 1 dies after 4 batches (some of its chunks are saved)
    extract_stage.run_part(cfg, str(tmp_path), 1, 2, encoder=CrashingEncoder(enc, 4))
  cfg.extract.process_index = 0
  part0 = extract_stage.run_extraction(cfg, str(tmp_path))
  assert "merged" not in part0 and not (tmp_path / "activations" / "shards").exists()
  assert part0["counts"] == part0["part"]["counts"]
  assert not list((tmp_path / "activations").glob("pooled_*.npz"))
  p0 = tmp_path / "activations" / "process-00000-of-00002"
  stamps = {f: os.stat(f).st_mtime_ns for f in p0.rglob("*") if f.is_file()}
  cfg.extract.process_index = 1
  part1 = extract_stage.run_part(cfg, str(tmp_path), 1, 2, encoder=enc)
  # Only process 1's unfinished chunks ran again; process 0's files are untouched.
  assert 0 < part1["part"]["rows_written_this_run"] < part1["part"]["counts"]["shard_rows"]
  assert stamps == {f: os.stat(f).st_mtime_ns for f in p0.rglob("*") if f.is_file()}
  assert part0["counts"]["images"] + part1["part"]["counts"]["images"] == 11
  merged = part1
  assert merged["merged"] and merged["counts"] == ref_summary["counts"] and merged["processes"] == 2
  _assert_same_extraction(str(tmp_path), ref)
  # The merged workdir is complete for a single-process run of the same config, and trains.
  again = extract_stage.run_extraction(_clip_config(), str(tmp_path))
  assert again["processes"] == 2
  config = base.get_config()
  config.data.source, config.data.batch_size = "shards", 32
  config.data.shard_dir = str(tmp_path / "activations" / "shards")
  for shuffle in ("global", "block"):
    config.data.shuffle = shuffle
    batch = pipeline.batch_fn(config, 0, 1, True)(0).astype(np.float32)
    assert batch.shape == (32, merged["d"]) and np.isfinite(batch).all()


def test_two_concurrent_processes_with_torchrun_env_match_one(one_process, tmp_path):
  ref, _ = one_process
  args = [
    sys.executable,
    "-m",
    "experiments.extract",
    "--config=configs/clip_coco.py:tiny",
    f"--workdir={tmp_path}",
    "--config.extract.chunk_size=2",
    "--config.extract.rows_per_shard=4",
    "--config.extract.pooling=('embed','mean')",
    "--config.extract.contrastive_tokens=True",
  ]
  procs = [
    subprocess.Popen(
      args,
      cwd=ROOT,
      env={**ENV, "RANK": str(p), "WORLD_SIZE": "2"},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for p in range(2)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  _assert_same_extraction(str(tmp_path), ref)


class _CountingEncoder:
  """A real encoder that counts the images and captions it encodes."""

  def __init__(self, enc):
    self._enc, self.encoded = enc, 0

  def encode(self, images=None, texts=None):
    self.encoded += len(images or texts or [])
    return self._enc.encode(images=images, texts=texts)

  def __getattr__(self, name):
    return getattr(self._enc, name)


def test_online_source_on_two_processes_encodes_each_window_once():
  from sae_jax import encoders
  from sae_jax.data import online

  cfg = _clip_config()
  cfg.data.source, cfg.data.batch_size = "online", 16
  cfg.extract.online_buffer_batches, cfg.extract.online_window_items = 2, 24
  enc = encoders.load_encoder(cfg.extract)
  whole = online.online_batch_fn(cfg, encoder=_CountingEncoder(enc))
  parts = [online.online_batch_fn(cfg, _CountingEncoder(enc), None, p, 2) for p in range(2)]
  for w in (0, 3):  # window 3 is in the second epoch (66 samples, 24 per window)
    items = [part.window_items(w) for part in parts]
    np.testing.assert_array_equal(np.sort(np.concatenate(items)), np.sort(whole.window_items(w)))
    counts = [part.encoder.encoded for part in parts]
    rows = [part._encode([part.items[i] for i in idx])[0] for part, idx in zip(parts, items)]
    assert [part.encoder.encoded - c for part, c in zip(parts, counts)] == [len(i) for i in items] == [12, 12]
    ref = whole._encode([whole.items[i] for i in whole.window_items(w)])[0]
    # The two shares' rows are the window's rows (CLIP: one embedding row per sample).
    both = np.concatenate(rows)
    np.testing.assert_allclose(both[np.lexsort(both.T[::-1])], ref[np.lexsort(ref.T[::-1])], atol=1e-5)
  before = [part.encoder.encoded for part in parts]
  batch = [part(2 * 5 + 1) for part in parts]  # window 5 (the epoch's last, 18 samples), second batch
  assert [part.encoder.encoded - b for part, b in zip(parts, before)] == [9, 9]
  assert batch[0].shape == batch[1].shape == (8, enc.d)
  mine = parts[1]._encode([parts[1].items[i] for i in parts[1].window_items(5)])[0]
  assert ((batch[1][:, None, :] - mine[None]) ** 2).sum(-1).min(1).max() < 1e-8
