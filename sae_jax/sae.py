"""Top-K sparse autoencoder: parameters, initialisation, encode/decode, and the training loss.

    z = TopK_k(ReLU((x - b_dec) W_enc + b_enc)),    x_hat = z D + b_dec

D is [c, d] with one unit-norm concept per row. Two presets:
- `paper`: Overcomplete's TopKSAE as the authors trained it: Linear encoder with bias, no decoder
  bias, rows of D renormalised (a projection, outside the gradient) before every step, loss
  mean((x - x_hat)^2) + 0.01 * mean|z|.
- `modern`: pre-bias b_dec from the data's geometric median, W_enc initialised as D^T, the gradient
  component parallel to each row of D removed and rows renormalised after each update, AuxK.

Parameters are a plain dict {'W_enc', 'b_enc', 'D', 'b_dec'}, so sharding rules, orbax and other
stages address them by name. `TopKSAE` wraps the same functions as a Flax module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import kernels
from sae_jax.errors import SaeJaxError

Params = dict[str, jax.Array]
TopKFn = kernels.TopKFn


class SparseCode(NamedTuple):
  """k active concepts per row: `values` float32 [N, k] (>= 0), `indices` int32 [N, k]."""

  values: jax.Array
  indices: jax.Array


@dataclasses.dataclass(frozen=True)
class SAESpec:
  """Resolved, hashable SAE settings (a static argument of the jitted functions)."""

  d: int
  c: int
  k: int
  preset: str = "paper"
  decoder: str = "dense"
  backward: str = "scatter"
  top_k: str = "exact"
  approx_recall: float = 0.95
  compute_dtype: str = "float32"
  pre_bias: bool = False
  b_dec_init: str = "zeros"
  enc_init: str = "uniform"
  decoder_norm: str = "renorm"
  mse: str = "plain"
  l1_coef: float = 0.01
  aux_k: int = 0
  aux_coef: float = 0.0
  dead_tokens: int = 10_000_000


_PRESETS = {
  "paper": dict(
    pre_bias=False,
    b_dec_init="zeros",
    enc_init="uniform",
    decoder_norm="renorm",
    mse="plain",
    l1_coef=0.01,
    aux_k=0,
    aux_coef=0.0,
  ),
  "modern": dict(
    pre_bias=True,
    b_dec_init="geometric_median",
    enc_init="tied",
    decoder_norm="unit_grad",
    mse="normalized",
    l1_coef=0.0,
    aux_k=None,
    aux_coef=1 / 32,
  ),
}
_CHOICES = {
  "decoder": ("dense", "gather"),
  "backward": ("scatter", "dense"),
  "top_k": ("exact", "approx"),
  "compute_dtype": ("float32", "bfloat16"),
  "b_dec_init": ("zeros", "mean", "geometric_median"),
  "enc_init": ("uniform", "tied"),
  "decoder_norm": ("renorm", "unit_grad"),
  "mse": ("plain", "normalized"),
}


def _platform(platform: Optional[str]) -> str:
  return platform or jax.default_backend()


def default_decoder(platform: Optional[str] = None) -> str:
  """The decoder for "auto" (why, with figures: benchmarks/README.md)."""
  return "gather" if _platform(platform) == "cpu" else "dense"


def default_backward(platform: Optional[str] = None) -> str:
  """The backward pass for "auto": B*k-row scatter-adds on CPU, GEMMs on accelerators (where XLA
  runs scatters serially). Why, with figures: benchmarks/README.md."""
  return "scatter" if _platform(platform) == "cpu" else "dense"


def _cpu_flags() -> frozenset:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def default_compute_dtype(platform: Optional[str] = None) -> str:
  """The matmul dtype for "auto": bf16 on accelerators; on CPU bf16 only where the CPU has native
  bf16 dot products (avx512_bf16 / amx_bf16). Without them XLA's bf16 GEMM ran slower than its
  fp32 one (figures in benchmarks/README.md)."""
  if _platform(platform) != "cpu":
    return "bfloat16"
  return "bfloat16" if {"avx512_bf16", "amx_bf16"} & _cpu_flags() else "float32"


_AUTO = {"decoder": default_decoder, "backward": default_backward, "compute_dtype": default_compute_dtype}


def spec_from_config(sae_cfg: Any, platform: Optional[str] = None) -> SAESpec:
  """Resolves the "auto"/-1 fields of `config.sae` from its preset; validates every field."""
  preset = str(sae_cfg.preset)
  if preset not in _PRESETS:
    raise SaeJaxError(f"config.sae.preset={preset!r}: expected one of {tuple(_PRESETS)}")
  base = dict(_PRESETS[preset])
  d, c, k = int(sae_cfg.d), int(sae_cfg.c), int(sae_cfg.k)
  if d <= 0 or c <= 0:
    raise SaeJaxError(f"config.sae.d={d}, config.sae.c={c}: both must be positive")
  if not 0 < k <= c:
    raise SaeJaxError(f"config.sae.k={k}: expected 1 <= k <= config.sae.c={c}")
  if base["aux_k"] is None:
    base["aux_k"] = min(d // 2, c)
  out = dict(d=d, c=c, k=k, preset=preset, dead_tokens=int(sae_cfg.dead_tokens))
  for name in (
    "backward",
    "decoder",
    "top_k",
    "compute_dtype",
    "b_dec_init",
    "enc_init",
    "decoder_norm",
    "mse",
  ):
    value = str(sae_cfg[name])
    if value == "auto" and name == "decoder" and out["backward"] == "dense":
      value = "dense"  # the dense backward decodes with z D
    elif value == "auto" and name in _AUTO:
      value = _AUTO[name](platform)
    elif value == "auto" and name in base:
      value = base[name]
    if value not in _CHOICES[name]:
      raise SaeJaxError(f"config.sae.{name}={value!r}: expected one of {_CHOICES[name] + ('auto',)}")
    out[name] = value
  pre_bias = str(sae_cfg.pre_bias)
  if pre_bias not in ("auto", "yes", "no"):
    raise SaeJaxError(f"config.sae.pre_bias={pre_bias!r}: expected 'auto', 'yes' or 'no'")
  out["pre_bias"] = base["pre_bias"] if pre_bias == "auto" else pre_bias == "yes"
  for name, cast in (("l1_coef", float), ("aux_k", int), ("aux_coef", float)):
    value = cast(sae_cfg[name])
    out[name] = base[name] if value < 0 else value
  if out["backward"] == "dense" and out["decoder"] == "gather":
    raise SaeJaxError(
      "config.sae.decoder='gather' needs config.sae.backward='scatter' (the dense backward decodes "
      "with z D); set sae.decoder='dense' or 'auto'"
    )
  recall = float(sae_cfg.approx_recall)
  if not 0.0 < recall <= 1.0:
    raise SaeJaxError(f"config.sae.approx_recall={recall}: expected a value in (0, 1]")
  out["approx_recall"] = recall
  if out["aux_k"] > c:
    raise SaeJaxError(f"config.sae.aux_k={out['aux_k']}: must not exceed config.sae.c={c}")
  return SAESpec(**out)


# ----------------------------------------------------------------------------------- init


def normalize_rows(D: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Overcomplete's `normalize_l2`: D / (||D_i|| + 1e-8)."""
  return D / (jnp.linalg.norm(D, axis=1, keepdims=True) + eps)


