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

Other failures are agreed the same way (`agree`, `StopSignal.poll`): a process that fails for a
reason of its own (a bad config value or an unreadable file on its host, a storage error, a data
error mid-run) publishes one line through the coordination service's key-value store and reports a
code to the next all-gather every process reaches; then every process stops with the same exit
status (`PREEMPTED_EXIT_CODE` where a re-run should resume, `FAILED_EXIT_CODE` otherwise) and one
`error:` line naming itself and the process that failed (`Stopped`). A process that dies outright
is noticed by the next collective (`lost_peer_exit`) or by the coordination service's heartbeat
(`config.mesh.heartbeat_timeout_s`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from typing import Iterator, Optional

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # global_state.client: no public accessor in 0.10
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry". Launchers requeue on it.
PREEMPTED_EXIT_CODE = 75
FAILED_EXIT_CODE = 1  # re-running the same command will not help
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
  """Raised after a stage stopped cleanly on a signal; its exit status is PREEMPTED_EXIT_CODE."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


class Stopped(SystemExit):
  """Every process of a run stops with `code` after one of them failed; `message` is this process's
  one line (printed by `fail`)."""

  def __init__(self, code: int, message: str):
    super().__init__(code)
    self.message = message

  def __str__(self) -> str:
    return self.message


def exit_code_of(e: BaseException) -> int:
  """PREEMPTED_EXIT_CODE for what a re-run resumes from (a signal, a storage error: errors with
  `exit_code = 75`), FAILED_EXIT_CODE otherwise."""
  if isinstance(e, SystemExit) and isinstance(e.code, int):
    return e.code
  return int(getattr(e, "exit_code", FAILED_EXIT_CODE))


def who() -> str:
  """ "process p of n" (names this process in multi-process lines)."""
  return f"process {jax.process_index()} of {jax.process_count()}"


def fail(code: int, message: str) -> None:
  """Prints `error: message` (stderr) and raises `Stopped(code, message)`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise Stopped(code, message) from None


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------- agreement between processes

_FAILURE_KEY = "sae_jax/failure/{}"
MESSAGE_WAIT_MS = 10_000  # a peer's line is set before its code is gathered; this only bounds a bug


def _client():
  """The coordination service's client (its key-value store), None before jax.distributed starts."""
  return jax_distributed.global_state.client


def publish_failure(message: str, tag: str = "run") -> None:
  """Puts this process's one-line cause where the others read it (once per `tag` and process)."""
  client = _client()
  if client is not None:
    try:
      client.key_value_set(_FAILURE_KEY.format(f"{tag}/{jax.process_index()}"), message)
    except Exception:  # noqa: BLE001 -- set already (a second failure): the first cause stands
      pass


def read_failure(process: int, tag: str = "run") -> str:
  """The cause process `process` published ("the cause is in its log" when it cannot be read)."""
  client = _client()
  try:
    return client.blocking_key_value_get(_FAILURE_KEY.format(f"{tag}/{process}"), MESSAGE_WAIT_MS)
  except Exception:  # noqa: BLE001 -- the peer died after reporting its code
    return "the cause is in its log"


def stop_together(codes: np.ndarray, own: Optional[str]) -> None:
  """Raises `Stopped` on every process when any entry of the all-gathered `codes` (one per process)
  is non-zero: FAILED_EXIT_CODE if any process reported it, else PREEMPTED_EXIT_CODE. `own`: this
  process's cause, when it failed itself."""
  codes = np.asarray(codes).reshape(-1)
  failed = [int(p) for p in np.flatnonzero(codes)]
  if not failed:
    return
  code = FAILED_EXIT_CODE if np.any(codes == FAILED_EXIT_CODE) else PREEMPTED_EXIT_CODE
  first = failed[0]
  if own is not None:
    line = f"{who()}: {own}"
  else:
    line = f"{who()}: stopped because process {first} failed: {read_failure(first)}"
  fail(code, f"{line} (exit status {code}{', re-run the same command to resume' if code != 1 else ''})")


def agree(error: Optional[BaseException]) -> None:
  """Called by every process at the same point with the exception it met there (None: none): if
  any process met one, every process raises `Stopped` with the same exit status (multi-process
  only; a single process re-raises `error`)."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  own = first_line(error) if error is not None else None
  if own is not None:
    publish_failure(own)
  code = exit_code_of(error) if error is not None else 0
  stop_together(multihost_utils.process_allgather(np.int32(code)), own)


def agreed(fn):
  """`fn()` run on every process; if it raises on any of them, every process stops (`agree`)."""
  try:
    result, error = fn(), None
  except Exception as e:  # noqa: BLE001 -- agreed, then re-raised or turned into Stopped
    result, error = None, e
  agree(error)
  return result


# How jax words a collective whose peer is gone (Gloo on CPU, NCCL/ICI and the coordination service
# elsewhere), e.g. "Gloo all-reduce failed: ... Connection reset by peer".
PEER_LOST_TEXT = re.compile(
  r"Gloo|NCCL|Connection (?:reset|refused|closed)|Socket closed|heartbeat|\bUNAVAILABLE\b|"
  r"DEADLINE_EXCEEDED|coordination service|barrier",
  re.IGNORECASE,
)


def is_peer_lost(e: BaseException) -> bool:
  return isinstance(e, jax.errors.JaxRuntimeError) and bool(PEER_LOST_TEXT.search(str(e)))


@contextlib.contextmanager
def lost_peer_exit() -> Iterator[None]:
  """Multi-process: a collective that fails because another process died (killed, OOM, host lost)
  ends this process at once with one line and PREEMPTED_EXIT_CODE (a re-run resumes from the last
  checkpoint). It exits by os._exit: a normal exit would wait in the coordination service's
  shutdown barrier for the dead process, then abort natively."""
  try:
    yield
  except Exception as e:
    if jax.process_count() == 1 or not is_peer_lost(e):
      raise
    sys.stdout.flush()
    os.write(
      2,
      f"error: {who()}: a collective failed, another process is gone ({first_line(e)[:300]}); exit "
      f"status {PREEMPTED_EXIT_CODE}, re-run the same command to resume from the last checkpoint\n".encode(),
    )
    os._exit(PREEMPTED_EXIT_CODE)


class SignalWatch:
  """The signal state of one `watch()` block: `received` (e.g. "SIGTERM") and when it came."""

  def __init__(self):
    self.received: Optional[str] = None
    self.received_at: Optional[float] = None  # time.monotonic()
    self.stopped_at: Optional[int] = None  # the step (or unit) a stage stopped after
    self.installed = False
    self.failure: Optional[str] = None  # this process's own failure, held until the next agreement
    self.failure_code = 0

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

  def fail_at_next_agreement(self, e: BaseException) -> None:
    """Multi-process: holds this process's failure `e` (e.g. an unreadable shard) until the next
    `stop_agreed`, where every process stops with it; the caller keeps reaching the collectives
    meanwhile (with data that is never saved)."""
    if self.failure is None:
      self.failure, self.failure_code = first_line(e), exit_code_of(e)
      publish_failure(self.failure)

  def stop_agreed(self, step: int, every: int = 1, force: bool = False) -> bool:
    """Whether every process should stop after `step` for a signal (all call this at the same
    steps; `force`: agree at this step whatever `every` says, e.g. before a save). A failure held by
    `fail_at_next_agreement` on any process raises `Stopped` on every process instead."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % max(1, every) and not force:
      return False
    flags = multihost_utils.process_allgather(
      np.array([self.received is not None, self.failure_code], np.int32)
    ).reshape(-1, 2)
    stop_together(flags[:, 1], self.failure)
    # Signals are acted on at multiples of `every` only (a forced agreement checks failures).
    return bool(np.any(flags[:, 0])) and step % max(1, every) == 0


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
