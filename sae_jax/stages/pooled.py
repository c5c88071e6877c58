"""Pooled embeddings of encoder batches."""

from __future__ import annotations

import numpy as np

from sae_jax import config_utils
from sae_jax.encoders import pooling
from sae_jax.errors import SaeJaxError

POOL_VARIANTS = pooling.VARIANTS + ("embed",)


def check_variants(variants, encoder) -> tuple:
  variants = config_utils.as_tuple(variants)
  if not variants:
    raise SaeJaxError("config.extract.pooling is empty; expected some of " + ", ".join(POOL_VARIANTS))
  for v in variants:
    if v not in POOL_VARIANTS:
      raise SaeJaxError(f"config.extract.pooling: unknown variant {v!r}; expected some of {POOL_VARIANTS}")
    if v == "embed" and encoder.kind != "contrastive":
      raise SaeJaxError(
        f'config.extract.pooling: "embed" (final embeddings) needs a contrastive model '
        f"(CLIP/SigLIP); {encoder.name} is a {encoder.kind} model"
      )
    if v != "embed" and encoder.kind == "contrastive" and not encoder.tokens:
      raise SaeJaxError(
        f"config.extract.pooling: {v!r} pools token states; set "
        f'config.extract.contrastive_tokens=True for {encoder.name} or use "embed"'
      )
  return variants


def pool_batch(out, variants) -> dict[str, np.ndarray]:
  """Pooled [B, d] float32 arrays of one encoder batch for each variant.

  Pooling runs in NumPy on the (zero-copy on CPU) host view of the hidden states: batches have
  variable lengths and jnp would compile every op for every new shape."""
  from sae_jax.encoders import base as enc_base  # torch: the `extract` extra

  res = {}
  hidden = None
  for v in variants:
    if v == "embed":
      res[v] = enc_base.to_numpy(out.embeds)
      continue
    if hidden is None:
      hidden = enc_base.to_numpy(out.hidden)
      mask = out.attention_mask.cpu().numpy()
      types = out.token_types.cpu().numpy()
    res[v] = np.asarray(pooling.pool(v, hidden, mask, types), np.float32)
  return res
