"""Training: the train state, one jitted sharded step, and `train_and_evaluate(config, workdir)`.

The state is a plain dict so that sharding rules (by leaf name) and orbax see it directly:
  params              {'W_enc', 'b_enc', 'D', 'b_dec'}
  opt_state           optax state (moments shaped like params)
  step                int32 scalar
  tokens_since_fired  int32 [c]  dead-latent statistics (AuxK and the dead fraction)
  rows_skipped        int32 scalar  rows masked by config.data.nonfinite='skip'
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sae_jax import checkpoint as ckpt_lib
from sae_jax import sae as sae_lib
from sae_jax import sharding as shard_lib
from sae_jax.data import pipeline
from sae_jax.errors import SaeJaxError

State = dict[str, Any]
_COUNTER_CAP = 2**30  # tokens_since_fired saturates here (int32)

# Fields that may differ between a workdir's config.json and a resumed run's config.
RESUMABLE_FIELDS = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.max_to_keep",
                    "train.async_checkpoint", "train.allow_config_change", "train.tensorboard",
                    "mesh.data", "mesh.model", "mesh.multihost", "mesh.coordinator_address",
                    "mesh.num_processes", "mesh.process_id", "data.prefetch", "analysis", "retrieval",
                    "extract", "sae.decoder", "sae_spec.decoder")


def make_optimizer(optim_cfg: Any, num_steps: int) -> optax.GradientTransformation:
  """Adam (+ global-norm clip) with optional warmup and cosine decay."""
  lr = float(optim_cfg.lr)
  warmup = int(optim_cfg.warmup_steps)
  if optim_cfg.decay == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(num_steps, warmup + 1))
  elif optim_cfg.decay == "constant":
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
  else:
    raise SaeJaxError(f"config.optim.decay={optim_cfg.decay!r}: expected 'constant' or 'cosine'")
  adam = optax.adam(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps))
  if float(optim_cfg.clip_norm) > 0:
    return optax.chain(optax.clip_by_global_norm(float(optim_cfg.clip_norm)), adam)
  return adam


def init_state(params: sae_lib.Params, optimizer: optax.GradientTransformation) -> State:
  c = params["D"].shape[0]
  return {
      "params": params,
      "opt_state": optimizer.init(params),
      "step": jnp.zeros((), jnp.int32),
      "tokens_since_fired": jnp.zeros((c,), jnp.int32),
      "rows_skipped": jnp.zeros((), jnp.int32),
  }


def abstract_state(spec: sae_lib.SAESpec, config: Any) -> State:
  """Shapes and dtypes of the train state (no computation)."""
  optimizer = make_optimizer(config.optim, int(config.train.num_steps))
  # b_dec_init="zeros": shapes do not depend on the data sample a real init would use.
  shape_spec = dataclasses.replace(spec, b_dec_init="zeros")
  return jax.eval_shape(lambda: init_state(sae_lib.init_params(jax.random.key(0), shape_spec),
                                           optimizer))


def remove_parallel_component(grad_D: jax.Array, D: jax.Array) -> jax.Array:
  """Projects out of each row's gradient its component along that (unit) row."""
  return grad_D - jnp.sum(grad_D * D, axis=1, keepdims=True) * D


def make_train_step(spec: sae_lib.SAESpec, optimizer: optax.GradientTransformation,
                    top_k: sae_lib.TopKFn = sae_lib.local_top_k) -> Callable:
  """step(state, batch [B, d], valid [B]) -> (state, metrics); pure, for jax.jit."""

  def step(state: State, batch: jax.Array, valid: jax.Array) -> tuple[State, dict]:
    params = state["params"]
    if spec.decoder_norm == "renorm":
      # Overcomplete renormalises D in place (outside autograd) before each forward.
      params = {**params, "D": sae_lib.normalize_rows(params["D"])}
    dead = state["tokens_since_fired"] >= spec.dead_tokens
    grad_fn = jax.value_and_grad(sae_lib.loss_fn, has_aux=True)
    if spec.aux_k > 0:
      # = grad of loss_fn(..., dead): the AuxK term is differentiated inside the cond that skips
      # it when no latent is dead, not through it (see sae.aux_loss_fn for why).
      (_, out), grads = grad_fn(params, batch, spec, valid, None, top_k)

      def add_aux(grads):
        aux, aux_grads = jax.value_and_grad(sae_lib.aux_loss_fn)(
            params, batch, batch - out.x_hat, spec, valid, dead, top_k)
        return aux, jax.tree.map(lambda g, a: g + spec.aux_coef * a, grads, aux_grads)

      aux, grads = jax.lax.cond(jnp.any(dead), add_aux, lambda g: (jnp.zeros((), jnp.float32), g), grads)
      out = out._replace(loss=out.loss + spec.aux_coef * aux, aux=aux)
    else:
      (_, out), grads = grad_fn(params, batch, spec, valid, dead, top_k)
    if spec.decoder_norm == "unit_grad":
      grads = {**grads, "D": remove_parallel_component(grads["D"], params["D"])}
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if spec.decoder_norm == "unit_grad":
      new_params = {**new_params, "D": sae_lib.normalize_rows(new_params["D"])}
    fired_values = out.code.values * valid[:, None]
    fired = jnp.zeros((spec.c,), jnp.bool_).at[out.code.indices.reshape(-1)].max(
        fired_values.reshape(-1) > 0)
    n_valid = valid.sum()
    counters = jnp.minimum(state["tokens_since_fired"] + n_valid.astype(jnp.int32), _COUNTER_CAP)
    tokens_since_fired = jnp.where(fired, 0, counters)
    new_state = {
        "params": new_params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "tokens_since_fired": tokens_since_fired,
        "rows_skipped": state["rows_skipped"] + (valid.shape[0] - n_valid).astype(jnp.int32),
    }
    ev = sae_lib.explained_variance(batch, out.x_hat, valid)
    l0 = jnp.sum((out.code.values > 0) * valid[:, None]) / jnp.maximum(n_valid, 1.0)
    metrics = {
        "loss": out.loss, "mse": out.mse, "l1": out.l1, "aux_loss": out.aux, "fvu": ev["fvu"],
        "r2_overcomplete": ev["r2_overcomplete"], "l0": l0, "grad_norm": grad_norm,
        "dead_fraction": jnp.mean(tokens_since_fired >= spec.dead_tokens),
        "rows_skipped": new_state["rows_skipped"],
    }
    return new_state, metrics

  return step