def geometric_median(x: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
  """Weiszfeld's algorithm on the rows of x (float64 on the host; used once at init)."""
  x = np.asarray(x, np.float64)
  y = x.mean(0)
  for _ in range(iters):
    w = 1.0 / np.maximum(np.linalg.norm(x - y, axis=1), 1e-12)
    y_new = (w[:, None] * x).sum(0) / w.sum()
    if np.linalg.norm(y_new - y) <= tol * max(1.0, np.linalg.norm(y)):
      return y_new
    y = y_new
  return y


def init_params(rng: jax.Array, spec: SAESpec, data_sample: Optional[np.ndarray] = None) -> Params:
  """Initial parameters; `data_sample` [n, d] is needed for b_dec_init mean / geometric_median."""
  k_dict, k_enc, k_bias = jax.random.split(rng, 3)
  d, c = spec.d, spec.c
  if spec.enc_init == "uniform":
    # Overcomplete: xavier_uniform dictionary, torch.nn.Linear default encoder (U(+-1/sqrt(d))).
    bound = math.sqrt(6.0 / (c + d))
    D = jax.random.uniform(k_dict, (c, d), jnp.float32, -bound, bound)
    enc_bound = 1.0 / math.sqrt(d)
    W_enc = jax.random.uniform(k_enc, (d, c), jnp.float32, -enc_bound, enc_bound)
    b_enc = jax.random.uniform(k_bias, (c,), jnp.float32, -enc_bound, enc_bound)
    D = normalize_rows(D)
  else:
    D = normalize_rows(jax.random.normal(k_dict, (c, d), jnp.float32))
    W_enc = D.T
    b_enc = jnp.zeros((c,), jnp.float32)
  if spec.b_dec_init == "zeros" or not spec.pre_bias:
    b_dec = jnp.zeros((d,), jnp.float32)
  else:
    if data_sample is None:
      raise SaeJaxError(f"config.sae.b_dec_init={spec.b_dec_init!r} needs a data sample at init")
    sample = np.asarray(data_sample, np.float64)
    center = sample.mean(0) if spec.b_dec_init == "mean" else geometric_median(sample)
    b_dec = jnp.asarray(center, jnp.float32)
  return {"W_enc": W_enc, "b_enc": b_enc, "D": D, "b_dec": b_dec}


# ----------------------------------------------------------------------------------- math


def matmul_dtype(spec: SAESpec) -> Any:
  """The dtype of the SAE matmul operands (bf16 or fp32; results are always fp32)."""
  return jnp.bfloat16 if spec.compute_dtype == "bfloat16" else jnp.float32


def pre_activations(params: Params, x: jax.Array, spec: SAESpec) -> jax.Array:
  """ReLU((x - b_dec) W_enc + b_enc), [N, c] float32."""
  if spec.pre_bias:
    x = x - params["b_dec"]
  return jax.nn.relu(kernels.matmul(x, params["W_enc"], matmul_dtype(spec)) + params["b_enc"])


def dense_codes(code: SparseCode, c: int) -> jax.Array:
  """[N, c] view of a sparse code. For small sizes and tests: it is N*c floats."""
  n = code.values.shape[0]
  return jnp.zeros((n, c), code.values.dtype).at[jnp.arange(n)[:, None], code.indices].add(code.values)


def encode(
  params: Params, x: jax.Array, k: int, spec: Optional[SAESpec] = None, top_k: TopKFn = kernels.local_top_k
) -> SparseCode:
  """Sparse codes of rows x [N, d]."""
  chex.assert_rank(x, 2)
  d, c = params["W_enc"].shape
  if x.shape[1] != d:
    raise SaeJaxError(f"encode: input width {x.shape[1]} != SAE width d={d}")
  # Without a spec, subtract b_dec: it is zero for the paper preset, so this covers both.
  spec = spec or SAESpec(d=d, c=c, k=k, pre_bias=True)
  values, indices = top_k(pre_activations(params, x, spec), k)
  return SparseCode(values, indices.astype(jnp.int32))


def decode(params: Params, code: SparseCode, with_bias: bool = True) -> jax.Array:
  """sum_j values[:, j] * D[indices[:, j]] (+ b_dec), [N, d]."""
  chex.assert_equal_shape([code.values, code.indices])
  x_hat = kernels.sparse_decode(code.values.astype(jnp.float32), code.indices.astype(jnp.int32), params["D"])
  return x_hat + params["b_dec"] if with_bias else x_hat


class LossOutput(NamedTuple):
  loss: jax.Array
  mse: jax.Array
  l1: jax.Array
  aux: jax.Array
  code: SparseCode
  x_hat: jax.Array


def _decode_for_training(D: jax.Array, values: jax.Array, indices: jax.Array, spec: SAESpec) -> jax.Array:
  if spec.decoder == "dense":
    # z D as one GEMM over the dense codes (k nonzeros per row); backward: two NN GEMMs.
    z = dense_codes(SparseCode(values, indices), spec.c)
    return kernels.nn_matmul(z, D, matmul_dtype(spec))
  return kernels.sparse_decode(values, indices, D)


def loss_fn(
  params: Params,
  x: jax.Array,
  spec: SAESpec,
  valid: Optional[jax.Array] = None,
  dead: Optional[jax.Array] = None,
  top_k: TopKFn = kernels.local_top_k,
) -> tuple[jax.Array, LossOutput]:
  """Training loss on a batch x [B, d]; `valid` [B] masks skipped rows, `dead` [c] marks dead latents.

  The decoder is either dense (z D as one GEMM) or sparse (k gathered rows per sample); the encoder
  backward is sparse in both cases (`topk_encode`).
  """
  B = x.shape[0]
  dtype = matmul_dtype(spec)
  shift = params["b_dec"] if spec.pre_bias else None
  values, indices = kernels.topk_encode(
    x, shift, params["W_enc"], params["b_enc"], None, spec.k, dtype, top_k
  )
  x_hat = _decode_for_training(params["D"], values, indices, spec)
  if spec.pre_bias:
    x_hat = x_hat + params["b_dec"]
  w = jnp.ones((B,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  n_valid = jnp.maximum(w.sum(), 1.0)
  err = x - x_hat
  mse = jnp.sum(w[:, None] * err**2) / (n_valid * spec.d)
  # mean|z| over the dense [B, c] codes, as Overcomplete's z.abs().mean(); values are >= 0.
  l1 = jnp.sum(w[:, None] * values) / (n_valid * spec.c)
  loss = mse * reconstruction_scale(x, w, spec) + spec.l1_coef * l1
  aux = jnp.zeros((), jnp.float32)
  if spec.aux_k > 0 and dead is not None:
    # Computed only when some latent is dead (0 otherwise). The train step differentiates it
    # separately, outside the cond (see `aux_loss_fn`).
    aux = jax.lax.cond(
      jnp.any(dead),
      lambda ops: aux_loss_fn(ops[0], x, ops[1], spec, valid, dead, top_k),
      lambda _: jnp.zeros((), jnp.float32),
      (params, err),
    )
    loss = loss + spec.aux_coef * aux_scale(jnp.sum(dead), spec.aux_k) * aux
  return loss, LossOutput(loss, mse, l1, aux, SparseCode(values, indices), x_hat)


def reconstruction_scale(x: jax.Array, w: jax.Array, spec: SAESpec) -> jax.Array:
  """Factor on the plain MSE in the loss: 1, or for `mse="normalized"` (Gao et al.) d*n / sum_n
  ||x_n - mean(x)||^2 over the batch's valid rows, so the loss is the batch FVU and AuxK's weight
  does not scale with the activations' variance. A constant of the parameters (no gradient)."""
  if spec.mse == "plain":
    return jnp.ones((), jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  mean = jnp.sum(w[:, None] * x, axis=0) / n
  ss = jnp.sum(w[:, None] * (x - mean) ** 2)
  return (n * x.shape[1]) / jnp.maximum(ss, 1e-12)


def aux_scale(n_dead: jax.Array, aux_k: int) -> jax.Array:
  """min(n_dead / aux_k, 1), the weight of AuxK in the loss (as sparsify and OpenAI's code): with
  fewer dead latents than aux_k, the few that exist are not asked to explain the whole residual."""
  return jnp.minimum(n_dead.astype(jnp.float32) / aux_k, 1.0)


def aux_loss_fn(
  params: Params,
  x: jax.Array,
  err: jax.Array,
  spec: SAESpec,
  valid: Optional[jax.Array],
  dead: jax.Array,
  top_k: TopKFn = kernels.local_top_k,
) -> jax.Array:
  """AuxK (Gao et al. 2024), unscaled (the loss weighs it by `aux_scale`): the top aux_k dead latents reconstruct the residual `err`
  (x - x_hat of the main loss, a constant here), normalised by its variance.

  Differentiating through a lax.cond makes XLA copy the branch's residuals (W_enc and D among
  them) out of the forward cond and write zeros when it is not taken: at d=2048, c=16384 that
  cost ~1 s per step. So the train step takes grad(aux_loss_fn) inside a cond instead.
  """
  shift = params["b_dec"] if spec.pre_bias else None
  w = jnp.ones(x.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
  e = jax.lax.stop_gradient(err)
  aux_values, aux_indices = kernels.topk_encode(
    x, shift, params["W_enc"], params["b_enc"], dead, spec.aux_k, matmul_dtype(spec), top_k
  )
  e_hat = kernels.sparse_decode(aux_values, aux_indices, params["D"])
  e_mean = jnp.sum(w[:, None] * e, axis=0) / jnp.maximum(w.sum(), 1.0)  # masked rows excluded
  e_var = jnp.sum(w[:, None] * (e - e_mean) ** 2)
  return jnp.sum(w[:, None] * (e - e_hat) ** 2) / jnp.maximum(e_var, 1e-12)


def explained_variance(
  x: jax.Array, x_hat: jax.Array, valid: Optional[jax.Array] = None
) -> dict[str, jax.Array]:
  """Both R^2 conventions: per-dimension FVU, and Overcomplete's scalar r2_score."""
  w = jnp.ones(x.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  ss_res = jnp.sum(w[:, None] * (x - x_hat) ** 2)
  mean_d = jnp.sum(w[:, None] * x, 0) / n
  ss_tot_dim = jnp.sum(w[:, None] * (x - mean_d) ** 2)
  mean_all = jnp.sum(w[:, None] * x) / (n * x.shape[1])
  ss_tot_all = jnp.sum(w[:, None] * (x - mean_all) ** 2)
  fvu = ss_res / jnp.maximum(ss_tot_dim, 1e-12)
  r2_overcomplete = 1.0 - (ss_res / (n * x.shape[1])) / (ss_tot_all / (n * x.shape[1]) + 1e-6)
  return {"fvu": fvu, "r2": 1.0 - fvu, "r2_overcomplete": r2_overcomplete}


class TopKSAE(nn.Module):
  """Flax module over the same functions, for use inside larger Flax models."""

  spec: SAESpec

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[SparseCode, jax.Array]:
    s = self.spec
    params = {
      "W_enc": self.param("W_enc", nn.initializers.lecun_normal(), (s.d, s.c)),
      "b_enc": self.param("b_enc", nn.initializers.zeros, (s.c,)),
      "D": self.param("D", lambda k, shape: normalize_rows(jax.random.normal(k, shape)), (s.c, s.d)),
      "b_dec": self.param("b_dec", nn.initializers.zeros, (s.d,)),
    }
    code = encode(params, x, s.k, s)
    return code, decode({**params, "D": normalize_rows(params["D"])}, code, with_bias=s.pre_bias)
