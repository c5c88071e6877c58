"""orbax checkpoints of a training run (loading a trained SAE for other stages: `sae_jax.workdir`).

`<workdir>/checkpoints/<step>/` holds three items:
  state  the train state pytree (params, Adam moments, step, dead-latent counters), StandardSave
  data   the grain iterator position, grain.checkpoint.CheckpointSave
  meta   JSON: step, tokens seen, the resolved SAE spec (rows skipped is a counter in `state`)
Saves are atomic (orbax writes a temporary directory and renames it), so a killed run leaves the
previous checkpoint intact. Restores take an abstract target carrying NamedShardings, so a run
saved on one mesh resumes on another. A read that fails with a storage error (a timeout, an HTTP
429/5xx or gRPC UNAVAILABLE, a permission race: `is_transient`) is retried with exponential backoff
(`config.train.restore_retries`, `restore_backoff_s`); if it persists the run stops with one line
and the checkpoint is left as it is. Any other failure is damage (a missing or truncated file, a
format error): that checkpoint is moved aside to `checkpoints/<step>.corrupt` with one warning, and
the run resumes from the newest step that restores (`restore_newest`). Paths go through
`etils.epath`, so the workdir may be local or remote (`gs://...`).
"""

from __future__ import annotations

import errno
import re
import sys
import time
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from sae_jax import preemption
from sae_jax.errors import SaeJaxError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"
# Defaults of config.train.restore_retries / restore_backoff_s (waits 2, 4, 8, 16 s: ~30 s in all).
RESTORE_RETRIES = 4
RESTORE_BACKOFF_S = 2.0

# Storage errors: the checkpoint may be intact, the storage did not answer. FileNotFoundError (a
# missing file) is damage, not one of these.
TRANSIENT_TYPES = (TimeoutError, ConnectionError, InterruptedError, BlockingIOError, PermissionError)
TRANSIENT_ERRNOS = frozenset(
  {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ESTALE}
)
# The same, as object stores and TensorStore word them (gRPC status names, HTTP status codes).
TRANSIENT_TEXT = re.compile(
  r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b|\b(?:HTTP|status|code)\W{0,3}(?:429|5\d\d)\b"
  r"|timed out|\btemporar(?:y|ily)\b",
  re.IGNORECASE,
)


class StorageError(SaeJaxError):
  """A checkpoint read kept failing with a storage error after the retries (not damage); a re-run
  may succeed, so the mains exit with `exit_code` (75, like a preemption)."""

  exit_code = preemption.PREEMPTED_EXIT_CODE


