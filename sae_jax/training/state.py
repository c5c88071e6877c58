"""The train state and its optimizer.

The state is a plain dict so that sharding rules (by leaf name) and orbax see it directly:
  params              {'W_enc', 'b_enc', 'D', 'b_dec'}
  opt_state           optax state (moments shaped like params)
  step                int32 scalar
  tokens_since_fired  int32 [c]  dead-latent statistics (AuxK and the dead fraction)
  rows_skipped        int32 scalar  rows masked by config.data.nonfinite='skip'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sae_jax import sae as sae_lib
from sae_jax.errors import SaeJaxError

State = dict[str, Any]


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
    return optax.chain(clip_by_global_norm(float(optim_cfg.clip_norm)), adam)
  return adam


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (same empty state, same result) that takes the norm the train step
  already computed (`update(..., grad_norm=...)`), so a step computes one gradient norm: with
  sharded gradients each norm is its own all-reduce, and XLA does not merge the two."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, grad_norm=None, **extra):
    del params, extra
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    keep = norm < max_norm  # optax's formula, so results are identical

    def clip(t):
      return jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(init, update)


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
  return jax.eval_shape(lambda: init_state(sae_lib.init_params(jax.random.key(0), shape_spec), optimizer))
