"""`train_and_evaluate(config, workdir)`: trains (or resumes) an SAE, logs, checkpoints, evaluates.

The state and optimizer are in `sae_jax.training.state`, the jitted step in `sae_jax.training.step`,
checkpoints in `sae_jax.training.checkpoint`; this module runs the loop around them.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
from etils import epath
from jax.experimental import multihost_utils

from sae_jax import preemption
from sae_jax import sae as sae_lib
from sae_jax import sharding as shard_lib
from sae_jax import workdir as workdir_lib
from sae_jax.data import pipeline
from sae_jax.data.synthetic import PlantedSource
from sae_jax.errors import SaeJaxError
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib
from sae_jax.training import step as step_lib


def _data_sample(fn: Callable[[int], np.ndarray], rows: int, batch_size: int) -> np.ndarray:
  # Batches far ahead in the stream so init does not peek at what step 0 trains on.
  n = max(1, -(-rows // batch_size))
  sample = np.concatenate([fn(10**9 + i) for i in range(n)])[:rows]
  return sample[np.isfinite(sample).all(axis=1)]


def evaluate_reconstruction(
  params: sae_lib.Params,
  spec: sae_lib.SAESpec,
  config: Any,
  fn: Callable[[int], np.ndarray],
  num_batches: int = 4,
) -> dict:
  """Held-out reconstruction (batches far from the training stream) and, for the planted
  source, how well the dictionary recovers the ground-truth atoms."""
  if not all(x.is_fully_addressable for x in jax.tree.leaves(params)):
    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.device_get(params)
  params = {**params, "D": np.asarray(sae_lib.normalize_rows(params["D"]))}
  x = np.concatenate([fn(2 * 10**9 + i) for i in range(num_batches)])
  x = x[np.isfinite(x).all(axis=1)]
  _, out = jax.jit(sae_lib.loss_fn, static_argnums=2)(params, jnp.asarray(x), spec)
  ev = sae_lib.explained_variance(jnp.asarray(x), out.x_hat)
  result = {
    "eval_fvu": float(ev["fvu"]),
    "eval_r2_overcomplete": float(ev["r2_overcomplete"]),
    "eval_rows": int(x.shape[0]),
  }
  if config.data.source == "synthetic":
    truth = PlantedSource(config.data.synthetic).dictionary
    result["planted_mean_max_cos"] = float((truth @ params["D"].T).max(axis=1).mean())
  return result


class _ObjectEventFile:
  """A TensorBoard event file on an object store (gs://...): objects cannot be appended to, so
  each flush rewrites the object with everything written so far (a few KB per logged step)."""

  def __init__(self, path: str):
    self.path, self.data = epath.Path(path), bytearray()

  def write(self, data: bytes) -> None:
    self.data += data

  def flush(self) -> None:
    self.path.write_bytes(bytes(self.data))

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX writer factory routing a scheme (gs, s3) through etils.epath like the workdir."""

  def open(self, path: str) -> _ObjectEventFile:
    return _ObjectEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer(logdir: str, purge_step: Optional[int] = None) -> tensorboardX.SummaryWriter:
  """`purge_step`: TensorBoard hides the earlier files' events at this step and later (a resumed
  run re-logs them), through the SessionLog.START event tensorboardX writes first."""
  if workdir_lib.is_remote(logdir):
    tensorboardX.record_writer.register_writer_factory(logdir.split(":")[0], _EpathEventFiles())
  return tensorboardX.SummaryWriter(logdir, purge_step=purge_step)


class MetricsLogger:
  """metrics.jsonl, a live progress line, TensorBoard event files and, when `train_cfg.wandb_project`
  is set, the same scalars and the resolved `run_config` in Weights & Biases (process 0 only).

  `resume_step`: the step the run restarts from. A run resumed from an older checkpoint than the
  newest logged step (a damaged or removed newest checkpoint) re-runs the steps in between; each
  step stays logged once: metrics.jsonl is cut back to `resume_step` (atomic rewrite), TensorBoard
  hides the earlier events past it (`purge_step`), and W&B, whose history only grows, is sent only
  the steps past the highest one logged before (the re-run steps give the same values: resumes are
  bit-identical)."""

  def __init__(
    self,
    workdir: str,
    tensorboard: bool,
    train_cfg: Any = None,
    run_config: Optional[dict] = None,
    resume_step: int = 0,
  ):
    self.enabled = jax.process_index() == 0
    self.wandb_run = None
    if self.enabled and train_cfg is not None and str(train_cfg.wandb_project):
      self.wandb_run = _start_wandb(workdir, train_cfg, run_config or {})
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.logged_through = cut_back_metrics(self.path, int(resume_step)) if self.enabled else 0
    self.writer = None
    if self.enabled and tensorboard:
      purge = int(resume_step) + 1 if self.logged_through > int(resume_step) else None
      self.writer = _summary_writer(os.path.join(workdir, "tensorboard"), purge_step=purge)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    workdir_lib.append_text(self.path, json.dumps(record) + "\n")
    if self.writer is not None:
      for k, v in metrics.items():
        self.writer.add_scalar(f"train/{k}", float(v), step)
      self.writer.flush()
    if self.wandb_run is not None and step > self.logged_through:
      self.wandb_run.log({f"train/{k}": float(v) for k, v in metrics.items()}, step=int(step))
    print(
      f"step {step:>7d} | {metrics.get('tokens_per_s', 0):>9.0f} tok/s | loss {metrics['loss']:.5f} "
      f"| FVU {metrics['fvu']:.4f} | L0 {metrics['l0']:.1f} | dead {100 * metrics['dead_fraction']:.1f}%",
      flush=True,
    )

  def event(self, step: int, record: dict) -> None:
    """A non-metric line of metrics.jsonl (e.g. {"event": "preempted", ...})."""
    if self.enabled:
      workdir_lib.append_text(self.path, json.dumps({"step": int(step), **record}) + "\n")

  def close(self):
    if self.writer is not None:
      self.writer.close()
    if self.wandb_run is not None:
      self.wandb_run.finish()
      self.wandb_run = None


def cut_back_metrics(path: Any, step: int) -> int:
  """Drops the lines of metrics.jsonl at `path` past `step` (and a line a kill cut short), by an
  atomic rewrite; returns the highest step the file held (0 when absent)."""
  path = epath.Path(path)
  if not path.exists():
    return 0
  kept, dropped, highest = [], 0, 0
  for line in path.read_text().splitlines():
    try:
      at = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    highest = max(highest, at)
    if at <= step:
      kept.append(line + "\n")
    else:
      dropped += 1
  if dropped:
    workdir_lib.atomic_write_text(path, "".join(kept))
    print(f"{path}: dropped {dropped} line(s) past step {step}, the step this run resumes from", flush=True)
  return highest


WANDB_ID_FILE = "wandb_run_id"


def _start_wandb(workdir: str, train_cfg: Any, run_config: dict) -> Any:
  """A W&B run named after the workdir; a resumed training run continues the same W&B run (its id
  is kept in `<workdir>/wandb_run_id`)."""
  mode = str(train_cfg.wandb_mode)
  if mode not in ("", "online", "offline"):
    raise SaeJaxError(f"config.train.wandb_mode={mode!r}: expected '' ($WANDB_MODE), 'online' or 'offline'")
  try:
    import wandb  # the `wandb` extra
  except ImportError:
    raise SaeJaxError(
      "config.train.wandb_project is set but wandb is not installed (pip install 'sae-jax[wandb]')"
    ) from None
  local = "://" not in str(workdir)  # W&B writes its files locally; a gs:// workdir keeps them in ./wandb
  id_path = os.path.join(workdir, WANDB_ID_FILE)
  if local and os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = secrets.token_hex(6)
    if local:
      workdir_lib.atomic_write_text(id_path, run_id + "\n")
  try:
    return wandb.init(
      project=str(train_cfg.wandb_project),
      entity=str(train_cfg.wandb_entity) or None,
      name=os.path.basename(os.path.abspath(workdir)) if local else None,
      id=run_id,
      resume="allow",
      dir=workdir if local else None,
      config=run_config,
      mode=mode or None,
    )
  except Exception as e:  # noqa: BLE001 -- wandb raises several types (no API key, no network, bad entity)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SaeJaxError(
      f"config.train.wandb_project={train_cfg.wandb_project!r}: W&B did not start ({reason}); "
      "log in (wandb login) or set config.train.wandb_mode=offline"
    ) from None


