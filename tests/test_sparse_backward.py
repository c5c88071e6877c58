"""The hand-written backward passes of sae_jax.sae (sparse encoder/decoder VJPs, NN-layout matmul)
against plain JAX autodiff of the textbook formulation: dense [B, c] activations, lax.top_k, an
einsum over gathered rows. Same loss, same gradients, for both presets, both decoders, with and
without dead latents (AuxK), and with a data-validity mask."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sae_jax import kernels
from sae_jax import sae as sae_lib
from sae_jax import sharding as shard_lib
from sae_jax.training import state as state_lib
from sae_jax.training import step as step_lib
from tests.helpers.reference import rel_err

D_IN, C, K, B = 32, 256, 8, 128


def _reference_loss(params, x, spec, valid, dead=None):
  """The loss written the obvious way; JAX differentiates it end to end."""
  xc = x - params["b_dec"] if spec.pre_bias else x
  dtype = jnp.bfloat16 if spec.compute_dtype == "bfloat16" else jnp.float32
  pre = jnp.matmul(xc.astype(dtype), params["W_enc"].astype(dtype), preferred_element_type=jnp.float32)
  acts = jax.nn.relu(pre + params["b_enc"])
  values, indices = jax.lax.top_k(acts, spec.k)
  x_hat = jnp.einsum("bk,bkd->bd", values, params["D"][indices])
  if spec.pre_bias:
    x_hat = x_hat + params["b_dec"]
  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  err = x - x_hat
  sse = jnp.sum(w[:, None] * err**2)
  if spec.mse == "normalized":  # the batch FVU: sse over the valid rows' total squared deviation
    x_mean = jnp.sum(w[:, None] * x, axis=0) / n
    recon = sse / jnp.sum(w[:, None] * (x - x_mean) ** 2)
  else:
    recon = sse / (n * spec.d)
  loss = recon + spec.l1_coef * jnp.sum(w[:, None] * values) / (n * spec.c)
  if spec.aux_k > 0:
    av, ai = jax.lax.top_k(jnp.where(dead[None, :], acts, 0.0), spec.aux_k)
    e = jax.lax.stop_gradient(err)
    e_hat = jnp.einsum("bk,bkd->bd", av, params["D"][ai])
    e_mean = jnp.sum(w[:, None] * e, axis=0) / n  # over the valid rows only
    e_var = jnp.sum(w[:, None] * (e - e_mean) ** 2)
    aux = jnp.sum(w[:, None] * (e - e_hat) ** 2) / jnp.maximum(e_var, 1e-12)
    scale = jnp.minimum(jnp.sum(dead) / spec.aux_k, 1.0)  # sparsify / OpenAI
    loss = loss + spec.aux_coef * scale * jnp.where(jnp.any(dead), aux, 0.0)
  return loss


def _setup(preset, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(B, D_IN)) * np.exp(rng.normal(size=D_IN) * 0.3) + 0.5).astype(np.float32)
  spec = sae_lib.SAESpec(d=D_IN, c=C, k=K, preset=preset)
  if preset == "modern":
    spec = dataclasses.replace(
      spec,
      pre_bias=True,
      b_dec_init="mean",
      enc_init="tied",
      decoder_norm="unit_grad",
      l1_coef=0.0,
      aux_k=D_IN // 2,
      aux_coef=1 / 32,
      mse="normalized",
    )
  else:
    spec = dataclasses.replace(spec, l1_coef=0.01)
  params = sae_lib.init_params(jax.random.key(seed), spec, x)
  # Non-trivial biases and a non-unit dictionary so every gradient term is exercised.
  params = {
    **params,
    "b_enc": jnp.asarray(rng.normal(size=C).astype(np.float32) * 0.05),
    "b_dec": params["b_dec"] + 0.1 if spec.pre_bias else params["b_dec"],
    "D": params["D"] * jnp.asarray(rng.uniform(0.5, 1.5, size=(C, 1)).astype(np.float32)),
  }
  return spec, params, jnp.asarray(x)


_rel = rel_err


@pytest.mark.parametrize("preset", ["paper", "modern"])
@pytest.mark.parametrize("decoder", ["gather", "dense"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_loss_and_grads_match_autodiff(preset, decoder, with_dead, monkeypatch):
  # Blocks of 32 rows, so the blocked encoder forward (GEMM + ReLU + top-k per block) is tested.
  monkeypatch.setattr(kernels, "_ENCODER_BLOCK_ROWS", 32)
  monkeypatch.setattr(kernels, "_MIN_BLOCK_ROWS", 32)
  assert kernels.encoder_block_rows(B) == 32
  spec, params, x = _setup(preset)
  spec = dataclasses.replace(spec, decoder=decoder)
  valid = jnp.asarray(np.arange(B) % 7 != 3)  # some rows masked out
  # 8 dead latents, fewer than aux_k = 16: AuxK weighs 1/2 (min(n_dead / aux_k, 1)).
  dead = jnp.asarray(np.arange(C) % 32 == 0) if with_dead else jnp.zeros((C,), bool)
  (loss, out), grads = jax.jit(jax.value_and_grad(sae_lib.loss_fn, has_aux=True), static_argnums=2)(
    params, x, spec, valid, dead
  )
  ref_loss, ref_grads = jax.value_and_grad(_reference_loss)(params, x, spec, valid, dead)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  if spec.aux_k > 0:
    assert (float(out.aux) > 0) == with_dead
  for name in ("W_enc", "b_enc", "D") + (("b_dec",) if spec.pre_bias else ()):
    assert np.linalg.norm(ref_grads[name]) > 0, name
    assert _rel(grads[name], ref_grads[name]) < 1e-5, (name, _rel(grads[name], ref_grads[name]))
  if not spec.pre_bias:
    assert not np.any(np.asarray(grads["b_dec"]))


def test_bfloat16_compute_matches_autodiff_with_bf16_matmul():
  """bf16 operands in the encoder GEMM select the same latents as autodiff of the same bf16 GEMM;
  the backward passes then differ only by bf16 rounding (the reference's, or our dense decoder's
  bf16 cotangents)."""
  spec, params, x = _setup("paper", seed=1)
  valid = jnp.ones((B,), bool)
  grad_fn = jax.jit(jax.value_and_grad(sae_lib.loss_fn, has_aux=True), static_argnums=2)
  for decoder in ("gather", "dense"):
    s16 = dataclasses.replace(spec, decoder=decoder, compute_dtype="bfloat16")
    (l16, _), g16 = grad_fn(params, x, s16, valid)
    ref_loss, ref = jax.value_and_grad(_reference_loss)(params, x, s16, valid)
    np.testing.assert_allclose(float(l16), float(ref_loss), rtol=1e-2 if decoder == "dense" else 1e-5)
    for name in ("W_enc", "b_enc", "D"):
      assert _rel(g16[name], ref[name]) < 2e-2, (decoder, name, _rel(g16[name], ref[name]))


def test_encoder_and_decoder_input_gradients():
  """d/dx of topk_encode and d/dvalues of sparse_decode (not used in training, still exact)."""
  spec, params, x = _setup("modern", seed=2)
  shift = params["b_dec"]
  probe = jnp.asarray(np.random.default_rng(3).normal(size=(B, K)).astype(np.float32))

  def ours(x, shift):
    v, _ = kernels.topk_encode(x, shift, params["W_enc"], params["b_enc"], None, K, jnp.float32)
    return jnp.sum(v * probe)

  def ref(x, shift):
    v, _ = jax.lax.top_k(jax.nn.relu((x - shift) @ params["W_enc"] + params["b_enc"]), K)
    return jnp.sum(v * probe)

  for a, b in zip(jax.grad(ours, (0, 1))(x, shift), jax.grad(ref, (0, 1))(x, shift)):
    assert _rel(a, b) < 1e-5
  code = sae_lib.encode(params, x, K)
  g = jax.grad(lambda v: jnp.sum(kernels.sparse_decode(v, code.indices, params["D"]) ** 2))(code.values)
  g_ref = jax.grad(lambda v: jnp.sum(jnp.einsum("bk,bkd->bd", v, params["D"][code.indices]) ** 2))(
    code.values
  )
  assert _rel(g, g_ref) < 1e-5


def test_train_step_with_dead_latents_matches_loss_fn_gradient():
  """The step differentiates AuxK separately (inside its cond); the update must equal Adam on
  grad(loss_fn) with the parallel component removed, and report the same loss and aux."""
  import optax

  spec, params, x = _setup("modern", seed=4)
  spec = dataclasses.replace(spec, dead_tokens=100)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(8e-4))
  valid = jnp.asarray(np.arange(B) % 5 != 0)
  state = state_lib.init_state(params, optimizer)
  since = np.where(np.arange(C) % 4 == 0, 1000, 0).astype(np.int32)
  state = {**state, "tokens_since_fired": jnp.asarray(since)}
  mesh = shard_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, model=1)), jax.devices()[:1])
  new_state, metrics = jax.jit(step_lib.make_train_step(spec, optimizer, mesh))(state, x, valid)

  dead = jnp.asarray(since >= 100)
  (loss, out), g = jax.value_and_grad(sae_lib.loss_fn, has_aux=True)(params, x, spec, valid, dead)
  g = {**g, "D": step_lib.remove_parallel_component(g["D"], params["D"])}
  updates, _ = optimizer.update(g, optimizer.init(params), params)
  ref = optax.apply_updates(params, updates)
  ref = {**ref, "D": sae_lib.normalize_rows(ref["D"])}
  assert float(out.aux) > 0
  np.testing.assert_allclose(float(metrics["aux_loss"]), float(out.aux), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  for name in ref:
    assert _rel(new_state["params"][name], ref[name]) < 1e-5, name
