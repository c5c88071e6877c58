"""A multi-process run never hangs: one failure ends every process with one code and one line.

Real processes of `experiments.train` on 127.0.0.1 (jax.distributed on CPU, 2 devices each). Every
test bounds the wall time of the processes itself and asserts their exit codes; the bound given to
`wait_all` only kills a broken build's hang, it is never what ends a passing run.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sae_jax import preemption
from sae_jax.data import shards as shards_lib
from tests.conftest import ROOT
from tests.helpers.faults import start_processes, wait_all
from tests.helpers.states import assert_identical, checkpoint_state

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
# configs/synthetic.py:tiny: 60 steps of 256 rows, a checkpoint and a log line every 20 steps.
TRAIN = ["--config=configs/synthetic.py:tiny", "--config.train.tensorboard=False"]
# Adam's learning rate ramps up linearly (warmup over 10^6 steps: lr 300 * step): finite through
# the checkpoint at step 20, NaN/Inf a few steps later.
DIVERGING = ["--config.optim.lr=3e8", "--config.optim.warmup_steps=1000000"]
EXIT_BOUND_S = 60  # every process ends within this after the fault


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _errors(err):
  return [ln for ln in err.splitlines() if ln.startswith("error:")]


def _train(workdir, n, *flags, module="experiments.train", env=ENV, per_process=None):
  return start_processes(module, [*TRAIN, f"--workdir={workdir}", *flags], n, env, per_process)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted two-process run of 60 steps (checkpoints 20, 40, 60)."""
  work = tmp_path_factory.mktemp("pod") / "reference"
  codes, errs, _ = wait_all(_train(work, 2), 300)
  assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  return work


# ------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("n", [1, 2])
def test_a_diverging_learning_rate_stops_every_process_at_the_first_nonfinite_step(tmp_path, n):
  work = tmp_path / "w"
  if n == 1:
    t0 = time.monotonic()
    r = subprocess.run(
      [sys.executable, "-m", "experiments.train", *TRAIN, f"--workdir={work}", *DIVERGING],
      cwd=ROOT,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=300,
    )
    codes, errs, seconds = [r.returncode], [r.stderr], time.monotonic() - t0
  else:
    codes, errs, seconds = wait_all(_train(work, n, *DIVERGING), 300)
  assert codes == [preemption.FAILED_EXIT_CODE] * n, errs[-1][-2000:]
  lines = [_errors(e) for e in errs]
  assert all(len(ls) == 1 for ls in lines), lines
  steps = {int(re.search(r"not finite at step (\d+)", ls[0]).group(1)) for ls in lines}
  (step,) = steps  # all processes name the same step
  assert 20 < step < 40, lines
  for p, (line,) in enumerate(lines):
    assert f"the newest checkpoint, {work}/checkpoints/20, is finite and kept" in line
    assert "config.optim.lr=3e+08 is too high" in line
    if n > 1:
      assert line.startswith(f"error: process {p} of {n}: training diverged")
  assert _steps(work) == [20]  # nothing saved past the last finite step
  state = checkpoint_state(work)
  assert all(np.isfinite(v).all() for v in state.values())
  records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [20]  # the diverged window is not logged
  assert seconds < 300


# --------------------------------------------------------------------- restore, data, config