def _put_batch(local: np.ndarray, sharding) -> jax.Array:
  """This process's rows (a contiguous slice of the global batch) as a global sharded array."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


class _Run:
  """What the loop needs, built once from the config: spec, mesh, optimizer, shardings, data."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    self.spec = sae_lib.spec_from_config(config.sae)
    width = pipeline.data_width(config)
    if width != self.spec.d:
      raise SaeJaxError(
        f"config.sae.d={self.spec.d} but config.data.source={config.data.source!r} yields "
        f"rows of width {width}"
      )
    self.num_steps = int(config.train.num_steps)
    self.batch_size = int(config.data.batch_size)
    self.resolved = workdir_lib.resolved_config_dict(config, self.spec)
    self.mesh = shard_lib.make_mesh(config.mesh)
    self.shard_optimizer = bool(config.mesh.shard_optimizer)
    shard_lib.check_divisible(self.mesh, self.batch_size, self.spec.c, self.spec.d, self.shard_optimizer)
    self.optimizer = state_lib.make_optimizer(config.optim, self.num_steps)
    abstract = state_lib.abstract_state(self.spec, config)
    self.state_sharding = shard_lib.state_shardings(abstract, self.mesh, self.shard_optimizer)
    self.abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_sharding
    )
    self.global_batches = pipeline.batch_fn(config)  # init and evaluation: same on every host
    # Training rows stay in the shards' dtype (bf16) until the device; checked in grain's threads;
    # data.device_prefetch batches are transferred ahead of the step.
    local_fn = pipeline.batch_fn(config, jax.process_index(), jax.process_count(), True)
    rows, valid = shard_lib.batch_sharding(self.mesh), shard_lib.rows_sharding(self.mesh)
    self.put = lambda e: (jnp.asarray(_put_batch(e[0], rows), jnp.float32), _put_batch(e[1], valid))
    self.data_iter = pipeline.DeviceFeed(
      iter(pipeline.make_checked_dataset(config, local_fn, self.spec.d)),
      self.put,
      int(config.data.device_prefetch),
    )
    self._blank = None

  def next_batch(self, watch: preemption.SignalWatch) -> tuple[jax.Array, jax.Array]:
    """The next (batch, valid) on the device. Multi-process, a read error here is held for the
    next agreement (`watch.fail_at_next_agreement`) and this process feeds all-masked batches
    until then, so the others are not left waiting in the step's collectives; nothing trained
    on them is saved or logged."""
    if watch.failure is None:
      try:
        return next(self.data_iter)
      except Exception as e:  # noqa: BLE001 -- agreed with the other processes at the next check
        if jax.process_count() == 1:
          raise
        watch.fail_at_next_agreement(SaeJaxError(f"data: {preemption.first_line(e)}"))
    if self._blank is None:
      local = self.batch_size // jax.process_count()
      self._blank = self.put((np.zeros((local, self.spec.d), np.float32), np.zeros(local, np.float32)))
    return self._blank