def jit_train_step(spec, optimizer, mesh, state_sharding) -> Callable:
  # One device: the plain top-k, which lets the encoder fuse GEMM + top-k per block of rows.
  top_k = sae_lib.local_top_k if mesh.size == 1 else shard_lib.sharded_top_k(mesh)
  step = make_train_step(spec, optimizer, top_k)
  batch_sharding = shard_lib.batch_sharding(mesh)
  valid_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shard_lib.DATA))
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding, valid_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=(0,))


# --------------------------------------------------------------------------- config handling

def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _resolved_config_dict(config: Any, spec: sae_lib.SAESpec) -> dict:
  d = json.loads(config.to_json())
  d["sae_spec"] = dataclasses.asdict(spec)
  return d


def _check_workdir_config(workdir: str, new: dict, allow_change: bool) -> None:
  path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  old_flat, new_flat = _flatten(old), _flatten(new)
  ignored = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
  diff = sorted(k for k in set(old_flat) | set(new_flat)
                if not ignored(k) and old_flat.get(k) != new_flat.get(k))
  if diff and not allow_change:
    k = diff[0]
    raise SaeJaxError(
        f"{path} holds a run with a different config ({len(diff)} field(s) differ, first "
        f"{k}: {old_flat.get(k)!r} there vs {new_flat.get(k)!r} now); use another --workdir or "
        "pass --config.train.allow_config_change=True")


