"""Preemption: SIGTERM saves and exits 75, a damaged newest checkpoint falls back, remote workdirs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from sae_jax import preemption
from sae_jax import workdir as workdir_lib
from sae_jax.errors import SaeJaxError
from sae_jax.stages import extract as extract_stage
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib
from sae_jax.training import trainer
from tests.conftest import ROOT
from tests.helpers.faults import start_two_trainers
from tests.helpers.gcs import memory_gcs
from tests.helpers.logs import tensorboard_events
from tests.helpers.states import assert_identical, checkpoint_state

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
# 64-row batches: ~1,000 steps/s here, so a 1000-step run costs seconds and a signal lands mid-run.
TRAIN = [
  "-m",
  "experiments.train",
  "--config=configs/synthetic.py:tiny",
  "--config.data.batch_size=64",
  "--config.train.checkpoint_every=200",
  "--config.train.log_every=100",
  "--config.train.tensorboard=False",
]


def _train_args(workdir, steps):
  return [*TRAIN, f"--workdir={workdir}", f"--config.train.num_steps={steps}"]


def _run(args):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
  )


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 1000-step run (checkpoints every 200; max_to_keep 3 keeps 600, 800, 1000)."""
  wd = tmp_path_factory.mktemp("reference")
  r = _run(_train_args(wd, 1000))
  assert r.returncode == 0, r.stderr[-2000:]
  return wd


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert os.path.exists(path), f"{path} never appeared"