def _restore_or_init(run: _Run, manager) -> Any:
  """The newest checkpoint's state (and data position), else a fresh init from `config.seed`.

  Multi-process, the restore and the init's data read are agreed (`preemption.agreed`): all
  processes go on from the same state or all stop. The placement on the mesh (a collective) comes
  after the agreement, so a process that failed never leaves the others waiting in it."""
  train = run.config.train
  restored = preemption.agreed(
    lambda: ckpt_lib.restore_newest(
      manager, run.abstract, run.data_iter, int(train.restore_retries), float(train.restore_backoff_s)
    )
  )
  if restored is not None:
    state, meta, latest = restored
    print(
      f"Resumed from {run.workdir}/checkpoints/{latest} ({meta.get('tokens_seen', 0)} tokens seen)",
      flush=True,
    )
    return state
  spec = run.spec
  sample = (
    preemption.agreed(
      lambda: _data_sample(run.global_batches, int(run.config.train.init_rows), run.batch_size)
    )
    if spec.pre_bias
    else None
  )
  params = sae_lib.init_params(jax.random.key(int(run.config.seed)), spec, sample)
  return jax.device_put(state_lib.init_state(params, run.optimizer), run.state_sharding)


def _window_average(window: list[dict], rows: int, elapsed: float) -> dict:
  """Means over the logged window; counters (dead fraction, rows skipped) at its last step."""
  window = jax.device_get(window)
  averaged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
  averaged["dead_fraction"] = float(window[-1]["dead_fraction"])
  averaged["rows_skipped"] = float(window[-1]["rows_skipped"])
  averaged["tokens_per_s"] = rows / elapsed if rows else float("nan")
  return averaged


