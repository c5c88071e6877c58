"""Reliability: a resumed run logs each step once, storage hiccups are retried (damage falls back),
the extraction device follows the local rank, analysis and retrieval stop cleanly on SIGTERM and
resume to identical outputs, and activation shards / pooled files are read from gs://."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import synthetic
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib
from sae_jax.training import trainer
from tests.helpers.logs import read_wandb_records, tensorboard_history


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tiny(num_steps):
  config = synthetic.get_config("tiny")
  config.data.batch_size, config.train.num_steps = 64, num_steps
  config.train.log_every, config.train.checkpoint_every, config.train.max_to_keep = 10, 20, 5
  config.train.async_checkpoint = False
  config.train.wandb_project = "sae-jax-test"
  return config


def test_resume_from_an_older_checkpoint_logs_each_step_once(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONSOLE", "off")
  work = str(tmp_path / "w")
  trainer.train_and_evaluate(_tiny(40), work)
  first = {m["step"]: m for m in _metrics(work)}
  assert sorted(first) == [10, 20, 30, 40]
  shutil.rmtree(os.path.join(work, "checkpoints", "40"))  # the newest checkpoint is lost: resume at 20
  trainer.train_and_evaluate(_tiny(60), work)
  out = capsys.readouterr().out
  assert "metrics.jsonl: dropped 2 line(s) past step 20" in out and "checkpoints/20" in out
  lines = _metrics(work)
  assert [m["step"] for m in lines] == [10, 20, 30, 40, 50, 60]
  for step in (30, 40):  # the re-run steps, logged again: the same values (bit-identical resume)
    assert {k: v for k, v in lines[step // 10 - 1].items() if k != "tokens_per_s"} == {
      k: v for k, v in first[step].items() if k != "tokens_per_s"
    }
  # TensorBoard shows every step once: the second event file's purge hides the first one's 30 and 40.
  files = [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(work, "tensorboard", "events.*")))]
  assert len(files) == 2
  loss = tensorboard_history(files)["train/loss"]
  assert sorted(loss) == [10, 20, 30, 40, 50, 60]
  for m in lines:
    assert loss[m["step"]] == pytest.approx(m["loss"], rel=1e-6)
  # W&B (history only grows): the resumed session sends only the steps past 40.
  runs = glob.glob(os.path.join(work, "wandb", "offline-run-*", "run-*.wandb"))
  steps = [
    [r.history.step.num for r in read_wandb_records(f) if r.WhichOneof("record_type") == "history"]
    for f in runs
  ]
  assert sorted(steps) == [[10, 20, 30, 40], [50, 60]], (runs, steps)


def test_cut_back_drops_a_line_cut_short_and_later_steps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(
    '{"step": 10, "loss": 1.0}\n{"step": 20, "event": "preempted"}\n{"step": 30, "loss": 0.5}\n{"st'
  )
  assert trainer.cut_back_metrics(path, 20) == 30
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [10, 20]
  assert trainer.cut_back_metrics(path, 20) == 20 and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------- checkpoint restores


class FlakyStorage:
  """The local file system of etils.epath (orbax's path layer), failing the first `failures` file
  opens under `under` with `error` and then working: a storage hiccup, not damage."""

  def __init__(self, monkeypatch, under, failures, error=lambda: TimeoutError("read timed out")):
    from etils.epath import backend

    self.under, self.left, self.error, self.opens_failed = str(under), failures, error, 0
    real = type(backend.os_backend).open

    def open_(backend_self, path, mode, *args, **kwargs):
      if str(path).startswith(self.under) and self.left != 0:
        self.left -= 1
        self.opens_failed += 1
        raise self.error()
      return real(backend_self, path, mode, *args, **kwargs)

    monkeypatch.setattr(type(backend.os_backend), "open", open_)


@pytest.fixture(scope="module")
def trained40(tmp_path_factory):
  """A 40-step run with checkpoints at 20 and 40."""
  work = str(tmp_path_factory.mktemp("trained40") / "w")
  config = _tiny(40)
  config.train.wandb_project, config.train.tensorboard = "", False
  trainer.train_and_evaluate(config, work)
  return work


def _abstract(workdir):
  config = workdir_lib.read_config(workdir)
  abstract = state_lib.abstract_state(workdir_lib.spec_of_config(config), config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


def _leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


STORAGE_ERRORS = {
  "timeout": lambda: TimeoutError("read timed out"),
  "http 503": lambda: OSError("GET https://storage.googleapis.com/b/o: HTTP status 503 Service Unavailable"),
  "permission race": lambda: PermissionError(13, "Permission denied"),
}


@pytest.mark.parametrize("kind", sorted(STORAGE_ERRORS))
def test_storage_hiccup_is_retried_with_backoff_and_the_newest_checkpoint_restores(
  trained40, tmp_path, monkeypatch, kind
):
  work = str(tmp_path / "w")
  shutil.copytree(trained40, work)
  clean = ckpt_lib.make_manager(work)
  want = _leaves(ckpt_lib.restore(clean, 40, _abstract(work))[0])
  clean.close()
  flaky = FlakyStorage(monkeypatch, os.path.join(work, "checkpoints", "40", "meta"), 3, STORAGE_ERRORS[kind])
  manager, waits = ckpt_lib.make_manager(work), []
  state, meta, step = ckpt_lib.restore_newest(
    manager, _abstract(work), retries=5, backoff_s=0.5, sleep=waits.append
  )
  manager.close()
  assert (step, meta["step"], flaky.opens_failed, waits) == (40, 40, 3, [0.5, 1.0, 2.0])
  assert not glob.glob(os.path.join(work, "checkpoints", "*.corrupt"))
  got = _leaves(state)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_training_resumes_through_a_storage_hiccup_and_stops_on_a_persistent_one(
  trained40, tmp_path, monkeypatch, capsys
):
  work = str(tmp_path / "w")
  shutil.copytree(trained40, work)
  config = _tiny(60)
  config.train.wandb_project, config.train.tensorboard, config.train.restore_backoff_s = "", False, 0.001
  flaky = FlakyStorage(monkeypatch, os.path.join(work, "checkpoints", "40", "meta"), 2)
  trainer.train_and_evaluate(config, work)
  captured = capsys.readouterr()
  assert flaky.opens_failed == 2 and captured.err.count("storage error reading checkpoint") == 2
  assert f"Resumed from {work}/checkpoints/40" in captured.out
  flaky.left = -1  # from now on every read of checkpoints/60/meta fails
  flaky.under = os.path.join(work, "checkpoints", "60", "meta")
  config.train.restore_retries = 3
  with pytest.raises(ckpt_lib.StorageError) as e:
    trainer.train_and_evaluate(config, work)
  assert str(e.value) == (
    f"checkpoint {work}/checkpoints/60: reading it failed 4 times with a storage error (TimeoutError: "
    "read timed out); it is left as it is (it may be intact): re-run when the storage answers, or raise "
    "config.train.restore_retries"
  )
  assert os.path.isdir(os.path.join(work, "checkpoints", "60"))  # not moved aside
  assert not glob.glob(os.path.join(work, "checkpoints", "*.corrupt"))


# orbax leaves the coroutines of a failed restore unawaited; the failure itself is what is tested
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damage_behind_a_storage_hiccup_still_falls_back(trained40, tmp_path, monkeypatch):
  work = str(tmp_path / "w")
  shutil.copytree(trained40, work)
  meta_file = os.path.join(work, "checkpoints", "40", "meta", "metadata")
  with open(meta_file, "r+b") as f:  # truncated: real damage
    f.truncate(5)
  flaky = FlakyStorage(monkeypatch, os.path.dirname(meta_file), 2)
  manager, waits = ckpt_lib.make_manager(work), []
  _, meta, step = ckpt_lib.restore_newest(
    manager, _abstract(work), retries=5, backoff_s=0.1, sleep=waits.append
  )
  manager.close()
  assert (step, meta["step"], flaky.opens_failed, waits) == (20, 20, 2, [0.1, 0.2])
  assert os.path.isdir(os.path.join(work, "checkpoints", "40.corrupt"))


def test_what_counts_as_a_storage_error():
  def chained(outer, inner):
    try:
      raise inner
    except Exception as e:  # noqa: BLE001
      try:
        raise outer from e
      except Exception as out:  # noqa: BLE001
        return out

  assert ckpt_lib.is_transient(TimeoutError())
  assert ckpt_lib.is_transient(ValueError("UNAVAILABLE: gs://b/o: connection reset"))
  assert ckpt_lib.is_transient(OSError("HTTP 429 Too Many Requests"))
  assert ckpt_lib.is_transient(chained(ValueError("restore failed"), ConnectionResetError()))
  assert not ckpt_lib.is_transient(FileNotFoundError("checkpoints/500/state/_METADATA"))
  assert not ckpt_lib.is_transient(ValueError("checkpoints/500/state: truncated file, 503 bytes read"))
  assert not ckpt_lib.is_transient(OSError(5, "Input/output error"))  # EIO: a bad disk is damage


# ----------------------------------------------------------------------- extraction device choice


def test_extraction_device_follows_the_local_rank():
  from sae_jax.encoders import auto_device

  assert auto_device(0, {"LOCAL_RANK": "3"}) == ("cpu", "no CUDA device")
  assert auto_device(8, {}) == ("cuda:0", "no local rank variable")
  assert auto_device(8, {"LOCAL_RANK": "3"}) == ("cuda:3", "$LOCAL_RANK=3")  # torchrun
  assert auto_device(4, {"SLURM_LOCALID": "2"})[0] == "cuda:2"  # srun
  assert auto_device(4, {"OMPI_COMM_WORLD_LOCAL_RANK": "1"})[0] == "cuda:1"  # mpirun
  # torchrun's variable first; a launcher that pinned one GPU per process leaves count 1.
  assert auto_device(4, {"LOCAL_RANK": "1", "SLURM_LOCALID": "3"})[0] == "cuda:1"
  assert auto_device(1, {"LOCAL_RANK": "5"}) == ("cuda:0", "$LOCAL_RANK=5, one visible GPU")
  with pytest.raises(SaeJaxError, match=r"^\$SLURM_LOCALID=4: this machine shows 4 GPUs \(cuda:0..cuda:3\)"):
    auto_device(4, {"SLURM_LOCALID": "4"})
  with pytest.raises(SaeJaxError, match=r"^\$LOCAL_RANK='x': expected an integer local rank$"):
    auto_device(4, {"LOCAL_RANK": "x"})


# ------------------------------------------------------- analysis and retrieval stop cleanly, resume

# A real SIGTERM, sent to the stage's own process while block `n` is being computed (the timing is
# the only thing set up: handler, block save, exit status and resume are the stage's own).
SIGNAL_AT_BLOCK = """
import os, signal, sys
from sae_jax.stages import block_progress
calls = []
def signalled(method):
  def at_block(self, name, compute, where):
    calls.append(name)
    if len(calls) == {n}:
      os.kill(os.getpid(), signal.SIGTERM)
    return method(self, name, compute, where)
  return at_block
block_progress.BlockProgress.arrays = signalled(block_progress.BlockProgress.arrays)
block_progress.BlockProgress.record = signalled(block_progress.BlockProgress.record)
from tests.helpers.trained import synthetic_sae_config
from tests.test_reliability import {configure}
from sae_jax.stages import {stage}
{stage}.{run}({configure}(synthetic_sae_config(), {sae!r}), {work!r})
print("not stopped")
"""


def _signalled_run(stage, run, configure, sae, work, n):
  import subprocess
  import sys

  from tests.helpers.env import ROOT

  script = SIGNAL_AT_BLOCK.format(n=n, stage=stage, run=run, configure=configure, sae=sae, work=work)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )


def _tree(workdir, stage):
  """Every output file of `stage`: arrays of .npz, parsed .json (summary.json without timings), bytes
  otherwise; the workdir's own path (recorded in tables) as <workdir>."""
  out, directory = {}, os.path.join(workdir, stage)
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.endswith(".npz"):
      with np.load(path) as z:
        out[name] = {k: z[k] for k in z.files}
      continue
    with open(path, "rb") as f:
      data = f.read().replace(workdir.encode(), b"<workdir>")
    out[name] = json.loads(data) if name.endswith(".json") else data
    if name == "summary.json":
      for key in ("seconds", "blocks_resumed"):
        out[name].pop(key)
  return out


def _assert_same_tree(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    if isinstance(a[name], dict) and name.endswith(".npz"):
      assert sorted(a[name]) == sorted(b[name]), name
      for k in a[name]:
        np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}:{k}")
    else:
      assert a[name] == b[name], name


def analysis_config(config, sae_workdir):
  """Synthetic pairs in 8 blocks of 256, the bridge on (top pairs), a fixed run name."""
  a = config.analysis
  a.sae_workdir, a.source, a.num_pairs, a.block_size = sae_workdir, "synthetic", 2048, 256
  a.top_pairs, a.run_name, a.save_codes = 20, "run", True
  return config


def test_sigterm_mid_analysis_exits_75_and_the_rerun_gives_the_same_outputs(trained_sae, tmp_path):
  from sae_jax import preemption
  from sae_jax.stages import analyze

  ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
  analyze.run_analysis(analysis_config(trained_sae.config(), trained_sae.workdir), ref)
  r = _signalled_run("analyze", "run_analysis", "analysis_config", trained_sae.workdir, work, 3)
  assert r.returncode == preemption.PREEMPTED_EXIT_CODE, r.stderr[-2000:]
  assert (
    "preempted: SIGTERM: stopped after analysis block 3 of 8" in r.stderr and "not stopped" not in r.stdout
  )
  assert not os.path.exists(os.path.join(work, "analysis"))  # nothing half-done
  saved = sorted(os.listdir(os.path.join(work, ".progress", "analysis")))
  assert saved == ["codes-000000.npz", "codes-000001.npz", "codes-000002.npz", "fingerprint.json"]
  summary = analyze.run_analysis(analysis_config(trained_sae.config(), trained_sae.workdir), work)
  assert summary["blocks_resumed"] == 3 and not os.path.exists(os.path.join(work, ".progress"))
  _assert_same_tree(_tree(ref, "analysis"), _tree(work, "analysis"))


def retrieval_config(config, sae_workdir):
  """Synthetic pairs, removal from the SAE's attribution, a 3-rank sweep: 9 scored settings."""
  r = config.retrieval
  r.sae_workdir, r.attribution, r.source = sae_workdir, "sae", "synthetic"
  r.synthetic_pairs, r.synthetic_fit_pairs, r.removal_fraction = 600, 1000, 0.015
  r.sweep_ranks, r.tasks = (1, 2), ("image_to_text",)
  return config


def test_sigterm_mid_retrieval_exits_75_and_the_rerun_gives_the_same_outputs(trained_sae, tmp_path):
  from sae_jax import preemption
  from sae_jax.stages import retrieve

  ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
  retrieve.run_retrieval(retrieval_config(trained_sae.config(), trained_sae.workdir), ref)
  r = _signalled_run("retrieve", "run_retrieval", "retrieval_config", trained_sae.workdir, work, 2)
  assert r.returncode == preemption.PREEMPTED_EXIT_CODE, r.stderr[-2000:]
  assert "preempted: SIGTERM: stopped after retrieval recall-image_to_text-" in r.stderr
  assert not os.path.exists(os.path.join(work, "retrieval"))
  saved = sorted(os.listdir(os.path.join(work, ".progress", "retrieval")))
  assert saved == [
    "fingerprint.json",
    "recall-image_to_text-mean+removal.json",
    "recall-image_to_text-mean.json",
  ]
  # The saved settings are read back, not scored again: a planted value in a copy comes out as is.
  shutil.copytree(work, str(tmp_path / "planted"))
  planted = tmp_path / "planted" / ".progress" / "retrieval" / "recall-image_to_text-mean.json"
  saved_block = json.loads(planted.read_text())  # the record and the first-hit ranks of the setting
  saved_block["record"]["R@1"] = -1.0
  planted.write_text(json.dumps(saved_block))
  res = retrieve.run_retrieval(
    retrieval_config(trained_sae.config(), trained_sae.workdir), str(tmp_path / "planted")
  )
  assert res["image_to_text"]["mean"]["R@1"] == -1.0 and res["image_to_text"]["mean+removal"]["R@1"] > 0
  retrieve.run_retrieval(retrieval_config(trained_sae.config(), trained_sae.workdir), work)
  assert not os.path.exists(os.path.join(work, ".progress"))
  _assert_same_tree(_tree(ref, "retrieval"), _tree(work, "retrieval"))


# ------------------------------------------------------------------- remote inputs on gs://


def _upload(local_dir, remote_dir):
  """Copies a local directory tree to `remote_dir` (gs://..., the in-memory fake) through epath."""
  from etils import epath

  for root, _, files in os.walk(local_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      target = epath.Path(remote_dir) / rel
      target.parent.mkdir(parents=True, exist_ok=True)
      with open(os.path.join(root, name), "rb") as f:
        target.write_bytes(f.read())


def _two_part_shards(root):
  """bf16 shards in two part directories and a merged v2 index over them (names climb out: ../)."""
  from sae_jax.data.shards import ShardWriter
  from sae_jax.stages import extract_parts

  rng = np.random.default_rng(0)
  rows = rng.standard_normal((1000, 8)).astype(np.float32)
  parts = []
  for p, (a, b) in enumerate(((0, 600), (600, 1000))):
    parts.append(os.path.join(root, f"process-{p}", "shards"))
    w = ShardWriter(parts[-1], d=8, dtype="bfloat16", rows_per_shard=250)
    w.add(rows[a:b])
    w.close()
  extract_parts.write_merged_index(os.path.join(root, "shards"), parts, {"processes": 2})
  return os.path.join(root, "shards")


def test_activation_shards_on_gs_read_and_train_like_local_ones(tmp_path):
  from sae_jax.data import pipeline
  from sae_jax.data.shards import ActivationStore
  from tests.helpers.gcs import memory_gcs
  from tests.helpers.run_training import final_state, tiny_config

  local = _two_part_shards(str(tmp_path / "act"))
  with memory_gcs():
    _upload(str(tmp_path / "act"), "gs://bucket/act")
    remote = "gs://bucket/act/shards"
    a, b = ActivationStore(local), ActivationStore(remote)
    assert len(b) == len(a) == 1000 and b.index["shards"] == a.index["shards"]
    idx = np.random.default_rng(1).integers(0, 1000, 300)  # unsorted, repeats, across shards and parts
    np.testing.assert_array_equal(b.rows(idx, None), a.rows(idx, None))
    assert b.rows(idx, None).dtype == a.np_dtype  # bf16 stays bf16
    np.testing.assert_array_equal(b.arrays[2][10:200], a.arrays[2][10:200])
    for make in (
      lambda d: pipeline.ShardBatches(d, 64, seed=3),
      lambda d: pipeline.BlockShuffleBatches(d, 64, seed=3, block_rows=32, buffer_rows=128),
    ):
      x, y = make(local), make(remote)
      for i in (0, 7, 20):  # 20: the second epoch
        np.testing.assert_array_equal(y(i), x(i))
    # Training from the remote shards gives the state of training from the local ones.
    states = []
    for shard_dir in (local, remote):
      config = tiny_config(num_steps=10)
      config.data.source, config.data.shard_dir, config.data.shuffle = "shards", shard_dir, "block"
      config.data.block_rows, config.data.shuffle_buffer_rows, config.sae.d = 32, 128, 8
      work = str(tmp_path / ("train-local" if shard_dir == local else "train-gs"))
      trainer.train_and_evaluate(config, work)
      states.append(final_state(work, config))
  for k in states[0]:
    np.testing.assert_array_equal(states[1][k], states[0][k], err_msg=k)
  assert not os.path.exists("gs:")  # read from the fake store, not a local directory named gs:


def test_pooled_files_on_gs_give_the_analysis_and_retrieval_of_local_ones(trained_sae, tmp_path):
  from sae_jax.data.synthetic import PlantedSource
  from sae_jax.stages import analyze, retrieve
  from tests.helpers.gcs import memory_gcs

  pairs = PlantedSource(trained_sae.config().data.synthetic).paired(600, seed=5)
  act = tmp_path / "act"
  act.mkdir()
  ids = np.arange(600)
  workdir_lib.atomic_savez(
    str(act / "pooled_mean.npz"), image=pairs.image, text=pairs.text, sample_ids=ids, image_ids=ids // 2
  )
  outputs = []
  with memory_gcs():
    _upload(str(act), "gs://bucket/act")
    for where in (str(act), "gs://bucket/act"):
      work = str(tmp_path / ("local" if where == str(act) else "gs"))
      config = trained_sae.config()
      a = config.analysis
      a.sae_workdir, a.embeddings_path = trained_sae.workdir, f"{where}/pooled_mean.npz"
      a.run_name, a.top_pairs = "r", 10
      summary = analyze.run_analysis(config, work)
      assert summary["source"] == "pooled" and summary["n_pairs"] == 600
      r = config.retrieval
      r.sae_workdir, r.pooled_dir, r.variants = trained_sae.workdir, where, ("mean",)
      r.tasks, r.sweep_ranks, r.fit_on = ("image_to_text",), (1,), "eval"
      results = retrieve.run_retrieval(config, work)  # source "auto" finds the remote pooled file
      assert results["image_to_text"]["mean"]["n_queries"] == 300  # the unique images
      outputs.append((_tree(work, "analysis"), json.dumps(results, sort_keys=True)))
  (ta, ra), (tb, rb) = outputs
  for tree in (ta, tb):
    tree["summary.json"].pop("embeddings_path")
  _assert_same_tree(ta, tb)
  assert ra == rb.replace("gs://bucket/act", str(act))
  assert not os.path.exists("gs:")


def test_block_progress_discards_other_inputs_and_recomputes_a_damaged_block(tmp_path, capsys):
  from sae_jax.stages.block_progress import PROGRESS_DIR, BlockProgress

  calls = []

  def compute(value):
    calls.append(value)
    return {"x": np.full(3, value, np.float32)}

  p = BlockProgress(str(tmp_path), "analysis", {"inputs": "a"})
  assert p.arrays("b0", lambda: compute(1), "block 1")["x"][0] == 1
  assert p.record("r0", lambda: {"R@1": np.float64(50.0), "n": np.int64(3)}, "r0") == {"R@1": 50.0, "n": 3}
  again = BlockProgress(str(tmp_path), "analysis", {"inputs": "a"})  # same inputs: read back
  assert again.arrays("b0", lambda: compute(2), "block 1")["x"][0] == 1 and again.reused == 1
  (tmp_path / PROGRESS_DIR / "analysis" / "b0.npz").write_bytes(b"PK\x03")  # damaged: computed again
  assert again.arrays("b0", lambda: compute(3), "block 1")["x"][0] == 3
  other = BlockProgress(str(tmp_path), "analysis", {"inputs": "b"})  # other inputs: started over
  assert "holds the progress of other inputs or settings" in capsys.readouterr().err
  assert other.arrays("b0", lambda: compute(4), "block 1")["x"][0] == 4 and calls == [1, 3, 4]
  other.clear()
  assert not (tmp_path / PROGRESS_DIR).exists()
  BlockProgress(str(tmp_path), "retrieval", {"inputs": "a"})  # nothing saved: nothing written
  assert not (tmp_path / PROGRESS_DIR).exists()


def test_the_core_stages_do_not_import_tensorflow():
  """`pip install -e .` without the tfds extra: only extract.dataset="tfds" imports TensorFlow."""
  import subprocess
  import sys

  from tests.helpers.env import ROOT

  script = (
    "import sys\n"
    "import sae_jax.data.paired, sae_jax.data.online, sae_jax.stages.extract, sae_jax.stages.analyze\n"
    "import sae_jax.stages.retrieve, sae_jax.training.trainer, sae_jax.api\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))\n"
  )
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