def test_sigterm_saves_at_the_step_reached_exits_75_and_resumes_bit_identical(reference, tmp_path):
  work = tmp_path / "w"
  proc = subprocess.Popen(
    [sys.executable, *_train_args(work, 1000)],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for(work / "checkpoints" / "200", proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, err[-2000:]
  lines = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
  event = lines[-1]
  assert event["event"] == "preempted" and event["signal"] == "SIGTERM"
  reached = event["step"]
  assert 200 < reached < 1000, "the signal landed too late to test an off-schedule save"
  assert _steps(work)[-1] == reached  # saved at the step reached, past the last periodic one
  assert event["signal_to_saved_s"] >= 0 and "SUMMARY" not in out
  assert f"saved {work}/checkpoints/{reached}" in err
  # The preemption checkpoint is the state after exactly `reached` steps, and a re-run of the same
  # command ends where an uninterrupted run does.
  r = _run(_train_args(work, 1000))
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"Resumed from {work}/checkpoints/{reached}" in r.stdout
  assert_identical(checkpoint_state(work), checkpoint_state(reference))


def test_second_signal_exits_at_once():
  script = (
    "import os, signal, time\n"
    "from sae_jax import preemption\n"
    "with preemption.watch() as w:\n"
    "  os.kill(os.getpid(), signal.SIGTERM)\n"
    "  time.sleep(0.1)\n"
    "  print('first', w.received, flush=True)\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(5)\n"
    "  print('not reached')\n"
  )
  r = _run(["-c", script])
  assert r.stdout == "first SIGTERM\n"
  assert r.returncode == 128 + signal.SIGINT, r.stderr
  assert "SIGINT again: exiting at once" in r.stderr


# orbax leaves the coroutines of a failed restore unawaited; the failure itself is what is tested
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_with_one_warning(reference, tmp_path, damage):
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  newest = work / "checkpoints" / "1000"
  if damage == "truncate":  # the largest array file, as a storage failure mid-write leaves it
    victim = max((newest / "state").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else -1)
    with open(victim, "r+b") as f:
      f.truncate(victim.stat().st_size // 2)
  else:
    (newest / "meta" / "metadata").unlink()
  wd = str(work)
  config = workdir_lib.read_config(wd)
  abstract = state_lib.abstract_state(workdir_lib.spec_of_config(config), config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  manager = ckpt_lib.make_manager(wd)
  state, meta, step = ckpt_lib.restore_newest(manager, abstract)
  manager.close()
  assert step == 800 and meta["step"] == 800
  assert (work / "checkpoints" / "1000.corrupt").is_dir() and not newest.exists()  # moved, not deleted
  assert_identical(
    {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]},
    checkpoint_state(reference, 800),
  )


def test_training_resumes_past_a_truncated_checkpoint_bit_identical(reference, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  victim = max((work / "checkpoints" / "1000" / "state").rglob("*"), key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:
    f.truncate(100)
  r = _run(_train_args(work, 1000))
  assert r.returncode == 0, r.stderr[-2000:]
  warnings = [ln for ln in r.stderr.splitlines() if "does not restore" in ln]
  assert len(warnings) == 1, r.stderr[-2000:]
  assert "checkpoints/1000 does not restore" in warnings[0] and "resuming from step 800" in warnings[0]
  assert f"Resumed from {work}/checkpoints/800" in r.stdout
  assert (work / "checkpoints" / "1000.corrupt").is_dir() and _steps(work)[-1] == 1000
  assert_identical(
    checkpoint_state(work), checkpoint_state(reference)
  )  # the 200 steps re-run give the same state


# orbax leaves the coroutines of a failed restore unawaited; the failure itself is what is tested
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_step_restores_raises_the_newest_error(reference, tmp_path):
  """A config mismatch fails on every step: nothing is moved aside, the error is one line."""
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  config = workdir_lib.read_config(str(work))
  config.sae_spec.c = 2 * config.sae_spec.c
  abstract = state_lib.abstract_state(workdir_lib.spec_of_config(config), config)
  manager = ckpt_lib.make_manager(str(work))
  with pytest.raises(SaeJaxError, match=r"checkpoints/1000: params/\w+ has shape"):
    ckpt_lib.restore_newest(manager, abstract)
  manager.close()
  assert _steps(work) == [600, 800, 1000] and not list((work / "checkpoints").glob("*.corrupt"))


# ------------------------------------------------------------------------------------ extraction


EXTRACT = [
  "-m",
  "experiments.extract",
  "--config=configs/clip_coco.py:tiny",
  # 4 images (20 captions), one sample per chunk and forward: the captions take seconds, so a signal
  # lands mid-phase; 8-row shards, so the interrupted run has published some shards and left the
  # rest buffered.
  "--config.extract.max_images=4",
  "--config.extract.chunk_size=1",
  "--config.extract.batch_size=1",
  "--config.extract.rows_per_shard=8",
]


def _read_tree(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if name.endswith(".npz"):
        with np.load(path) as z:
          out[rel] = {k: z[k] for k in z.files}
      elif name.endswith(".npy"):
        out[rel] = np.load(path)
      elif name == "index.json":
        out[rel] = json.loads(open(path).read())["shards"]
  return out


def test_sigterm_to_extraction_mid_chunk_then_rerun_gives_the_same_files(coco_mini, tmp_path):
  ref, work = tmp_path / "ref", tmp_path / "w"
  from configs import clip_coco

  config = clip_coco.get_config("tiny")
  config.extract.max_images, config.extract.chunk_size, config.extract.batch_size = 4, 1, 1
  config.extract.rows_per_shard = 8
  ref_summary = extract_stage.run_extraction(config, str(ref))  # the same, in one uninterrupted run
  n_captions = ref_summary["counts"]["captions"]
  assert ref_summary["counts"]["images"] == 4 and ref_summary["counts"]["shards"] >= 3
  proc = subprocess.Popen(
    [sys.executable, *EXTRACT, f"--workdir={work}"],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for(work / "activations" / "parts" / "text-00002.npz", proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, err[-2000:]
  assert "stopped after extraction chunk text-" in err
  act = work / "activations"
  assert not (act / "summary.json").exists() and not list(act.glob("pooled_*.npz"))
  done_parts = sorted(p.name for p in (act / "parts").glob("text-*.npz"))
  assert 3 <= len(done_parts) < n_captions
  # A damaged part file whose rows are already in published shards is re-run, not a crash in numpy.
  first = act / "parts" / "image-00000.npz"
  first.write_bytes(first.read_bytes()[:50])
  r = _run([*EXTRACT, f"--workdir={work}"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "image-00000.npz does not load" in r.stderr and "re-running chunk image-00000" in r.stderr
  summary = json.loads((act / "summary.json").read_text())
  assert summary["counts"] == ref_summary["counts"]
  assert 0 < summary["rows_written_this_run"] < summary["counts"]["shard_rows"]
  a, b = _read_tree(ref / "activations"), _read_tree(act)
  assert set(a) == set(b) and "pooled_embed.npz" in a and "shards/shard-00002.npy" in a
  for name in a:
    if isinstance(a[name], dict):
      for k in a[name]:
        np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}:{k}")
    elif isinstance(a[name], np.ndarray):
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    else:
      assert a[name] == b[name]


# ------------------------------------------------------------------------------- remote workdirs


@pytest.fixture
def fake_gcs():
  with memory_gcs() as fs:
    yield fs


def _exercise_workdir(workdir):
  """Every workdir writer and reader training uses, on `workdir` (a local path or gs://)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  resolved = {"sae": {"c": 64}, "train": {"num_steps": 10}}
  workdir_lib.check_workdir_config(workdir, resolved, False)  # no config.json yet
  workdir_lib.write_config(workdir, resolved)
  assert workdir_lib.read_config(workdir).sae.c == 64
  workdir_lib.check_workdir_config(workdir, {**resolved, "train": {"num_steps": 20}}, False)
  with pytest.raises(SaeJaxError, match="config.json holds a run with a different config"):
    workdir_lib.check_workdir_config(workdir, {**resolved, "sae": {"c": 128}}, False)
  logger = trainer.MetricsLogger(workdir, tensorboard=True)
  logger.write(5, {"loss": 0.5, "fvu": 0.1, "l0": 8.0, "dead_fraction": 0.0})
  logger.write(10, {"loss": 0.25, "fvu": 0.05, "l0": 8.0, "dead_fraction": 0.0})
  logger.event(10, {"event": "preempted", "signal": "SIGTERM"})
  logger.close()
  (events,) = list((epath.Path(workdir) / "tensorboard").iterdir())
  scalars = tensorboard_events(events.read_bytes())
  assert (5, "train/loss", 0.5) in scalars and (10, "train/loss", 0.25) in scalars, scalars
  lines = [json.loads(ln) for ln in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert [ln["step"] for ln in lines] == [5, 10, 10] and lines[1]["loss"] == 0.25
  assert lines[2]["event"] == "preempted"
  out = epath.Path(workdir) / "analysis"
  out.mkdir(parents=True, exist_ok=True)
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  workdir_lib.atomic_savez(out / "a.npz", x=x, names=np.array(["p", "q", "r"]))
  workdir_lib.atomic_save_npy(out / "b.npy", x)
  with (out / "a.npz").open("rb") as f, np.load(f) as z:
    np.testing.assert_array_equal(z["x"], x)
    assert list(z["names"]) == ["p", "q", "r"]
  with (out / "b.npy").open("rb") as f:
    np.testing.assert_array_equal(np.load(f), x)
  assert sorted(p.name for p in out.iterdir()) == ["a.npz", "b.npy"]  # no temporaries left
  broken = epath.Path(workdir) / "broken.json"
  broken.write_text('{"sae": {"c"')
  with pytest.raises(SaeJaxError, match="broken.json: not valid JSON"):
    workdir_lib.read_json(broken)
  return ckpt_lib.checkpoint_dir(workdir)


def test_workdir_contract_on_a_local_path(tmp_path):
  ckpt = _exercise_workdir(str(tmp_path / "run"))
  assert str(ckpt) == str(tmp_path / "run" / "checkpoints")


def test_workdir_contract_on_an_in_memory_gcs(fake_gcs, tmp_path):
  ckpt = _exercise_workdir("gs://bucket/runs/clip")
  assert str(ckpt) == "gs://bucket/runs/clip/checkpoints"  # not os.path.abspath'd into a local path
  assert "gs://bucket/runs/clip/config.json" in fake_gcs.store  # written to the fake, not a local dir
  assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")


def test_two_processes_agree_on_the_step_when_one_is_signalled(tmp_path):
  """SIGTERM reaches one host only: both save the same step and exit 75 (the all-gathered flag)."""
  work = tmp_path / "mp"
  procs = start_two_trainers(work, 100000, ENV, stderr=subprocess.PIPE)
  _wait_for(work / "checkpoints" / "20", procs[0])
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [preemption.PREEMPTED_EXIT_CODE] * 2, (
    errs[0][-1500:] + errs[1][-1500:]
  )
  saved = [[ln for ln in e.splitlines() if ln.startswith("preempted:")] for e in errs]
  assert "SIGTERM: saved" in saved[1][0] and "peer: saved" in saved[0][0]
  step = int(saved[1][0].split("checkpoints/")[1].split(" ")[0])
  assert f"checkpoints/{step} " in saved[0][0] and step >= 20 and step % 10 == 0  # preempt_check_every
  assert _steps(work)[-1] == step
  event = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
  assert event["event"] == "preempted" and event["step"] == step
