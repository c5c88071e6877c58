"""One training step: loss, gradients, optimizer update and dead-latent counters, jitted and sharded."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sae_jax import kernels
from sae_jax import sae as sae_lib
from sae_jax import sharding as shard_lib
from sae_jax.training.state import State

_COUNTER_CAP = 2**30  # tokens_since_fired saturates here (int32)


def remove_parallel_component(grad_D: jax.Array, D: jax.Array) -> jax.Array:
  """Projects out of each row's gradient its component along that (unit) row."""
  return grad_D - jnp.sum(grad_D * D, axis=1, keepdims=True) * D


def make_train_step(
  spec: sae_lib.SAESpec, optimizer: optax.GradientTransformation, top_k: kernels.TopKFn = kernels.local_top_k
) -> Callable:
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
          params, batch, batch - out.x_hat, spec, valid, dead, top_k
        )
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
    fired = jnp.zeros((spec.c,), jnp.bool_).at[out.code.indices.reshape(-1)].max(fired_values.reshape(-1) > 0)
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
      "loss": out.loss,
      "mse": out.mse,
      "l1": out.l1,
      "aux_loss": out.aux,
      "fvu": ev["fvu"],
      "r2_overcomplete": ev["r2_overcomplete"],
      "l0": l0,
      "grad_norm": grad_norm,
      "dead_fraction": jnp.mean(tokens_since_fired >= spec.dead_tokens),
      "rows_skipped": new_state["rows_skipped"],
    }
    return new_state, metrics

  return step


def jit_train_step(spec, optimizer, mesh, state_sharding) -> Callable:
  # One device: the plain top-k, which lets the encoder fuse GEMM + top-k per block of rows.
  top_k = kernels.local_top_k if mesh.size == 1 else shard_lib.sharded_top_k(mesh)
  step = make_train_step(spec, optimizer, top_k)
  batch_sharding = shard_lib.batch_sharding(mesh)
  valid_sharding = shard_lib.rows_sharding(mesh)
  return jax.jit(
    step,
    in_shardings=(state_sharding, batch_sharding, valid_sharding),
    out_shardings=(state_sharding, None),
    donate_argnums=(0,),
  )