def is_transient(e: BaseException) -> bool:
  """Whether `e`, or an exception it was raised from, is a storage error worth retrying."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, TRANSIENT_TYPES) or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS):
      return True
    if not isinstance(e, FileNotFoundError) and TRANSIENT_TEXT.search(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def checkpoint_dir(workdir: str) -> epath.Path:
  """`<workdir>/checkpoints`, absolute for local paths (orbax wants one), as given for `gs://...`."""
  path = epath.Path(workdir) / CHECKPOINT_DIR
  return path if "://" in str(workdir) else epath.Path(path.absolute())


def _handlers() -> dict:
  return {
    "state": ocp.StandardCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }


def make_manager(workdir: str, train_cfg: Any = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=int(train_cfg.max_to_keep) if train_cfg is not None else None,
    enable_async_checkpointing=bool(train_cfg.async_checkpoint) if train_cfg is not None else False,
    create=True,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=_handlers(), options=options)


def _reader(manager: ocp.CheckpointManager) -> ocp.CheckpointManager:
  """Multi-process: a read-only manager of the same directory whose restores involve this process
  alone. orbax's own restore ends in barriers between all processes, and a process whose read
  failed part-way reaches a different sequence of them than the others (they would wait in one,
  or pair mismatched barriers); here each process reads its own shards of the arrays without any
  collective, and the outcome is agreed afterwards (`restore_retrying`)."""
  if jax.process_count() == 1:
    return manager
  me = jax.process_index()
  options = ocp.CheckpointManagerOptions(
    read_only=True,
    create=False,
    enable_async_checkpointing=False,
    multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}),
  )
  return ocp.CheckpointManager(manager.directory, item_handlers=_handlers(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: dict) -> None:
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta),
    ),
  )


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """A clear error when the stored arrays do not have the shapes the config implies."""
  try:
    stored = manager.item_metadata(step)["state"]
  except Exception:  # metadata is an optimisation; restore still validates
    return
  if stored is None:
    return
  stored_params = stored.get("params", {}) if hasattr(stored, "get") else {}
  for name, want in abstract_state["params"].items():
    got = stored_params.get(name) if hasattr(stored_params, "get") else None
    if got is not None and tuple(got.shape) != tuple(want.shape):
      raise SaeJaxError(
        f"checkpoint {manager.directory}/{step}: params/{name} has shape {tuple(got.shape)}, the "
        f"config implies {tuple(want.shape)} (config.sae.d / config.sae.c changed?)"
      )


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any = None
) -> tuple[Any, dict]:
  """Restores (state, meta) at `step` onto the shardings of `abstract_state`; sets `data_iter`."""
  _check_shapes(manager, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  # An imported SAE (import_overcomplete) has no data position: its stream starts at batch 0.
  if data_iter is not None and (epath.Path(manager.directory) / str(step) / "data").is_dir():
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  reader = _reader(manager)
  try:
    restored = reader.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    if is_transient(e):  # TensorStore reports storage errors as ValueError
      raise
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SaeJaxError(f"checkpoint {manager.directory}/{step} does not match the config: {first}") from None
  finally:
    if reader is not manager:
      reader.close()
  return restored["state"], dict(restored["meta"])


def _reason(e: BaseException) -> str:
  text = str(e).strip().split(" See full TensorStore details")[0]  # the rest is a C++ object repr
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


_OK, _TRANSIENT, _OTHER = 0, 1, 2


def _attempt(manager, step, abstract_state, data_iter) -> tuple[Any, Optional[BaseException], int]:
  """One `restore`: (result, error, kind) with kind _OK, _TRANSIENT (a storage error) or _OTHER."""
  try:
    return restore(manager, step, abstract_state, data_iter), None, _OK
  except Exception as e:  # noqa: BLE001 -- classified; the caller decides with the other processes
    return None, e, (_TRANSIENT if is_transient(e) else _OTHER)


def _agreed_kind(kind: int) -> tuple[int, list]:
  """Every process's attempt outcome gathered: (the outcome all act on, processes that failed).
  A storage error anywhere is retried by all; else a failure anywhere counts as a failure for all."""
  if jax.process_count() == 1:
    return kind, []
  kinds = np.asarray(multihost_utils.process_allgather(np.int32(kind))).reshape(-1)
  failed = [int(p) for p in np.flatnonzero(kinds)]
  if np.any(kinds == _TRANSIENT):
    return _TRANSIENT, failed
  return (_OTHER if failed else _OK), failed


def _prefix() -> str:
  return f"{preemption.who()}: " if jax.process_count() > 1 else ""


def _peer_cause(tag: str, failed: list, own: Optional[str]) -> str:
  """This process's cause, published for the others; or the first failed process's."""
  if jax.process_count() == 1:
    return own or ""
  if own is not None:
    preemption.publish_failure(own, tag)
    return own
  return f"process {failed[0]} failed: {preemption.read_failure(failed[0], tag)}"


def restore_retrying(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  data_iter: Any = None,
  retries: int = RESTORE_RETRIES,
  backoff_s: float = RESTORE_BACKOFF_S,
  sleep: Callable[[float], None] = time.sleep,
) -> tuple[Any, dict]:
  """`restore`, retried `retries` times (waits backoff_s, 2 backoff_s, ...) while it fails with a
  storage error (`is_transient`); then `StorageError`. Other errors are raised at once.

  Multi-process, every attempt's outcome is all-gathered: a storage error on any process makes all
  of them retry (the same count and waits), and all raise `StorageError` when the retries run out;
  any other failure on any process is raised on all of them. All restore the same step or none."""
  for attempt in range(int(retries) + 1):
    result, error, kind = _attempt(manager, step, abstract_state, data_iter)
    agreed, failed = _agreed_kind(kind)
    if agreed == _OK:
      return result
    where = f"checkpoint {manager.directory}/{step}"
    if agreed == _OTHER:
      if error is not None and jax.process_count() == 1:
        raise error
      own = _reason(error) if error is not None else None
      raise SaeJaxError(f"{where}: {_peer_cause(f'restore/{step}/{attempt}', failed, own)}") from None
    reason = _reason(error) if kind == _TRANSIENT else None
    if attempt == int(retries):
      cause = _peer_cause(f"storage/{step}", failed, reason)
      raise StorageError(
        f"{where}: reading it failed {attempt + 1} times with a storage error ({cause}); it is "
        "left as it is (it may be intact): re-run when the storage answers, or raise "
        "config.train.restore_retries"
      ) from None
    wait = float(backoff_s) * 2**attempt
    cause = reason if reason is not None else f"on process(es) {', '.join(map(str, failed))}"
    print(
      f"warning: {_prefix()}storage error reading {where} ({cause}); retry {attempt + 1} of {retries} "
      f"in {wait:g} s",
      file=sys.stderr,
      flush=True,
    )
    sleep(wait)
  raise AssertionError("unreachable")


def restore_newest(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  data_iter: Any = None,
  retries: int = RESTORE_RETRIES,
  backoff_s: float = RESTORE_BACKOFF_S,
  sleep: Callable[[float], None] = time.sleep,
) -> Optional[tuple[Any, dict, int]]:
  """(state, meta, step) of the newest checkpoint that restores, or None when there is none.

  Storage errors are retried (`restore_retrying`); one that persists raises `StorageError` and
  moves nothing. A newer checkpoint that fails otherwise while an older one restores was damaged
  (truncated or partial files): it is moved aside to `<step>.corrupt` (never deleted) with one
  warning line. When no step restores, the newest step's error is raised (a config mismatch fails
  on every step). Multi-process, every decision is agreed (`restore_retrying`): all processes
  resume from the same step, or all stop with the same error.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failed: list[tuple[int, BaseException]] = []
  for step in steps:
    try:
      state, meta = restore_retrying(manager, step, abstract_state, data_iter, retries, backoff_s, sleep)
    except StorageError:
      raise
    except Exception as e:  # noqa: BLE001 -- any other failure to read a step makes it a fall-back candidate
      failed.append((step, e))
      continue
    if failed:
      _move_aside(manager, failed, step)
    return state, meta, step
  if failed:
    raise failed[0][1]
  return None


def _move_aside(manager: ocp.CheckpointManager, failed: list, restored: int) -> None:
  directory = epath.Path(manager.directory)
  if jax.process_index() == 0:
    for step, e in failed:
      target = directory / f"{step}{CORRUPT_SUFFIX}"
      n = 1
      while target.exists():  # an earlier fall-back already used the name
        target, n = directory / f"{step}{CORRUPT_SUFFIX}{n}", n + 1
      (directory / str(step)).rename(target)
      print(
        f"warning: checkpoint {directory}/{step} does not restore ({_reason(e)}); moved to {target}, "
        f"resuming from step {restored}",
        file=sys.stderr,
        flush=True,
      )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sae_jax_checkpoint_move_aside")
  manager.reload()
