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
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

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
  """A checkpoint read kept failing with a storage error after the retries (not damage)."""


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


def make_manager(workdir: str, train_cfg: Any = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=int(train_cfg.max_to_keep) if train_cfg is not None else None,
    enable_async_checkpointing=bool(train_cfg.async_checkpoint) if train_cfg is not None else False,
    create=True,
  )
  handlers = {
    "state": ocp.StandardCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers, options=options)


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
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    if is_transient(e):  # TensorStore reports storage errors as ValueError
      raise
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SaeJaxError(f"checkpoint {manager.directory}/{step} does not match the config: {first}") from None
  return restored["state"], dict(restored["meta"])


def _reason(e: BaseException) -> str:
  text = str(e).strip().split(" See full TensorStore details")[0]  # the rest is a C++ object repr
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


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
  storage error (`is_transient`); then `StorageError`. Other errors are raised at once."""
  for attempt in range(int(retries) + 1):
    try:
      return restore(manager, step, abstract_state, data_iter)
    except Exception as e:  # noqa: BLE001 -- classified below; anything not transient is re-raised
      if not is_transient(e):
        raise
      if attempt == int(retries):
        raise StorageError(
          f"checkpoint {manager.directory}/{step}: reading it failed {attempt + 1} times with a storage "
          f"error ({_reason(e)}); it is left as it is (it may be intact): re-run when the storage "
          "answers, or raise config.train.restore_retries"
        ) from None
      wait = float(backoff_s) * 2**attempt
      print(
        f"warning: storage error reading checkpoint {manager.directory}/{step} ({_reason(e)}); retry "
        f"{attempt + 1} of {retries} in {wait:g} s",
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
  on every step).
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