def _data_sample(fn: Callable[[int], np.ndarray], rows: int, batch_size: int) -> np.ndarray:
  # Batches far ahead in the stream so init does not peek at what step 0 trains on.
  n = max(1, -(-rows // batch_size))
  sample = np.concatenate([fn(10**9 + i) for i in range(n)])[:rows]
  return sample[np.isfinite(sample).all(axis=1)]


def evaluate(params: sae_lib.Params, spec: sae_lib.SAESpec, config: Any,
             fn: Callable[[int], np.ndarray], num_batches: int = 4) -> dict:
  """Held-out reconstruction (batches far from the training stream) and, for the planted
  source, how well the dictionary recovers the ground-truth atoms."""
  if not all(x.is_fully_addressable for x in jax.tree.leaves(params)):
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.device_get(params)
  params = {**params, "D": np.asarray(sae_lib.normalize_rows(params["D"]))}
  x = np.concatenate([fn(2 * 10**9 + i) for i in range(num_batches)])
  x = x[np.isfinite(x).all(axis=1)]
  _, out = jax.jit(sae_lib.loss_fn, static_argnums=2)(params, jnp.asarray(x), spec)
  ev = sae_lib.explained_variance(jnp.asarray(x), out.x_hat)
  result = {"eval_fvu": float(ev["fvu"]), "eval_r2_overcomplete": float(ev["r2_overcomplete"]),
            "eval_rows": int(x.shape[0])}
  if config.data.source == "synthetic":
    from sae_jax.data.synthetic import PlantedSource
    truth = PlantedSource(config.data.synthetic).dictionary
    result["planted_mean_max_cos"] = float((truth @ params["D"].T).max(axis=1).mean())
  return result


class MetricsLogger:
  """metrics.jsonl, a live progress line, and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if self.enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self.writer = None

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.writer is not None:
      for k, v in metrics.items():
        self.writer.add_scalar(f"train/{k}", float(v), step)
      self.writer.flush()
    print(f"step {step:>7d} | {metrics.get('tokens_per_s', 0):>9.0f} tok/s | loss {metrics['loss']:.5f} "
          f"| FVU {metrics['fvu']:.4f} | L0 {metrics['l0']:.1f} | dead {100 * metrics['dead_fraction']:.1f}%",
          flush=True)

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _put_batch(local: np.ndarray, sharding) -> jax.Array:
  """This process's rows (a contiguous slice of the global batch) as a global sharded array."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the SAE of `config` in `workdir`; returns the final summary."""
  shard_lib.maybe_initialize_distributed(config.mesh)
  if config.data.source == "shards" and not config.data.shard_dir:
    # Default: the shards that experiments.extract wrote into this workdir.
    config = config.copy_and_resolve_references()
    config.data.shard_dir = os.path.join(workdir, "activations", "shards")
  spec = sae_lib.spec_from_config(config.sae)
  width = pipeline.data_width(config)
  if width != spec.d:
    raise SaeJaxError(f"config.sae.d={spec.d} but config.data.source={config.data.source!r} yields rows "
                      f"of width {width}")
  num_steps = int(config.train.num_steps)
  batch_size = int(config.data.batch_size)
  os.makedirs(workdir, exist_ok=True)
  resolved = _resolved_config_dict(config, spec)
  _check_workdir_config(workdir, resolved, bool(config.train.allow_config_change))
  mesh = shard_lib.make_mesh(config.mesh)
  shard_lib.check_divisible(mesh, batch_size, spec.c)
  optimizer = make_optimizer(config.optim, num_steps)

  abstract = abstract_state(spec, config)
  state_sharding = shard_lib.state_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sharding)
  fn = pipeline.batch_fn(config)  # whole global batches: init and evaluation, same on every host
  local_fn = pipeline.batch_fn(config, jax.process_index(), jax.process_count())
  data_iter = iter(pipeline.make_dataset(config, local_fn))
  manager = ckpt_lib.make_manager(workdir, config.train)
  latest = manager.latest_step()
  if latest is not None:
    state, meta = ckpt_lib.restore(manager, latest, abstract, data_iter)
    print(f"Resumed from {workdir}/checkpoints/{latest} ({meta.get('tokens_seen', 0)} tokens seen)",
          flush=True)
  else:
    sample = _data_sample(fn, int(config.train.init_rows), batch_size) if spec.pre_bias else None
    params = sae_lib.init_params(jax.random.key(int(config.seed)), spec, sample)
    state = jax.device_put(init_state(params, optimizer), state_sharding)
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, ckpt_lib.CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(resolved, f, indent=1)
    os.replace(tmp, os.path.join(workdir, ckpt_lib.CONFIG_FILE))

  train_step = jit_train_step(spec, optimizer, mesh, state_sharding)
  batch_sharding = shard_lib.batch_sharding(mesh)
  valid_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shard_lib.DATA))
  logger = MetricsLogger(workdir, bool(config.train.tensorboard))
  start = int(jax.device_get(state["step"]))
  log_every, ckpt_every = max(1, int(config.train.log_every)), max(1, int(config.train.checkpoint_every))
  window: list[dict] = []
  t_window, rows_window = time.perf_counter(), 0
  last_logged: dict = {}

  def save(step_):
    meta = {"step": step_, "tokens_seen": step_ * batch_size, "sae_spec": resolved["sae_spec"]}
    ckpt_lib.save(manager, step_, state, data_iter, meta)

  for step in range(start, num_steps):
    batch = np.asarray(next(data_iter), np.float32)
    batch, valid = pipeline.check_batch(batch, spec.d, str(config.data.nonfinite),
                                        f"config.data.source={config.data.source!r} batch {step}")
    state, metrics = train_step(state, _put_batch(batch, batch_sharding), _put_batch(valid, valid_sharding))
    window.append(metrics)
    rows_window += batch_size
    if step == start:  # keep compilation out of tokens/s
      jax.block_until_ready(metrics)
      t_window, rows_window = time.perf_counter(), 0
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      window = jax.device_get(window)
      elapsed = time.perf_counter() - t_window
      averaged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      averaged["dead_fraction"] = float(window[-1]["dead_fraction"])
      averaged["rows_skipped"] = float(window[-1]["rows_skipped"])
      averaged["tokens_per_s"] = rows_window / elapsed if rows_window else float("nan")
      logger.write(done, averaged)
      last_logged = averaged
      window, rows_window, t_window = [], 0, time.perf_counter()
    if done % ckpt_every == 0 or done == num_steps:
      save(done)
  manager.wait_until_finished()
  manager.close()
  logger.close()
  summary = {"step": num_steps, "workdir": workdir, **last_logged,
             **evaluate(state["params"], spec, config, fn)}
  if jax.process_index() == 0:
    print("SUMMARY " + json.dumps(summary), flush=True)
  return summary