def test_a_persistent_restore_error_on_one_process_stops_all_with_75_then_resumes(reference, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  shutil.rmtree(work / "checkpoints" / "60")  # as if the run had stopped after step 40
  fault = {
    **ENV,
    "SAE_JAX_FAULT_PROCESS": "1",
    "SAE_JAX_FAULT_UNDER": str(work / "checkpoints" / "40"),
  }
  retry = ["--config.train.restore_retries=2", "--config.train.restore_backoff_s=0.5"]
  codes, errs, seconds = wait_all(
    _train(work, 2, *retry, module="tests.helpers.faulty_train", env=fault), EXIT_BOUND_S + 60
  )
  assert codes == [preemption.PREEMPTED_EXIT_CODE] * 2, errs[0][-2000:] + errs[1][-2000:]
  lines = [_errors(e) for e in errs]
  assert all(len(ls) == 1 for ls in lines), lines
  assert lines[1][0].startswith("error: process 1 of 2: checkpoint ") and "read timed out" in lines[1][0]
  assert lines[0][0].startswith("error: process 0 of 2: checkpoint ") and "process 1 failed" in lines[0][0]
  assert all("reading it failed 3 times with a storage error" in ls[0] for ls in lines)
  assert errs[0].count("retry ") == 2 and errs[1].count("retry ") == 2  # the same retries on both
  assert _steps(work) == [20, 40] and not list((work / "checkpoints").glob("*.corrupt"))
  # The fault cleared, the same command resumes at the agreed step and ends where an
  # uninterrupted run does.
  codes, errs, _ = wait_all(_train(work, 2), 300)
  assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  assert_identical(checkpoint_state(work), checkpoint_state(reference))
  assert seconds < EXIT_BOUND_S


def test_a_damaged_newest_checkpoint_falls_back_on_every_process_to_the_same_step(reference, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(reference, work)
  victim = max((work / "checkpoints" / "60" / "state").rglob("*"), key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:
    f.truncate(100)
  codes, errs, _ = wait_all(_train(work, 2), 300)
  assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  warnings = [ln for e in errs for ln in e.splitlines() if "does not restore" in ln]
  assert len(warnings) == 1 and "resuming from step 40" in warnings[0], warnings  # process 0 moves it
  assert (work / "checkpoints" / "60.corrupt").is_dir() and _steps(work)[-1] == 60
  assert_identical(
    checkpoint_state(work), checkpoint_state(reference)
  )  # steps 41-60 re-run give the same state


def test_a_config_value_that_differs_on_one_process_stops_all_and_names_the_field(tmp_path):
  t0 = time.monotonic()
  codes, errs, _ = wait_all(
    _train(tmp_path / "w", 2, per_process=lambda p: ["--config.optim.lr=0.001"] if p == 1 else []),
    EXIT_BOUND_S + 60,
  )
  seconds = time.monotonic() - t0
  assert codes == [preemption.FAILED_EXIT_CODE] * 2, errs[0][-2000:] + errs[1][-2000:]
  lines = [_errors(e) for e in errs]
  assert all(len(ls) == 1 for ls in lines), lines
  field = "optim.lr=0.001 (process 0: 0.004)"
  assert lines[1][0].startswith(f"error: process 1 of 2: its config differs from process 0's in {field}")
  assert lines[0][0].startswith("error: process 0 of 2: stopped because process 1 failed: its config")
  assert field in lines[0][0]
  assert not (tmp_path / "w" / "checkpoints").exists() or _steps(tmp_path / "w") == []
  assert seconds < EXIT_BOUND_S


def _write_shards(directory, rows=4096, d=32):
  rng = np.random.default_rng(0)
  writer = shards_lib.ShardWriter(str(directory), d, "float32", rows_per_shard=1024)
  writer.add(rng.standard_normal((rows, d)).astype(np.float32))
  writer.close()
  return sorted(p for p in os.listdir(directory) if p.endswith(".npy"))


def test_an_unreadable_shard_on_one_process_stops_all_and_names_the_file(tmp_path):
  good, bad = tmp_path / "shards", tmp_path / "shards-host1"
  names = _write_shards(good)
  shutil.copytree(good, bad)  # host 1 sees its own copy of the store, with one shard cut short
  victim = bad / names[1]
  with open(victim, "r+b") as f:
    f.truncate(200)
  flags = ["--config.data.source=shards", "--config.sae.d=32", "--config.data.batch_size=64"]
  t0 = time.monotonic()
  codes, errs, _ = wait_all(
    _train(
      tmp_path / "w",
      2,
      *flags,
      per_process=lambda p: [f"--config.data.shard_dir={bad if p == 1 else good}"],
    ),
    EXIT_BOUND_S + 60,
  )
  seconds = time.monotonic() - t0
  assert codes == [preemption.FAILED_EXIT_CODE] * 2, errs[0][-2000:] + errs[1][-2000:]
  lines = [_errors(e) for e in errs]
  assert all(len(ls) == 1 for ls in lines), lines
  assert lines[1][0].startswith("error: process 1 of 2: ") and str(victim) in lines[1][0]
  assert lines[0][0].startswith("error: process 0 of 2: stopped because process 1 failed: ")
  assert str(victim) in lines[0][0]
  assert not (tmp_path / "w" / "checkpoints").exists() or _steps(tmp_path / "w") == []
  assert seconds < EXIT_BOUND_S


def test_a_read_error_mid_run_on_one_process_stops_all_before_the_next_save(tmp_path):
  """The error comes from grain's reader threads on process 1 after 30 batches: it feeds masked
  batches until the next agreement (a log, checkpoint or preempt check) and all stop there."""
  shard_dir = tmp_path / "shards"
  _write_shards(shard_dir)
  work = tmp_path / "w"
  fault = {**ENV, "SAE_JAX_FAULT_PROCESS": "1", "SAE_JAX_FAULT_DATA_AFTER": "30"}
  flags = [
    "--config.data.source=shards",
    f"--config.data.shard_dir={shard_dir}",
    "--config.sae.d=32",
    "--config.data.batch_size=64",
    "--config.train.num_steps=100000",
    "--config.mesh.heartbeat_timeout_s=10",
  ]
  t0 = time.monotonic()
  codes, errs, _ = wait_all(_train(work, 2, *flags, module="tests.helpers.faulty_train", env=fault), 300)
  seconds = time.monotonic() - t0
  assert codes == [preemption.FAILED_EXIT_CODE] * 2, errs[0][-2000:] + errs[1][-2000:]
  lines = [_errors(e) for e in errs]
  assert all(len(ls) == 1 for ls in lines), lines
  victim = str(shard_dir / "shard-00001.npy")
  assert lines[1][0].startswith("error: process 1 of 2: data: ") and victim in lines[1][0], lines
  assert lines[0][0].startswith("error: process 0 of 2: stopped because process 1 failed: data: ")
  assert victim in lines[0][0] and "Input/output error" in lines[0][0]
  # grain reads ahead, so the error surfaces a few steps before batch 30 is trained on; the
  # checkpoint at 20 stays the newest (the failing window is never saved).
  assert _steps(work) == [20]
  assert seconds < 300


# ----------------------------------------------------------------------------- a lost process


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkill_of_one_process_ends_the_others_then_a_restart_resumes_bit_identical(
  reference, tmp_path, victim
):
  work = tmp_path / "w"
  heartbeat = 10
  procs = _train(work, 2, "--config.train.num_steps=100000", f"--config.mesh.heartbeat_timeout_s={heartbeat}")
  deadline = time.monotonic() + 300
  while not (work / "checkpoints" / "20").exists() and time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    time.sleep(0.05)
  procs[victim].send_signal(signal.SIGKILL)
  t0 = time.monotonic()
  codes, errs, _ = wait_all(procs, heartbeat + EXIT_BOUND_S)
  seconds = time.monotonic() - t0
  survivor = 1 - victim
  assert codes[victim] == -signal.SIGKILL
  # The survivor's next collective fails (Gloo: connection reset) and it exits 75 with one line at
  # once; or, when it waits where only the coordination service notices (a rendezvous or barrier
  # through its key-value store), at the heartbeat timeout: 75 with the line if the wait raises,
  # else jax ends the process natively (SIGABRT). Process 0 hosts the service, so losing it ends
  # process 1 natively at once.
  assert codes[survivor] in (preemption.PREEMPTED_EXIT_CODE, -signal.SIGABRT), errs[survivor][-2000:]
  if codes[survivor] == preemption.PREEMPTED_EXIT_CODE:
    (line,) = _errors(errs[survivor])
    assert line.startswith(f"error: process {survivor} of 2: a collective failed, another process is gone")
  assert seconds < heartbeat + EXIT_BOUND_S
  # A restart of the same command resumes from the last checkpoint and ends where an
  # uninterrupted run does.
  codes, errs, _ = wait_all(_train(work, 2), 300)
  assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  assert_identical(checkpoint_state(work), checkpoint_state(reference))


# ---------------------------------------------------------------------------------- extraction


def test_a_failed_extraction_part_leaves_the_others_to_finish_and_a_rerun_merges(coco_mini, tmp_path):
  """Extraction parts share no collective: a part that fails exits on its own (1, one line), the
  others finish their parts and exit 0 without waiting, and re-running the failed part merges."""
  work = tmp_path / "w"
  env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
  base = [
    sys.executable,
    "-m",
    "experiments.extract",
    "--config=configs/clip_coco.py:tiny",
    f"--workdir={work}",
    "--config.extract.max_images=4",
    "--config.extract.chunk_size=1",
    "--config.extract.process_count=2",
  ]
  procs = [
    subprocess.Popen(
      [*base, f"--config.extract.process_index={p}", *(["--config.extract.layer=99"] if p == 1 else [])],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p in (0, 1)
  ]
  out = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 1], out[1][1][-2000:]
  (line,) = _errors(out[1][1])
  assert "config.extract.layer=99" in line
  assert "part 0 of 2" in out[0][0] and "merged by the last of the 2 processes" in out[0][0]
  act = work / "activations"
  assert not (act / "summary.json").exists()
  r = subprocess.run(
    [*base, "--config.extract.process_index=1"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((act / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["counts"]["images"] == 4