class Diverged(SaeJaxError):
  """The loss or a parameter became NaN/Inf: the run stops without saving past its last finite step."""


def _check_finite(run: _Run, pending: list, window: list, last_saved: Optional[int]) -> None:
  """Raises `Diverged` naming the first step of `pending` ((step, finite flag) since the last check,
  the tail of `window`) whose loss, gradient norm or parameters are not finite. The flags ride on
  the statistics each step returns and are read here, at a log, checkpoint or stop point, where the
  host waits for the step anyway: no extra sync per step. Every process reads the same (global)
  flags, so all stop at the same step."""
  if not pending:
    return
  flags = np.asarray(jax.device_get([f for _, f in pending]))
  if flags.all():
    return
  i = int(np.argmin(flags))
  step = pending[i][0]
  losses = window[len(window) - len(pending) :] if len(window) >= len(pending) else []
  loss = f"loss {float(jax.device_get(losses[i]['loss'])):g}, " if losses else ""
  kept = (
    f"the newest checkpoint, {run.workdir}/checkpoints/{last_saved}, is finite and kept (nothing was "
    f"saved past step {last_saved})"
    if last_saved is not None
    else "no checkpoint was written (the run diverged before its first one)"
  )
  prefix = f"{preemption.who()}: " if jax.process_count() > 1 else ""
  raise Diverged(
    f"{prefix}training diverged: the loss or a parameter is not finite at step {step} ({loss}the first "
    f"such step); {kept}; likely cause: the learning rate config.optim.lr={float(run.config.optim.lr):g} "
    "is too high: lower it (or raise config.optim.warmup_steps) and re-run"
  )


def _progress_line(done: int, start: int, total: int, seconds: float) -> None:
  """`train: step done/total, steps/s, ETA` on stderr (steps dispatched; the host runs at most a
  few steps ahead of the device)."""
  rate = (done - start) / seconds if seconds > 0 else 0.0
  eta = f"{(total - done) / rate / 60:.1f} min" if rate > 0 else "?"
  print(f"train: step {done}/{total}, {rate:.2f} steps/s, ETA {eta}", file=sys.stderr, flush=True)


def _save(run: _Run, manager, step: int, state: Any) -> None:
  meta = {"step": step, "tokens_seen": step * run.batch_size, "sae_spec": run.resolved["sae_spec"]}
  ckpt_lib.save(manager, step, state, run.data_iter, meta)


