"""The study's six families at the sizes of `config.encoder_training.<kind>`, built by the core's
sized factories (`sae_jax.encoders.factories`, which also builds the tests' tiny models)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sae_jax.encoders import factories


def _tower(c: Any) -> factories.Size:
  h = int(c.hidden)
  return factories.Size(h, 4 * h, layers=int(c.layers), heads=int(c.heads), max_positions=int(c.max_text_len))


def _decoder(c: Any) -> factories.Size:
  h, heads = int(c.hidden), int(c.heads)
  return factories.Size(
    h, 4 * h, layers=int(c.layers), heads=heads, kv_heads=int(c.kv_heads), head_dim=h // heads
  )


def build_clip(tok, cfg: Any, image_size: int):
  """CLIP with `cfg.clip`'s sizes (the same tower for text and images)."""
  c = cfg.clip
  return factories.clip(
    tok, _tower(c), _tower(c), image_size, patch_size=int(c.patch_size), projection_dim=int(c.projection_dim)
  )


def build_siglip(tok, cfg: Any, image_size: int):
  """SigLIP2 (`Siglip2Model`, NaFlex): the image is cut into (image_size / patch_size)^2 patches;
  trained from the SigLIP paper's logit scale log 10 and bias -10."""
  c = cfg.siglip
  p = int(c.patch_size)
  return factories.siglip2(
    tok,
    _tower(c),
    _tower(c),
    patch_size=p,
    num_patches=(image_size // p) ** 2,
    projection_size=int(c.hidden),
    logit_init=(10.0, -10.0),
  )


def _qwen_vision(q: Any, image_size: int, version: str) -> factories.QwenVision:
  dim = int(q.vision_dim)
  side = image_size // int(q.patch_size)
  extra = dict(mlp=2 * dim, positions=side * side) if version == "qwen3_vl" else {}
  return factories.QwenVision(
    depth=int(q.vision_depth), dim=dim, heads=max(1, dim // 16), patch_size=int(q.patch_size), **extra
  )


def build_qwen2_vl(tok, cfg: Any, image_size: int):
  """Qwen2-VL with `cfg.qwen2_vl`'s sizes (tied word embeddings, PAD = EOS)."""
  q = cfg.qwen2_vl
  text = dataclasses.replace(_decoder(q), head_dim=0)  # Qwen2-VL's text config has no head_dim
  vision = _qwen_vision(q, image_size, "qwen2_vl")
  return factories.qwen_vl("qwen2_vl", tok, text, vision, pad_is_eos=True, tie_embeddings=True)


def build_qwen3_vl(tok, cfg: Any, image_size: int):
  """Qwen3-VL with `cfg.qwen3_vl`'s sizes (DeepStack from the last vision block)."""
  q = cfg.qwen3_vl
  vision = _qwen_vision(q, image_size, "qwen3_vl")
  return factories.qwen_vl("qwen3_vl", tok, _decoder(q), vision, pad_is_eos=True, tie_embeddings=True)


def qwen_processor(kind: str, tok, cfg: Any, image_size: int):
  """The Qwen processor of `kind`; the images keep their size (a multiple of 2 patches)."""
  p = int(cfg[kind].patch_size)
  side = (image_size // (2 * p)) * 2 * p
  return factories.qwen_processor(kind, tok, p, side * side, side * side)


def build_paligemma(tok, cfg: Any, image_size: int):
  """PaliGemma with `cfg.paligemma`'s sizes. Its vocabulary is the trained tokenizer's alone: the
  processor's `<loc>`/`<seg>` tokens (never in the study's text) have no embedding rows."""
  c = cfg.paligemma
  dim = int(c.vision_dim)
  vision = factories.Size(dim, 2 * dim, layers=int(c.vision_depth), heads=max(1, dim // 16))
  return factories.paligemma(
    tok, _decoder(c), vision, image_size, patch_size=int(c.patch_size), vocab_size=len(tok)
  )


def build_chameleon(tok, cfg: Any, image_size: int):
  """Chameleon with `cfg.chameleon`'s sizes; its VQ-VAE reads images resized to `vq_resolution`
  (0: the data's own size)."""
  c = cfg.chameleon
  vq = factories.VQSize(
    embed_dim=int(c.vq_embed_dim),
    codes=int(c.vq_codes),
    channels=int(c.vq_channels),
    channel_multiplier=tuple(int(m) for m in c.vq_channel_multiplier),
  )
  text = dataclasses.replace(_decoder(c), head_dim=0)  # Chameleon's config derives it
  return factories.chameleon(tok, text, int(c.vq_resolution) or image_size, vq)


def build(kind: str, tok, cfg: Any, image_size: int) -> tuple:
  """(model, processor) of study family `kind` (`cfg`: config.encoder_training; `image_size`: the
  data's square images), with fresh weights drawn from torch's current seed."""
  if kind in ("qwen2_vl", "qwen3_vl"):
    model = (build_qwen2_vl if kind == "qwen2_vl" else build_qwen3_vl)(tok, cfg, image_size)
    return model, qwen_processor(kind, tok, cfg, image_size)
  builders = {
    "clip": build_clip,
    "siglip": build_siglip,
    "paligemma": build_paligemma,
    "chameleon": build_chameleon,
  }
  return builders[kind](tok, cfg, image_size)
