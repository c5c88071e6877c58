"""The SAE math against an independent NumPy implementation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sae_jax import sae as sae_lib
from sae_jax.errors import SaeJaxError
from sae_jax.training import step as step_lib


def _np_forward(params, x, spec, dead=None):
  """Dense NumPy reference: z = TopK(ReLU(...)), x_hat = z D (+ b_dec), and the loss terms."""
  W, b, D, bd = (np.asarray(params[k], np.float64) for k in ("W_enc", "b_enc", "D", "b_dec"))
  x = np.asarray(x, np.float64)
  xin = x - bd if spec.pre_bias else x
  acts = np.maximum(xin @ W + b, 0.0)
  z = np.zeros_like(acts)
  for n in range(x.shape[0]):
    top = np.argsort(-acts[n], kind="stable")[: spec.k]
    z[n, top] = acts[n, top]
  x_hat = z @ D + (bd if spec.pre_bias else 0.0)
  mse = np.mean((x - x_hat) ** 2)
  l1 = np.mean(np.abs(z))
  aux = 0.0
  if spec.aux_k and dead is not None and dead.any():
    e = x - x_hat
    da = np.where(dead[None, :], acts, 0.0)
    za = np.zeros_like(da)
    for n in range(x.shape[0]):
      top = np.argsort(-da[n], kind="stable")[: spec.aux_k]
      za[n, top] = da[n, top]
    aux = np.sum((e - za @ D) ** 2) / np.sum((e - e.mean(0)) ** 2)
  scale = min(dead.sum() / spec.aux_k, 1.0) if spec.aux_k and dead is not None else 0.0
  # modern: normalised MSE (Gao et al.), the batch FVU: sum of squared errors over sum_n ||x_n - x̄||^2.
  recon = mse if spec.mse == "plain" else np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
  loss = recon + spec.l1_coef * l1 + spec.aux_coef * scale * aux
  return z, x_hat, loss, mse, l1, aux


def _setup(preset, d=24, c=96, k=6, n=40, seed=0):
  cfg = base.get_config()
  cfg.sae.preset, cfg.sae.d, cfg.sae.c, cfg.sae.k = preset, d, c, k
  spec = sae_lib.spec_from_config(cfg.sae, platform="cpu")
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32) + 0.5
  params = sae_lib.init_params(jax.random.key(seed), spec, x)
  # Perturb so W_enc != D^T and b_enc != 0 for the modern preset too.
  params = {k_: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k_, v in params.items()}
  params["D"] = sae_lib.normalize_rows(params["D"])
  return spec, params, x


@pytest.mark.parametrize("preset", ["paper", "modern"])
@pytest.mark.parametrize("decoder", ["dense", "gather"])
def test_loss_matches_numpy(preset, decoder):
  spec, params, x = _setup(preset)
  spec = dataclasses.replace(spec, decoder=decoder)
  dead = np.zeros(spec.c, bool)
  dead[::16] = True  # 6 dead latents < aux_k = 12 (modern): AuxK weighs min(6 / 12, 1) = 1/2
  z_ref, xhat_ref, loss_ref, mse_ref, l1_ref, aux_ref = _np_forward(params, x, spec, dead)
  loss, out = sae_lib.loss_fn(params, jnp.asarray(x), spec, None, jnp.asarray(dead))
  np.testing.assert_allclose(out.x_hat, xhat_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(out.mse, mse_ref, rtol=1e-5)
  np.testing.assert_allclose(out.l1, l1_ref, rtol=1e-5)
  np.testing.assert_allclose(out.aux, aux_ref, rtol=1e-4)
  dense = np.asarray(sae_lib.dense_codes(out.code, spec.c))
  np.testing.assert_allclose(dense, z_ref, rtol=1e-5, atol=1e-6)
  if preset == "modern":
    assert aux_ref > 0 and spec.aux_k == spec.d // 2 and spec.aux_coef == 1 / 32
  else:
    assert spec.l1_coef == 0.01 and spec.aux_k == 0 and not spec.pre_bias


def test_dense_and_gather_decoders_have_equal_gradients():
  spec, params, x = _setup("modern")
  dead = jnp.zeros(spec.c, bool).at[::4].set(True)
  grads = {}
  for decoder in ("dense", "gather"):
    s = dataclasses.replace(spec, decoder=decoder)
    grads[decoder] = jax.grad(lambda p: sae_lib.loss_fn(p, jnp.asarray(x), s, None, dead)[0])(params)
  for name in params:
    np.testing.assert_allclose(grads["dense"][name], grads["gather"][name], rtol=1e-4, atol=1e-7)


def test_encode_decode_against_numpy():
  spec, params, x = _setup("modern")
  code = sae_lib.encode(params, jnp.asarray(x), spec.k, spec)
  z_ref, xhat_ref, *_ = _np_forward(params, x, spec)
  assert code.values.shape == (x.shape[0], spec.k) and code.indices.dtype == jnp.int32
  np.testing.assert_allclose(sae_lib.dense_codes(code, spec.c), z_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sae_lib.decode(params, code), xhat_ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(SaeJaxError, match="input width 7 != SAE width d=24"):
    sae_lib.encode(params, jnp.zeros((3, 7)), spec.k)


def test_masked_rows_do_not_count():
  spec, params, x = _setup("paper")
  valid = np.ones(x.shape[0], np.float32)
  valid[5:9] = 0
  garbage = x.copy()
  garbage[5:9] = 1e3
  _, out_masked = sae_lib.loss_fn(params, jnp.asarray(garbage), spec, jnp.asarray(valid))
  keep = valid > 0
  _, out_kept = sae_lib.loss_fn(params, jnp.asarray(x[keep]), spec)
  np.testing.assert_allclose(out_masked.loss, out_kept.loss, rtol=1e-5)
  ev = sae_lib.explained_variance(jnp.asarray(garbage), out_masked.x_hat, jnp.asarray(valid))
  ev_ref = sae_lib.explained_variance(jnp.asarray(x[keep]), out_kept.x_hat)
  np.testing.assert_allclose(ev["fvu"], ev_ref["fvu"], rtol=1e-5)


def test_explained_variance_conventions():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((50, 8)) * np.arange(1, 9) + 3.0
  x_hat = x + 0.3 * rng.standard_normal(x.shape)
  ev = sae_lib.explained_variance(jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32))
  fvu = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
  r2_oc = 1 - np.mean((x - x_hat) ** 2) / (np.mean((x - x.mean()) ** 2) + 1e-6)
  np.testing.assert_allclose(ev["fvu"], fvu, rtol=1e-5)
  np.testing.assert_allclose(ev["r2_overcomplete"], r2_oc, rtol=1e-5)


def test_unit_grad_removes_parallel_component():
  rng = np.random.default_rng(2)
  D = np.asarray(sae_lib.normalize_rows(jnp.asarray(rng.standard_normal((10, 6)), jnp.float32)))
  g = rng.standard_normal((10, 6)).astype(np.float32)
  out = np.asarray(step_lib.remove_parallel_component(jnp.asarray(g), jnp.asarray(D)))
  np.testing.assert_allclose(np.sum(out * D, axis=1), 0, atol=1e-6)
  np.testing.assert_allclose(out, g - np.sum(g * D, 1, keepdims=True) * D, rtol=1e-5, atol=1e-6)


def test_geometric_median_minimises_sum_of_distances():
  rng = np.random.default_rng(3)
  x = np.concatenate([rng.standard_normal((200, 5)), 50 + rng.standard_normal((20, 5))])
  gm = sae_lib.geometric_median(x)
  cost = lambda y: np.linalg.norm(x - y, axis=1).sum()
  for _ in range(20):
    assert cost(gm) <= cost(gm + 0.01 * rng.standard_normal(5)) + 1e-9
  assert np.linalg.norm(gm) < 3 < np.linalg.norm(x.mean(0))  # robust to the outlying cluster


def test_modern_init_is_tied_and_centred():
  cfg = base.get_config()
  cfg.sae.preset, cfg.sae.d, cfg.sae.c = "modern", 16, 64
  spec = sae_lib.spec_from_config(cfg.sae)
  x = np.random.default_rng(0).standard_normal((500, 16)) + 4.0
  p = sae_lib.init_params(jax.random.key(0), spec, x)
  np.testing.assert_allclose(p["W_enc"], np.asarray(p["D"]).T)
  np.testing.assert_allclose(np.linalg.norm(p["D"], axis=1), 1, rtol=1e-6)
  np.testing.assert_allclose(p["b_dec"], sae_lib.geometric_median(x), rtol=1e-5)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("preset", "fancy", "config.sae.preset='fancy'"),
    ("k", 0, "config.sae.k=0"),
    ("decoder", "sparse", "config.sae.decoder='sparse'"),
    ("compute_dtype", "fp8", "config.sae.compute_dtype='fp8'"),
    ("aux_k", 10_000, "config.sae.aux_k=10000"),
    ("backward", "sparse", "config.sae.backward='sparse'"),
    ("top_k", "fast", "config.sae.top_k='fast'"),
    ("approx_recall", 1.5, "config.sae.approx_recall=1.5"),
  ],
)
def test_bad_sae_fields(field, value, message):
  cfg = base.get_config()
  cfg.sae[field] = value
  with pytest.raises(SaeJaxError, match=message.replace("(", r"\(")):
    sae_lib.spec_from_config(cfg.sae)


@pytest.mark.parametrize(
  "platform, backward, decoder, dtype",
  [
    ("cpu", "scatter", "gather", None),
    ("tpu", "dense", "dense", "bfloat16"),
    ("gpu", "dense", "dense", "bfloat16"),
  ],
)
def test_auto_fields_follow_the_platform(platform, backward, decoder, dtype):
  cfg = base.get_config()
  cfg.sae.backward, cfg.sae.decoder, cfg.sae.compute_dtype = "auto", "auto", "auto"
  spec = sae_lib.spec_from_config(cfg.sae, platform=platform)
  assert (spec.backward, spec.decoder) == (backward, decoder)
  if dtype is None:  # CPU: bf16 only with native bf16 dot products
    with open("/proc/cpuinfo") as f:
      flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    dtype = "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"
  assert spec.compute_dtype == dtype
  cfg.sae.backward = "dense"  # an explicit dense backward takes the dense decoder under "auto"
  assert sae_lib.spec_from_config(cfg.sae, platform="cpu").decoder == "dense"
  cfg.sae.decoder = "gather"
  with pytest.raises(SaeJaxError, match=r"config.sae.decoder='gather' needs config.sae.backward='scatter'"):
    sae_lib.spec_from_config(cfg.sae, platform="cpu")


def test_flax_module_matches_functions():
  spec = sae_lib.SAESpec(d=8, c=32, k=4, pre_bias=True)
  module = sae_lib.TopKSAE(spec)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
  variables = module.init(jax.random.key(0), x)
  code, x_hat = module.apply(variables, x)
  p = dict(variables["params"])
  code_ref = sae_lib.encode(p, x, 4, spec)
  np.testing.assert_array_equal(code.indices, code_ref.indices)
  np.testing.assert_allclose(
    x_hat, sae_lib.decode({**p, "D": sae_lib.normalize_rows(p["D"])}, code_ref), rtol=1e-6
  )