def _train_loop(
  run: _Run, state: Any, manager, logger: "MetricsLogger", watch: preemption.SignalWatch
) -> tuple[Any, dict]:
  """Runs the steps; on a signal (`watch`) saves at the step reached and returns early."""
  config, spec = run.config, run.spec
  train_step = step_lib.jit_train_step(spec, run.optimizer, run.mesh, run.state_sharding, run.shard_optimizer)
  start = int(jax.device_get(state["step"]))
  log_every, ckpt_every = max(1, int(config.train.log_every)), max(1, int(config.train.checkpoint_every))
  window: list[dict] = []
  t_window, rows_window = time.perf_counter(), 0
  last_logged: dict = {}
  check_every = int(config.train.preempt_check_every)
  # A log file (stderr not a terminal) gets a progress line when no line came for log_every_s.
  every_s = float(config.train.log_every_s) if logger.enabled and not sys.stderr.isatty() else float("inf")
  t_start, t_line = time.monotonic(), time.monotonic()
  pending: list = []  # (step, finite flag) not checked yet
  last_saved: Optional[int] = start if start else None  # a restored checkpoint is finite
  for step in range(start, run.num_steps):
    batch, valid = run.next_batch(watch)  # on the device, checked (pipeline.DeviceFeed)
    state, metrics = train_step(state, batch, valid)
    done = step + 1
    pending.append((done, metrics.pop("finite")))
    window.append(metrics)
    rows_window += run.batch_size
    if step == start:  # keep compilation out of tokens/s
      jax.block_until_ready(metrics)
      t_window, rows_window = time.perf_counter(), 0
    is_log = done % log_every == 0 or done == run.num_steps
    is_save = done % ckpt_every == 0 or done == run.num_steps
    # Multi-process: every check_every steps and before anything is logged or saved, the processes
    # agree (one all-gather): a signal anywhere stops all after a save, a failure anywhere
    # (`run.next_batch`) stops all at once (`preemption.Stopped`).
    signalled = watch.stop_agreed(done, check_every, force=is_log or is_save) and done < run.num_steps
    if is_log or is_save or signalled:
      _check_finite(run, pending, window, last_saved)
      pending = []
    if is_log:
      last_logged = _window_average(window, rows_window, time.perf_counter() - t_window)
      logger.write(done, last_logged)
      window, rows_window, t_window = [], 0, time.perf_counter()
      t_line = time.monotonic()
    elif time.monotonic() - t_line >= every_s:
      t_line = time.monotonic()
      _progress_line(done, start, run.num_steps, t_line - t_start)
    if is_save or signalled:
      _save(run, manager, done, state)
      last_saved = done
    if signalled:
      watch.stopped_at = done
      break
  return state, last_logged


