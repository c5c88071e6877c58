"""One training step: a single `jax.shard_map` over ("data", "model") with explicit collectives.

Each device holds a slice of the batch (rows split on "data") and a slice of the dictionary
(latents split on "model"). In one step every device:
  1. computes its local pre-activations and a local top-k over its own latents;
  2. with model > 1, picks the k winners of each row among the model shards' candidates (one
     all-gather of the candidate VALUES, [B/dp, m*k]); each shard keeps its own winners;
  3. decodes its winners locally; ONE psum of x_hat over "model";
  4. runs the backward pass written out (no autodiff through collectives): sparse B*k-row
     scatter-adds (`sae.backward="scatter"`) or GEMMs on a thresholded mask (`"dense"`, no
     scatter of [c, d] size);
  5. reduces the gradients ONCE over "data" (a psum, or a psum_scatter when the optimizer state is
     sharded) together with the fired-latent counts; losses and metrics are psums of a few scalars.
The optimizer then runs on the reduced gradients under jit's sharding (Adam is elementwise; with
ZeRO-1 its moments are split over "data" too and the updated parameters are all-gathered).
AuxK takes its top-k from the same pre-activations, masked to the dead latents: no second
encoder pass. Pure data parallelism never gathers the [B, c] pre-activations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sae_jax import kernels
from sae_jax import sae as sae_lib
from sae_jax import sharding as shard_lib
from sae_jax.sharding import DATA, MODEL
from sae_jax.training.state import State

_COUNTER_CAP = 2**30  # tokens_since_fired saturates here (int32)
_PARAMS = ("W_enc", "b_enc", "D", "b_dec")


def remove_parallel_component(grad_D: jax.Array, D: jax.Array) -> jax.Array:
  """Projects out of each row's gradient its component along that (unit) row."""
  return grad_D - jnp.sum(grad_D * D, axis=1, keepdims=True) * D


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of the compiled step."""

  dp: int  # devices on "data"
  mp: int  # devices on "model"
  cpu: bool  # CPU-only tricks (row-blocked encoder, materialised transposes)
  shard_optimizer: bool  # gradients reduce-scattered over "data" (ZeRO-1)


# ------------------------------------------------------------------------------ local pieces


def _top_k(acts: jax.Array, k: int, spec: sae_lib.SAESpec) -> tuple[jax.Array, jax.Array]:
  if spec.top_k == "approx":
    v, i = jax.lax.approx_max_k(acts, k, recall_target=spec.approx_recall)
  else:
    v, i = jax.lax.top_k(acts, k)
  return v, i.astype(jnp.int32)


def _winners(v: jax.Array, k: int, plan: _Plan, exact: bool) -> tuple[jax.Array, jax.Array]:
  """How many of this shard's candidates `v` [N, kl] (sorted, descending) are among the row's k
  largest over all model shards, and the k-th largest value [N].

  The candidates of every shard are gathered in shard order and `lax.top_k` prefers the lower
  position among equal values, so ties go to the lower global latent index, as with one top-k
  over the whole row. A shard's winners are a prefix of its sorted candidates.
  """
  n, kl = v.shape
  if plan.mp == 1:
    return jnp.full((n,), k, jnp.int32), v[:, k - 1]
  every = jax.lax.all_gather(v, MODEL, axis=1, tiled=True)  # [N, m*kl]
  top, pos = jax.lax.top_k(every, k)
  kth = top[:, k - 1]
  if not exact:  # approx candidates are not guaranteed sorted: keep those >= the k-th value
    return jnp.sum(v >= kth[:, None], axis=1).astype(jnp.int32), kth
  mine = (pos // kl) == jax.lax.axis_index(MODEL)
  return jnp.sum(mine, axis=1).astype(jnp.int32), kth


def _selected(v: jax.Array, n_mine: jax.Array, kth: jax.Array, exact: bool) -> jax.Array:
  """[N, kl] mask of the winning candidates (a prefix of each sorted row)."""
  if exact:
    return jnp.arange(v.shape[1])[None, :] < n_mine[:, None]
  return v >= kth[:, None]


def _threshold_mask(pre: jax.Array, kth: jax.Array, n_mine: jax.Array, exact: bool) -> jax.Array:
  """[N, c_local] mask of this shard's winners from the k-th value: entries above it, plus the
  lowest-index ties at it up to this shard's count. Rows whose k-th value is 0 select every
  positive entry (the zeros do not matter: their values and gradients are 0)."""
  gt = pre > kth[:, None]
  tie = pre == kth[:, None]
  if not exact:
    return (gt | tie) & (pre > 0)
  need = n_mine - jnp.sum(gt, axis=1, dtype=jnp.int32)
  over = jnp.any((kth > 0) & (jnp.sum(tie, axis=1, dtype=jnp.int32) > need))

  def ranked(_):
    rank = jnp.cumsum(tie.astype(jnp.int32), axis=1)
    return gt | (tie & (rank <= need[:, None]))

  # Positive ties at the k-th value are rare: rank them only when they overflow the count.
  return jax.lax.cond(over, ranked, lambda _: gt | tie, None) & (pre > 0)


def _t(a: jax.Array, plan: _Plan) -> jax.Array:
  return kernels.transpose(a) if plan.cpu else a.T


def _mm(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
  return kernels.matmul(a, b, dtype)


def _scatter_candidates(xc, W, b_enc, dead, kl, akl, with_aux, spec, plan):
  """Local top-kl (and, when `with_aux`, the top-akl of the dead-masked) pre-activations.

  On CPU the encoder GEMM, ReLU and top-k run per block of rows (the block's activations stay in
  cache); the AuxK top-k reads the same block.
  """
  dtype = sae_lib.matmul_dtype(spec)
  W = W.astype(dtype)  # cast once, outside the row blocks

  def block(xb):
    acts = jax.nn.relu(jnp.matmul(xb.astype(dtype), W, preferred_element_type=jnp.float32) + b_enc)
    v, i = _top_k(acts, kl, spec)
    if akl == 0:
      return v, i, jnp.zeros((xb.shape[0], 0)), jnp.zeros((xb.shape[0], 0), jnp.int32)
    av, ai = jax.lax.cond(
      with_aux,
      lambda a: _top_k(jnp.where(dead, a, 0.0), akl, spec),
      lambda a: (jnp.zeros((a.shape[0], akl)), jnp.zeros((a.shape[0], akl), jnp.int32)),
      acts,
    )
    return v, i, av, ai

  n = xc.shape[0]
  rows = kernels.encoder_block_rows(n)
  if plan.cpu and rows < n:
    out = jax.lax.map(block, xc.reshape(n // rows, rows, xc.shape[1]))
    return tuple(a.reshape(n, a.shape[-1]) for a in out)
  return block(xc)


def _psum_model(a: jax.Array, plan: _Plan) -> jax.Array:
  return jax.lax.psum(a, MODEL) if plan.mp > 1 else a


def _local_step(spec: sae_lib.SAESpec, plan: _Plan, params, since, x, valid):
  """Per device: loss, gradients and statistics of its batch rows and dictionary slice."""
  W, b_enc, D, b_dec = (params[k] for k in _PARAMS)
  d = x.shape[1]
  cl = W.shape[1]
  exact = spec.top_k == "exact"
  model_0 = (jax.lax.axis_index(MODEL) == 0).astype(jnp.float32)
  data_0 = (jax.lax.axis_index(DATA) == 0).astype(jnp.float32)

  # Rows with NaN/Inf are masked here, in the step, and counted.
  finite = jnp.all(jnp.isfinite(x), axis=1)
  x = jnp.where(finite[:, None], x, 0.0)
  w_in = valid.astype(jnp.float32)
  w = w_in * finite
  dead = since >= spec.dead_tokens

  # One psum of small statistics: valid rows, bad rows, dead latents, per-dimension sums of x.
  first = jnp.concatenate(
    [
      jnp.stack(
        [
          model_0 * w.sum(),
          model_0 * jnp.sum(w_in * (1.0 - finite)),
          data_0 * dead.sum().astype(jnp.float32),
        ]
      ),
      model_0 * jnp.sum(w[:, None] * x, axis=0),
    ]
  )
  first = jax.lax.psum(first, (DATA, MODEL))
  n_valid, n_bad, n_dead, sum_x = first[0], first[1], first[2], first[3:]
  n = jnp.maximum(n_valid, 1.0)
  mean_d = sum_x / n
  ss_dim_local = model_0 * jnp.sum(w[:, None] * (x - mean_d) ** 2)
  if spec.mse == "normalized":  # the loss is sse / ss_dim (Gao et al.): one more scalar psum
    ss_dim = jax.lax.psum(ss_dim_local, (DATA, MODEL))
    recon_scale = (n * d) / jnp.maximum(ss_dim, 1e-12)
  else:
    recon_scale = 1.0
  use_aux = spec.aux_k > 0
  with_aux = n_dead > 0 if use_aux else jnp.zeros((), bool)
  scale = sae_lib.aux_scale(n_dead, spec.aux_k) if use_aux else 0.0

  xc = x - b_dec if spec.pre_bias else x
  kl, akl = min(spec.k, cl), (min(spec.aux_k, cl) if use_aux else 0)
  if spec.backward == "dense":
    fwd = _dense_forward(xc, W, b_enc, D, kl, spec, plan, exact)
  else:
    fwd = _sparse_forward(xc, W, b_enc, D, dead, kl, akl, with_aux, spec, plan, exact)
  x_hat = _psum_model(fwd["x_hat"], plan)
  if spec.pre_bias:
    x_hat = x_hat + b_dec
  err = x - x_hat
  g = (-2.0 * recon_scale / (n * d)) * w[:, None] * err  # dL/dx_hat
  l1_grad = spec.l1_coef * w / (n * spec.c)  # dL/dvalue of every active latent (values >= 0)
  if spec.backward == "dense":
    grads = _dense_backward(fwd, xc, D, g, l1_grad, spec, plan)
  else:
    grads = _sparse_backward(fwd, xc, D, g, l1_grad, spec, plan)

  aux = jnp.zeros((), jnp.float32)
  if use_aux:

    def aux_branch(grads):
      e = err  # the main residual, a constant of AuxK
      e_mean = jax.lax.psum(jnp.sum(w[:, None] * e, axis=0), DATA) / n
      e_var = jnp.maximum(jax.lax.psum(jnp.sum(w[:, None] * (e - e_mean) ** 2), DATA), 1e-12)
      if spec.backward == "dense":
        a = _dense_aux(fwd, D, dead, akl, spec, plan, exact)
      else:
        a = _sparse_aux(fwd, D, akl, spec, plan, exact)
      r = e - _psum_model(a["x_hat"], plan)
      value = jax.lax.psum(jnp.sum(w[:, None] * r**2), DATA) / e_var
      ge = (spec.aux_coef * scale * -2.0 / e_var) * w[:, None] * r
      if spec.backward == "dense":
        extra = _dense_backward(a, xc, D, ge, None, spec, plan)
        return value, jax.tree.map(jnp.add, grads, extra)
      # The AuxK scatter-adds accumulate into the main gradients' buffers.
      return value, _sparse_backward(a, xc, D, ge, None, spec, plan, grads)

    aux, grads = jax.lax.cond(with_aux, aux_branch, lambda grads: (aux, grads), grads)

  dW, db, dD = grads["W_enc_t"].T, grads["b_enc"], grads["D"]
  if spec.decoder_norm == "unit_grad":
    dD = remove_parallel_component(dD, D)  # linear per row: the same before or after the psum
  # b_dec: through x_hat (replicated over "model": counted once) and through x - b_dec.
  if spec.pre_bias:
    db_dec = model_0 * jnp.sum(g, axis=0) - W @ db
  else:
    db_dec = jnp.zeros((d,), jnp.float32)

  # The gradient reduction: once per step, outside every loop.
  db_dec = jax.lax.psum(db_dec, (DATA, MODEL))
  fired = fwd["fired"]
  if plan.shard_optimizer and plan.dp > 1:
    fired = jax.lax.psum(fired, DATA)
    dW = jax.lax.psum_scatter(dW, DATA, scatter_dimension=0, tiled=True)
    db = jax.lax.psum_scatter(db, DATA, scatter_dimension=0, tiled=True)
    dD = jax.lax.psum_scatter(dD, DATA, scatter_dimension=1, tiled=True)
    part = d // plan.dp
    db_dec = jax.lax.dynamic_slice_in_dim(db_dec, jax.lax.axis_index(DATA) * part, part)
  else:
    dW, db, dD, fired = jax.lax.psum((dW, db, dD, fired), DATA)

  # Metric sums (replicated quantities counted on model shard 0 only): one psum.
  mean_all = jnp.sum(sum_x) / (n * d)
  sums = jnp.stack(
    [
      model_0 * jnp.sum(w[:, None] * err**2),
      jnp.sum(w * fwd["value_sum"]),
      jnp.sum(w * fwd["active"]),
      ss_dim_local,
      model_0 * jnp.sum(w[:, None] * (x - mean_all) ** 2),
    ]
  )
  sse, l1_sum, l0_sum, ss_dim, ss_all = jax.lax.psum(sums, (DATA, MODEL))
  mse = sse / (n * d)
  l1 = l1_sum / (n * spec.c)
  stats = {
    "loss": mse * recon_scale + spec.l1_coef * l1 + spec.aux_coef * scale * aux,
    "mse": mse,
    "l1": l1,
    "aux_loss": aux,
    "fvu": sse / jnp.maximum(ss_dim, 1e-12),
    "r2_overcomplete": 1.0 - mse / (ss_all / (n * d) + 1e-6),
    "l0": l0_sum / n,
    "n_valid": n_valid,
    "nonfinite_rows": n_bad,
  }
  return {"W_enc": dW, "b_enc": db, "D": dD, "b_dec": db_dec}, fired, stats


# --- backward="scatter": codes as (values, indices) [N, k]; B*k-row scatter-adds


def _sparse_forward(xc, W, b_enc, D, dead, kl, akl, with_aux, spec, plan, exact):
  v, i, av, ai = _scatter_candidates(xc, W, b_enc, dead, kl, akl, with_aux, spec, plan)
  n_mine, kth = _winners(v, spec.k, plan, exact)
  values = jnp.where(_selected(v, n_mine, kth, exact), v, 0.0)
  out = {"values": values, "indices": i, "aux_values": av, "aux_indices": ai}
  if spec.decoder == "gather":
    out["x_hat"] = kernels.gather_weighted_sum(values, i, D)
  else:
    out["z"] = sae_lib.dense_codes(sae_lib.SparseCode(values, i), W.shape[1])
    out["x_hat"] = _mm(out["z"], D, sae_lib.matmul_dtype(spec))
  active = values > 0
  out["fired"] = (
    jnp.zeros((W.shape[1],), jnp.int32).at[i.reshape(-1)].add(active.reshape(-1).astype(jnp.int32))
  )
  out["value_sum"] = values.sum(axis=1)
  out["active"] = active.sum(axis=1).astype(jnp.float32)
  return out


def _sparse_aux(fwd, D, akl, spec, plan, exact):
  av, ai = fwd["aux_values"], fwd["aux_indices"]
  n_mine, kth = _winners(av, spec.aux_k, plan, exact)
  values = jnp.where(_selected(av, n_mine, kth, exact), av, 0.0)
  return {"values": values, "indices": ai, "x_hat": kernels.gather_weighted_sum(values, ai, D)}


def _sparse_backward(fwd, xc, D, g, l1_grad, spec, plan, acc=None):
  """Gradients {W_enc_t [c_local, d], b_enc, D}, added to `acc` (same structure) if given."""
  values, idx = fwd["values"], fwd["indices"]
  cl = D.shape[0]
  dtype = sae_lib.matmul_dtype(spec)
  acc = acc or {}
  if "z" in fwd:  # dense decoder: two GEMMs (bf16 cotangents with bf16 compute)
    dz = _mm(g, _t(D, plan), dtype)
    dvalues = jnp.take_along_axis(dz, idx, axis=1)
    dD = _mm(_t(fwd["z"], plan), g, dtype)
    dD = dD + acc["D"] if "D" in acc else dD
  else:
    dvalues = kernels.gather_dot(g, idx, D)
    dD = kernels.scatter_weighted_rows(values, idx, g, cl, acc.get("D"))
  if l1_grad is not None:
    dvalues = dvalues + l1_grad[:, None]
  # ReLU'(pre) at the selected entries; 0 for the entries that lost (their value is 0).
  G = jnp.where(values > 0, dvalues, 0.0)
  dW_t = kernels.scatter_weighted_rows(G, idx, xc, cl, acc.get("W_enc_t"))
  db = acc.get("b_enc", jnp.zeros((cl,), jnp.float32)).at[idx.reshape(-1)].add(G.reshape(-1))
  return {"W_enc_t": dW_t, "b_enc": db, "D": dD}


# --- backward="dense": codes as a dense [N, c_local] array from a threshold; GEMMs only


def _dense_forward(xc, W, b_enc, D, kl, spec, plan, exact):
  dtype = sae_lib.matmul_dtype(spec)
  pre = jax.nn.relu(_mm(xc, W, dtype) + b_enc)
  v, _ = _top_k(pre, kl, spec)
  n_mine, kth = _winners(v, spec.k, plan, exact)
  mask = _threshold_mask(pre, kth, n_mine, exact)
  z = jnp.where(mask, pre, 0.0)
  return {
    "pre": pre,
    "mask": mask,
    "z": z,
    "x_hat": _mm(z, D, dtype),
    "fired": jnp.sum(mask, axis=0, dtype=jnp.int32),
    "value_sum": z.sum(axis=1),
    "active": mask.sum(axis=1).astype(jnp.float32),
  }


def _dense_aux(fwd, D, dead, akl, spec, plan, exact):
  masked = jnp.where(dead, fwd["pre"], 0.0)
  v, _ = _top_k(masked, akl, spec)
  n_mine, kth = _winners(v, spec.aux_k, plan, exact)
  mask = _threshold_mask(masked, kth, n_mine, exact)
  z = jnp.where(mask, masked, 0.0)
  return {"mask": mask, "z": z, "x_hat": _mm(z, D, sae_lib.matmul_dtype(spec))}


def _dense_backward(fwd, xc, D, g, l1_grad, spec, plan):
  dtype = sae_lib.matmul_dtype(spec)
  dz = _mm(g, _t(D, plan), dtype)
  if l1_grad is not None:
    dz = dz + l1_grad[:, None]
  G = jnp.where(fwd["mask"], dz, 0.0)
  return {
    "W_enc_t": _mm(_t(G, plan), xc, dtype),
    "b_enc": jnp.sum(G, axis=0),
    "D": _mm(_t(fwd["z"], plan), g, dtype),
  }


# ------------------------------------------------------------------------------ the step


def make_train_step(
  spec: sae_lib.SAESpec, optimizer: optax.GradientTransformation, mesh: Mesh, shard_optimizer: bool = False
) -> Callable:
  """step(state, batch [B, d], valid [B]) -> (state, metrics); pure, for `jit_train_step`.

  `metrics["finite"]` is 1.0 while the loss, the gradient norm and the updated parameters are all
  finite, else 0.0 (the trainer stops a diverged run on it).

  `state` is laid out as `sharding.state_shardings(..., shard_optimizer)` says.
  """
  plan = _Plan(
    dp=mesh.shape[DATA],
    mp=mesh.shape[MODEL],
    cpu=jax.default_backend() == "cpu",
    shard_optimizer=bool(shard_optimizer),
  )
  param_specs = {k: shard_lib.PARTITION_RULES[k] for k in _PARAMS}
  grad_specs = (
    {k: shard_lib.ZERO_RULES[k] for k in _PARAMS} if plan.shard_optimizer and plan.dp > 1 else param_specs
  )
  stat_specs = P()
  sharded = jax.shard_map(
    functools.partial(_local_step, spec, plan),
    mesh=mesh,
    in_specs=(param_specs, P(MODEL), shard_lib.BATCH_SPEC, P(DATA)),
    out_specs=(grad_specs, P(MODEL), stat_specs),
    check_vma=False,
  )

  def step(state: State, batch: jax.Array, valid: jax.Array) -> tuple[State, dict]:
    params = state["params"]
    if spec.decoder_norm == "renorm":
      # Overcomplete renormalises D in place (outside autograd) before each forward.
      params = {**params, "D": sae_lib.normalize_rows(params["D"])}
    grads, fired, stats = sharded(params, state["tokens_since_fired"], batch, valid)
    grad_norm = optax.tree.norm(grads)
    # grad_norm reaches state.clip_by_global_norm (other transforms ignore it): one norm per step.
    updates, opt_state = optimizer.update(grads, state["opt_state"], params, grad_norm=grad_norm)
    new_params = optax.apply_updates(params, updates)
    if spec.decoder_norm == "unit_grad":
      new_params = {**new_params, "D": sae_lib.normalize_rows(new_params["D"])}
    n_valid = stats["n_valid"]
    counters = jnp.minimum(state["tokens_since_fired"] + n_valid.astype(jnp.int32), _COUNTER_CAP)
    tokens_since_fired = jnp.where(fired > 0, 0, counters)
    rows_skipped = state["rows_skipped"] + (batch.shape[0] - n_valid).astype(jnp.int32)
    new_state = {
      "params": new_params,
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "tokens_since_fired": tokens_since_fired,
      "rows_skipped": rows_skipped,
    }
    metrics = {k: v for k, v in stats.items() if k != "n_valid"}
    # 1 while the loss, the gradient norm and every new parameter are finite (a sum is NaN/Inf when
    # any element is): the trainer reads it with the statistics it already fetches, no extra sync.
    param_sum = sum(jnp.sum(p, dtype=jnp.float32) for p in jax.tree.leaves(new_params))
    metrics.update(
      grad_norm=grad_norm,
      dead_fraction=jnp.mean(tokens_since_fired >= spec.dead_tokens),
      rows_skipped=rows_skipped,
      finite=jnp.isfinite(stats["loss"] + grad_norm + param_sum).astype(jnp.float32),
    )
    return new_state, metrics

  return step


def jit_train_step(
  spec: sae_lib.SAESpec,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  state_sharding: Any,
  shard_optimizer: bool = False,
) -> Callable:
  """The step jitted with the state, batch and row-mask shardings; the state is donated."""
  step = make_train_step(spec, optimizer, mesh, shard_optimizer)
  return jax.jit(
    step,
    in_shardings=(state_sharding, shard_lib.batch_sharding(mesh), shard_lib.rows_sharding(mesh)),
    out_shardings=(state_sharding, None),
    donate_argnums=(0,),
  )
