"""Faults the tests inject: an encoder that dies mid-run, and jax processes on 127.0.0.1."""

import socket
import subprocess
import sys
import time

from tests.helpers.env import ROOT


class Crash(Exception):
  """Raised by `CrashingEncoder` (stands for a killed process)."""


class CrashingEncoder:
  """Delegates to a real encoder and raises `Crash` after `n` forward passes."""

  def __init__(self, enc, n):
    self._enc, self._n = enc, n

  def forward(self, prepared):
    self._n -= 1
    if self._n < 0:
      raise Crash()
    return self._enc.forward(prepared)

  def __getattr__(self, name):
    return getattr(self._enc, name)


def start_two_trainers(work, steps: int, env: dict, stderr=subprocess.STDOUT) -> list:
  """Two `tests.helpers.run_multiprocess` processes (2 CPU devices each) sharing a coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "tests.helpers.run_multiprocess",
        str(work),
        str(port),
        "2",
        str(pid),
        str(steps),
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=stderr,
      text=True,
    )
    for pid in (0, 1)
  ]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(module: str, args: list, n: int, env: dict, per_process=None) -> list:
  """`n` processes of `python -m module args` forming one jax.distributed run (coordinator on
  127.0.0.1, 2 CPU devices each); `per_process(p)` adds flags to process p. stdout and stderr
  are pipes (text)."""
  port = free_port()
  env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = []
  for p in range(n):
    mesh = [
      "--config.mesh.multihost=True",
      f"--config.mesh.coordinator_address=127.0.0.1:{port}",
      f"--config.mesh.num_processes={n}",
      f"--config.mesh.process_id={p}",
    ]
    extra = list(per_process(p)) if per_process else []
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", module, *args, *mesh, *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return procs


def wait_all(procs: list, bound_s: float) -> tuple[list, list, float]:
  """Waits for every process; (exit codes, stderr texts, seconds until the last one ended). A
  process still running after `bound_s` is killed and the test fails on its code (-9): the code
  under test must end by its own timeouts, this bound only keeps a broken build from hanging."""
  t0 = time.monotonic()
  errs = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=max(1.0, bound_s - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
    errs.append(err)
  return [p.returncode for p in procs], errs, time.monotonic() - t0
