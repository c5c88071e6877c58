"""Faults the tests inject: an encoder that dies mid-run, and two jax processes on 127.0.0.1."""

import socket
import subprocess
import sys

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
