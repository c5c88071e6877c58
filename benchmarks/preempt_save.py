"""Signal-to-exit time of a preempted training run at d=4096, c=32768 (a 3 GB train state).

  python -m benchmarks.preempt_save                      # d=4096, c=32768, batch 256
  python -m benchmarks.preempt_save --d=1024 --c=8192    # a smaller state
  python -m benchmarks.preempt_save --allgather          # cost of the multi-host stop check

Starts `experiments.train` (synthetic source, paper preset, asynchronous checkpoints) in a
subprocess, waits until it has logged `--warm_steps` steps (compiled and running), sends SIGTERM and
times until the process exits with the preempted status (75). Prints one JSON line:
  signal_to_exit_s    SIGTERM to process exit, measured here (finish the step, save, exit)
  signal_to_saved_s   what the run logged in metrics.jsonl (signal to checkpoint on storage)
  state_bytes         params + Adam moments in memory (3 x (2dc + c + d) float32)
  checkpoint_bytes    size of the checkpoint written at the preempted step (orbax compresses)
  raw_write_s         np.save of the same number of bytes to the same filesystem, fsynced, in the
                      same run: the floor any save of this state pays on this disk
With --allgather: two jax processes (coordinator on 127.0.0.1, CPU) time the all-hosts stop check
(`SignalWatch.stop_agreed`, one int32 all-gather) that multi-process runs make every
`train.preempt_check_every` steps; prints its median and 90th percentile in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def _allgather_worker(port: int, pid: int, reps: int) -> None:
  import jax

  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  from sae_jax import preemption

  watch = preemption.SignalWatch()
  for _ in range(10):  # compile and warm the collective
    watch.stop_agreed(0)
  times = []
  for i in range(reps):
    t = time.perf_counter()
    assert not watch.stop_agreed(i * 10, 10)
    times.append(time.perf_counter() - t)
  if pid == 0:
    us = np.array(times) * 1e6
    print(
      json.dumps(
        {
          "allgather_check_us_median": round(float(np.median(us)), 1),
          "allgather_check_us_p90": round(float(np.percentile(us, 90)), 1),
          "reps": reps,
          "processes": 2,
          "load_avg_1m": os.getloadavg()[0],
        }
      ),
      flush=True,
    )
  jax.distributed.shutdown()


def _allgather(reps: int) -> None:
  import socket

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "benchmarks.preempt_save",
        f"--allgather_worker={pid}",
        f"--port={port}",
        f"--reps={reps}",
      ],
      cwd=ROOT,
      env=env,
    )
    for pid in (0, 1)
  ]
  for p in procs:
    p.wait(timeout=600)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--allgather", action="store_true")
  parser.add_argument("--allgather_worker", type=int, default=-1)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--reps", type=int, default=200)
  parser.add_argument("--d", type=int, default=4096)
  parser.add_argument("--c", type=int, default=32768)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--warm_steps", type=int, default=3)
  parser.add_argument("--dir", default="", help="parent of the workdir (default: a temporary directory)")
  args = parser.parse_args()
  if args.allgather_worker >= 0:
    return _allgather_worker(args.port, args.allgather_worker, args.reps)
  if args.allgather:
    return _allgather(args.reps)
  parent = tempfile.mkdtemp(prefix="preempt_save_", dir=args.dir or None)
  workdir = os.path.join(parent, "run")
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=configs/synthetic.py:paper",
    f"--workdir={workdir}",
    f"--config.sae.d={args.d}",
    f"--config.data.synthetic.d={args.d}",
    f"--config.sae.c={args.c}",
    "--config.sae.k=32",
    f"--config.data.batch_size={args.batch}",
    "--config.train.num_steps=1000000",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=1000000",
    "--config.train.tensorboard=False",
  ]
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 1800
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= args.warm_steps:
      break
    time.sleep(0.05)
  if proc.poll() is not None:
    raise SystemExit(f"the run ended before it was signalled: {proc.stderr.read()[-2000:]}")
  t0 = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=1800)
  signal_to_exit = time.perf_counter() - t0
  lines = [json.loads(ln) for ln in open(metrics)]
  event = lines[-1]
  if proc.returncode != 75 or event.get("event") != "preempted":
    raise SystemExit(f"expected exit 75 and a preempted line, got {proc.returncode}: {err[-2000:]}")
  ckpt = os.path.join(workdir, "checkpoints", str(event["step"]))
  nbytes = _dir_bytes(ckpt)
  # The disk's floor for the same bytes, in the same run.
  raw = np.ones(nbytes // 4, np.float32)
  t1 = time.perf_counter()
  with open(os.path.join(parent, "raw.npy"), "wb") as f:
    np.save(f, raw)
    f.flush()
    os.fsync(f.fileno())
  raw_write = time.perf_counter() - t1
  shutil.rmtree(parent, ignore_errors=True)
  print(
    json.dumps(
      {
        "d": args.d,
        "c": args.c,
        "batch": args.batch,
        "preempted_step": event["step"],
        "signal_to_exit_s": round(signal_to_exit, 2),
        "signal_to_saved_s": event["signal_to_saved_s"],
        "state_bytes": 3 * (2 * args.d * args.c + args.c + args.d) * 4,
        "checkpoint_bytes": nbytes,
        "raw_write_s": round(raw_write, 2),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
      }
    )
  )


if __name__ == "__main__":
  main()
