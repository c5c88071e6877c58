"""Pooling of token-level hidden states into one embedding per sample (paper Appendix C, Figure 4).

All functions are pure: they take `hidden` [B, T, d], an attention mask [B, T] (True/1 on real tokens,
False/0 on padding) and, for the masking ablations, per-token types [B, T] (see
`sae_jax.data.shards.TOKEN_TYPES`), and return [B, d] float32. They accept NumPy or JAX arrays and
are jit-able with JAX inputs; NumPy inputs are computed in NumPy (no per-shape compilation, which is
what extraction uses on its variable-length batches). Left and right padding are both handled: nothing assumes where the pad tokens are.

Variants (names used in `config.extract.pooling`):
  mean            mean over all real tokens of the last layer (the paper's default)
  last_token      hidden state of the last real (non-pad) token, for the prompt
                  `<image> <text> Summarize the above image and sentence in one word:`
  mean_no_image   mean over real tokens that are not image tokens (Figure 4, "w/o image")
  mean_no_prompt  mean over real tokens that are not prompt tokens (Figure 4, "w/o prompt")
A sample with no token left after masking pools to the zero vector (never NaN).
"""

import jax.numpy as jnp
import numpy as np

from sae_jax.data.shards import TOKEN_TYPES
from sae_jax.errors import SaeJaxError

TOKEN_SPECIAL, TOKEN_IMAGE, TOKEN_TEXT, TOKEN_PROMPT = (
  TOKEN_TYPES.index(t) for t in ("special", "image", "text", "prompt")
)

VARIANTS = ("mean", "last_token", "mean_no_image", "mean_no_prompt")


def _xp(*arrays):
  """jax.numpy if any input is a jax array (or a tracer), else NumPy."""
  for a in arrays:
    if a is not None and type(a).__module__.startswith(("jax", "jaxlib")):
      return jnp
  return np


def masked_mean(hidden, mask):
  """Mean of `hidden` [B,T,d] over the positions where `mask` [B,T] is true; zeros if none."""
  xp = _xp(hidden, mask)
  hidden = xp.asarray(hidden, xp.float32)
  m = xp.asarray(mask).astype(xp.float32)
  total = xp.einsum("btd,bt->bd", hidden, m)
  count = xp.maximum(m.sum(axis=1, keepdims=True), 1.0)
  return total / count


def mean_pool(hidden, attention_mask):
  """Mean over all real (non-pad) tokens."""
  return masked_mean(hidden, _xp(attention_mask).asarray(attention_mask).astype(bool))


def last_token_index(attention_mask):
  """Index [B] of the last real token of each row, for left or right padding (0 if a row is empty)."""
  xp = _xp(attention_mask)
  m = xp.asarray(attention_mask).astype(bool)
  positions = xp.arange(m.shape[1])[None, :]
  return xp.max(xp.where(m, positions, -1), axis=1).clip(0)


def last_token_pool(hidden, attention_mask):
  """Hidden state of the last non-pad token of each row."""
  xp = _xp(hidden, attention_mask)
  hidden = xp.asarray(hidden, xp.float32)
  idx = last_token_index(attention_mask)
  return xp.take_along_axis(hidden, xp.asarray(idx)[:, None, None], axis=1)[:, 0, :]


def keep_mask(attention_mask, token_types, drop_type):
  """Real tokens whose type is not `drop_type`."""
  xp = _xp(attention_mask, token_types)
  return xp.asarray(attention_mask).astype(bool) & (xp.asarray(token_types) != drop_type)


def mean_pool_without_image(hidden, attention_mask, token_types):
  return masked_mean(hidden, keep_mask(attention_mask, token_types, TOKEN_IMAGE))


def mean_pool_without_prompt(hidden, attention_mask, token_types):
  return masked_mean(hidden, keep_mask(attention_mask, token_types, TOKEN_PROMPT))


def pool(variant, hidden, attention_mask, token_types=None):
  """Dispatch by variant name (see module docstring)."""
  if variant == "mean":
    return mean_pool(hidden, attention_mask)
  if variant == "last_token":
    return last_token_pool(hidden, attention_mask)
  if variant == "mean_no_image":
    return mean_pool_without_image(hidden, attention_mask, token_types)
  if variant == "mean_no_prompt":
    return mean_pool_without_prompt(hidden, attention_mask, token_types)
  raise SaeJaxError(
    f"config.extract.pooling: unknown variant {variant!r}; expected one of {VARIANTS + ('embed',)}"
  )
