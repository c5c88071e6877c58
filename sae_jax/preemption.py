"""Preemption: SIGTERM / SIGINT ask a run to stop at its next safe point and exit "resume me".

Schedulers preempt with SIGTERM and a grace period (TPU maintenance events, `scancel`, SLURM's
`--signal=B:TERM@120`). Inside `watch()` the first SIGTERM or SIGINT only sets a flag: training
finishes its step, saves a checkpoint at that step and exits with `PREEMPTED_EXIT_CODE`; extraction
finishes its chunk. A second signal exits at once with 128 + signal number (the previous
checkpoint, written atomically, stays valid).

On multi-process runs the signal may reach one host first, so the hosts agree on the step to stop
at: every `config.train.preempt_check_every` steps each process contributes its flag to an
all-gather and all stop if any is set. Single-process runs read the flag directly (no collective).
Install the handlers after `jax.distributed.initialize`: its own SIGTERM notifier would replace them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry". Launchers requeue on it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
  """Raised after a stage stopped cleanly on a signal; its exit status is PREEMPTED_EXIT_CODE."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


class SignalWatch:
  """The signal state of one `watch()` block: `received` (e.g. "SIGTERM") and when it came."""

  def __init__(self):
    self.received: Optional[str] = None
    self.received_at: Optional[float] = None  # time.monotonic()
    self.stopped_at: Optional[int] = None  # the step (or unit) a stage stopped after
    self.installed = False

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.received is not None:
      os.write(2, f"{signal.Signals(signum).name} again: exiting at once\n".encode())
      os._exit(128 + signum)
    self.received, self.received_at = signal.Signals(signum).name, time.monotonic()
    # os.write, not print: the handler may interrupt a print on the same stream.
    os.write(
      2,
      f"{self.received} received: stopping at the next safe point (a second signal exits at once)\n".encode(),
    )

  def stop_agreed(self, step: int, every: int = 1) -> bool:
    """Whether every process should stop after `step` (all call this at the same steps)."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % max(1, every):
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(flags))


_ACTIVE: list[SignalWatch] = []


@contextlib.contextmanager
def watch() -> Iterator[SignalWatch]:
  """Installs the SIGTERM/SIGINT handlers for the block (main thread only; elsewhere a no-op)."""
  w = SignalWatch()
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for s in SIGNALS:
      previous[s] = signal.signal(s, w._handle)
    w.installed = True
  _ACTIVE.append(w)
  try:
    yield w
  finally:
    _ACTIVE.remove(w)
    for s, h in previous.items():
      signal.signal(s, h)


def stop(message: str) -> None:
  """Prints `message` (stderr) and raises `Preempted` (exit status PREEMPTED_EXIT_CODE)."""
  print(f"preempted: {message}", file=sys.stderr, flush=True)
  raise Preempted(message)


def check(where: str) -> None:
  """Raises `Preempted` if the innermost `watch()` received a signal (single-process stages)."""
  if _ACTIVE and _ACTIVE[-1].received is not None:
    stop(
      f"{_ACTIVE[-1].received}: stopped {where}; exit status {PREEMPTED_EXIT_CODE}, re-run the same "
      "command to resume"
    )