def last_logged_metrics(workdir: str, step: int) -> dict:
  """The newest metrics line of `<workdir>/metrics.jsonl` at or before `step` (events skipped), without
  its step; {} when there is none. A finished run re-run on its workdir reports these."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  last: dict = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut by a crash mid-append
      continue
    if "event" not in record and int(record.get("step", -1)) <= step:
      last = {k: v for k, v in record.items() if k != "step"}
  return last


def _exit_preempted(run: _Run, watch: preemption.SignalWatch, logger: "MetricsLogger") -> None:
  step = watch.stopped_at
  seconds = time.monotonic() - watch.received_at if watch.received_at is not None else float("nan")
  # A host that did not get the signal itself stops because another one did.
  signal_name = watch.received or "peer"
  record = {"event": "preempted", "signal": signal_name}
  if watch.received:  # process 0 may stop because another process was signalled
    record["signal_to_saved_s"] = round(seconds, 3)
  logger.event(step, record)
  when = f"{seconds:.1f} s after the signal" if watch.received else "another process was signalled"
  preemption.stop(
    f"{signal_name}: saved {run.workdir}/checkpoints/{step} ({when}) and stopped; exit status "
    f"{preemption.PREEMPTED_EXIT_CODE}, re-run the same command to resume"
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the SAE of `config` in `workdir`; returns the final summary.

  SIGTERM / SIGINT (from the start, so a signal during restore or compilation counts too): the
  run finishes its step, saves at it and raises `preemption.Preempted` (exit status 75)."""
  # First: jax.distributed's own SIGTERM notifier must not replace the watch's handler.
  shard_lib.maybe_initialize_distributed(config.mesh)
  with preemption.watch() as watch, preemption.lost_peer_exit():
    return _train_and_evaluate(config, workdir, watch)


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  run = _Run(config, workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  workdir_lib.check_workdir_config(workdir, run.resolved, bool(config.train.allow_config_change))
  return run


# Fields that may differ between the processes of one run (each host's own id and paths).
PER_PROCESS_FIELDS = ("mesh.", "data.shard_dir")


def _check_same_config(run: _Run) -> None:
  """Multi-process: every process must train the same config (a flag or a config file read
  differently on one host would otherwise train silently apart). One all-gathered digest; on a
  mismatch every process stops, the differing ones naming the fields that differ from process 0's."""
  if jax.process_count() == 1:
    return
  fields = {
    k: v for k, v in workdir_lib.flatten(run.resolved).items() if not k.startswith(PER_PROCESS_FIELDS)
  }
  text = json.dumps(fields, sort_keys=True, default=str)
  digests = np.asarray(multihost_utils.process_allgather(np.int32(zlib.crc32(text.encode()) & 0x7FFFFFFF)))
  differ = [int(p) for p in np.flatnonzero(digests.reshape(-1) != digests.reshape(-1)[0])]
  if not differ:
    return
  own = None
  if jax.process_index() == 0:
    preemption.publish_failure(text, "config")
  elif jax.process_index() in differ:
    mine, first = json.loads(text), json.loads(preemption.read_failure(0, "config"))
    names = sorted(k for k in set(mine) | set(first) if mine.get(k) != first.get(k))
    shown = ", ".join(f"{k}={mine.get(k)!r} (process 0: {first.get(k)!r})" for k in names[:5])
    own = (
      f"its config differs from process 0's{' in ' + shown if shown else ''}; every process must get "
      "the same config file and --config flags"
    )
    preemption.publish_failure(own)
  codes = np.zeros(jax.process_count(), np.int32)
  codes[differ] = preemption.FAILED_EXIT_CODE
  preemption.stop_together(codes, own)


def _train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, watch: preemption.SignalWatch
) -> dict:
  if config.data.source == "shards" and not config.data.shard_dir:
    # Default: the shards that experiments.extract wrote into this workdir.
    config = config.copy_and_resolve_references()
    config.data.shard_dir = os.path.join(workdir, "activations", "shards")
  # Multi-process, each phase that can fail on one process only (a config value or file read on
  # one host, a checkpoint read) ends in an agreement: all go on, or all stop with one code.
  run = preemption.agreed(lambda: _setup(config, workdir))
  _check_same_config(run)
  manager = ckpt_lib.make_manager(workdir, config.train)
  state = _restore_or_init(run, manager)
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, run.resolved)
  resume_step = int(jax.device_get(state["step"]))
  logger = MetricsLogger(workdir, bool(config.train.tensorboard), config.train, run.resolved, resume_step)
  try:
    state, last_logged = _train_loop(run, state, manager, logger, watch)
  finally:
    manager.wait_until_finished()  # a preemption save is synchronous: it is on storage after this
    manager.close()
    logger.close()
  if watch.stopped_at is not None:
    _exit_preempted(run, watch, logger)
  step = int(jax.device_get(state["step"]))
  nothing_to_train = not last_logged  # the restored checkpoint already reaches train.num_steps
  if nothing_to_train:
    last_logged = last_logged_metrics(workdir, step)
  summary = {
    "step": step,
    "workdir": workdir,
    "nothing_to_train": nothing_to_train,
    **last_logged,
    **evaluate_reconstruction(state["params"], run.spec, config, run.global_batches),
  }
  if jax.process_index() == 0:
    print("SUMMARY " + json.dumps(summary), flush=True)
  return summary
