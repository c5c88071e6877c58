"""One sized factory per model family: an HF model and its processor from a tokenizer and sizes.

The tests' tiny random-weight models (`sae_jax.encoders.tiny`) and the models the shapes study
trains (the study's `trainers.families`) are built by the same functions; only the sizes differ.
Each factory returns `(model, processor)` with the model as HF constructs it (train mode); `seed`
seeds torch right before the weights are drawn, so a model is a function of (tokenizer, sizes, seed).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

from sae_jax.errors import SaeJaxError


@dataclasses.dataclass(frozen=True)
class Size:
  """A transformer stack's sizes. `kv_heads` and `head_dim` are passed only when set (> 0): HF's
  defaults are heads and hidden / heads."""

  hidden: int
  intermediate: int
  layers: int
  heads: int
  kv_heads: int = 0
  head_dim: int = 0
  max_positions: int = 512

  def tower(self) -> dict:
    """The keys every HF encoder tower (CLIP / SigLIP text and vision, BERT) shares."""
    return dict(
      hidden_size=self.hidden,
      intermediate_size=self.intermediate,
      num_hidden_layers=self.layers,
      num_attention_heads=self.heads,
    )

  def decoder(self, vocab_size: int) -> dict:
    """A decoder LM's keys (Gemma2, Qwen2/3, Chameleon)."""
    out = dict(
      vocab_size=vocab_size,
      hidden_size=self.hidden,
      intermediate_size=self.intermediate,
      num_hidden_layers=self.layers,
      num_attention_heads=self.heads,
      max_position_embeddings=self.max_positions,
    )
    if self.kv_heads:
      out["num_key_value_heads"] = self.kv_heads
    if self.head_dim:
      out["head_dim"] = self.head_dim
    return out


def _seeded(seed: Optional[int]) -> None:
  if seed is not None:
    import torch

    torch.manual_seed(int(seed))


def _special_ids(tok) -> dict:
  return dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)


# --------------------------------------------------------------------------------------- contrastive


def clip(tok, text: Size, vision: Size, image_size: int, patch_size: int, projection_dim: int, seed=None):
  """`CLIPModel` (InfoNCE towers) and its processor (square images of `image_size`)."""
  from transformers import CLIPConfig, CLIPModel, CLIPProcessor
  from transformers.models.clip import CLIPImageProcessorPil

  cfg = CLIPConfig(
    text_config=dict(
      text.tower(), vocab_size=len(tok), max_position_embeddings=text.max_positions, **_special_ids(tok)
    ),
    vision_config=dict(vision.tower(), image_size=image_size, patch_size=patch_size),
    projection_dim=projection_dim,
  )
  ip = CLIPImageProcessorPil(
    size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
  )
  _seeded(seed)
  return CLIPModel(cfg), CLIPProcessor(image_processor=ip, tokenizer=tok)


def siglip(tok, text: Size, vision: Size, image_size: int, patch_size: int, seed=None):
  """`SiglipModel` (SigLIP v1, fixed resolution) and its processor."""
  from transformers import SiglipConfig, SiglipModel, SiglipProcessor
  from transformers.models.siglip import SiglipImageProcessorPil

  ids = _special_ids(tok)
  ids["bos_token_id"] = tok.eos_token_id  # SigLIP's text tower has no BOS
  cfg = SiglipConfig(
    text_config=dict(text.tower(), vocab_size=len(tok), max_position_embeddings=text.max_positions, **ids),
    vision_config=dict(vision.tower(), image_size=image_size, patch_size=patch_size),
  )
  ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
  _seeded(seed)
  return SiglipModel(cfg), SiglipProcessor(image_processor=ip, tokenizer=tok)


def siglip2(
  tok,
  text: Size,
  vision: Size,
  patch_size: int,
  num_patches: int,
  projection_size: Optional[int] = None,
  logit_init: Optional[tuple] = None,
  seed=None,
):
  """`Siglip2Model` (NaFlex: up to `num_patches` patches per image) and its processor.
  `logit_init`: (temperature t, bias b) set as logit_scale = log t, logit_bias = b (the SigLIP
  paper trains from t = 10, b = -10; HF initialises both at 0, where the sigmoid loss stalls)."""
  from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
  from transformers.models.siglip2 import Siglip2ImageProcessorPil

  text_cfg = dict(text.tower(), vocab_size=len(tok), max_position_embeddings=text.max_positions)
  text_cfg.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
  if projection_size is not None:
    text_cfg["projection_size"] = int(projection_size)
  cfg = Siglip2Config(
    text_config=text_cfg, vision_config=dict(vision.tower(), patch_size=patch_size, num_patches=num_patches)
  )
  ip = Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=num_patches)
  _seeded(seed)
  model = Siglip2Model(cfg)
  if logit_init is not None:
    import torch

    with torch.no_grad():
      model.logit_scale.fill_(math.log(float(logit_init[0])))
      model.logit_bias.fill_(float(logit_init[1]))
  return model, Siglip2Processor(image_processor=ip, tokenizer=tok)


def bert(tok, text: Size, seed=None):
  """`BertModel` (a text-only encoder) and its tokenizer."""
  from transformers import BertConfig, BertModel

  cfg = BertConfig(
    vocab_size=len(tok),
    max_position_embeddings=text.max_positions,
    pad_token_id=tok.pad_token_id,
    **text.tower(),
  )
  _seeded(seed)
  return BertModel(cfg), tok


# ---------------------------------------------------------------------------------------- decoders

# The special tokens the Qwen2/2.5/3-VL processors need.
QWEN_SPECIALS = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|image_pad|>",
  "<|video_pad|>",
)
QWEN_VERSIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def mrope_sections(head_dim: int) -> list:
  """Qwen's multimodal rotary split of a head's frequencies over (time, height, width)."""
  half = head_dim // 2
  t = half // 4
  return [t, (half - t) // 2, half - t - (half - t) // 2]


@dataclasses.dataclass(frozen=True)
class QwenVision:
  """A Qwen-VL vision tower: `depth` blocks of width `dim`, `heads` heads, `mlp` MLP width (Qwen2.5 /
  Qwen3; Qwen2-VL uses mlp_ratio=2), `positions` learned position embeddings (Qwen3)."""

  depth: int
  dim: int
  heads: int
  patch_size: int
  mlp: int = 0
  positions: int = 0


def qwen_vl(
  version: str,
  tok,
  text: Size,
  vision: QwenVision,
  mrope_section: Optional[list] = None,
  vocab_size: Optional[int] = None,
  pad_is_eos: bool = False,
  tie_embeddings: bool = False,
  seed=None,
):
  """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (`version`); the processor is `qwen_processor`.
  `mrope_section` defaults to `mrope_sections(head_dim)`; `vocab_size` to len(tok)."""
  import transformers

  if version not in QWEN_VERSIONS:
    raise SaeJaxError(f"qwen_vl version {version!r}: expected one of {QWEN_VERSIONS}")
  ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
  eos = ids["<|endoftext|>"]
  head_dim = text.head_dim or text.hidden // text.heads
  section = list(mrope_section) if mrope_section is not None else mrope_sections(head_dim)
  text_cfg = dict(text.decoder(vocab_size or len(tok)), bos_token_id=eos, eos_token_id=eos)
  tie = {"tie_word_embeddings": True} if tie_embeddings else {}
  if pad_is_eos:
    text_cfg["pad_token_id"] = eos
  text_cfg.update(tie)
  if version == "qwen3_vl":
    text_cfg["rope_scaling"] = {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True}
    vision_cfg = dict(
      depth=vision.depth,
      hidden_size=vision.dim,
      intermediate_size=vision.mlp,
      num_heads=vision.heads,
      patch_size=vision.patch_size,
      spatial_merge_size=2,
      temporal_patch_size=2,
      out_hidden_size=text.hidden,
      num_position_embeddings=vision.positions,
      deepstack_visual_indexes=[vision.depth - 1],
    )
  else:
    text_cfg["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    vision_cfg = dict(
      depth=vision.depth,
      num_heads=vision.heads,
      patch_size=vision.patch_size,
      spatial_merge_size=2,
      temporal_patch_size=2,
    )
    if version == "qwen2_5_vl":
      vision_cfg.update(
        hidden_size=vision.dim,
        intermediate_size=vision.mlp,
        out_hidden_size=text.hidden,
        window_size=2 * 2 * vision.patch_size,
        fullatt_block_indexes=[vision.depth - 1],
      )
    else:
      vision_cfg.update(embed_dim=vision.dim, hidden_size=text.hidden, mlp_ratio=2)
  config_cls, model_cls = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
  }[version]
  cfg = getattr(transformers, config_cls)(
    text_config=text_cfg,
    vision_config=vision_cfg,
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
    **tie,
  )
  _seeded(seed)
  return getattr(transformers, model_cls)(cfg)


def qwen_processor(version: str, tok, patch_size: int, min_pixels: int, max_pixels: int):
  """The Qwen-VL processor of `version` (images resized to between min_pixels and max_pixels)."""
  import transformers
  from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

  from sae_jax.encoders.qwen_vl import make_processor

  ip = Qwen2VLImageProcessorPil(
    patch_size=patch_size, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels
  )
  cls = {
    "qwen2_vl": transformers.Qwen2VLProcessor,
    "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
    "qwen3_vl": transformers.Qwen3VLProcessor,
  }[version]
  return make_processor(cls, ip, tok)


def paligemma(
  tok, text: Size, vision: Size, image_size: int, patch_size: int, vocab_size: Optional[int] = None, seed=None
):
  """PaliGemma: a SigLIP vision tower, a linear projector and a Gemma2 decoder with prefix attention;
  (image_size / patch_size)^2 image tokens. The vocabulary defaults to the processor's tokenizer,
  which `PaliGemmaProcessor` extends with its 1024 `<loc>` and 128 `<seg>` tokens, as the released
  model's does; `vocab_size` sets it instead."""
  from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
  from transformers.models.siglip import SiglipImageProcessorPil

  tok = copy.deepcopy(tok)  # the image token is set on this model's copy only
  tok.image_token = "<image>"
  tok.image_token_id = tok.convert_tokens_to_ids("<image>")
  ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
  ip.image_seq_length = (image_size // patch_size) ** 2
  proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
  cfg = PaliGemmaConfig(
    text_config=dict(
      model_type="gemma2",
      **text.decoder(vocab_size or len(tok)),
      pad_token_id=tok.pad_token_id,
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
    ),
    vision_config=dict(
      vision.tower(), image_size=image_size, patch_size=patch_size, projection_dim=text.hidden
    ),
    image_token_id=tok.image_token_id,
    projection_dim=text.hidden,
    hidden_size=text.hidden,
  )
  _seeded(seed)
  return PaliGemmaForConditionalGeneration(cfg), proc


CHAMELEON_MARKERS = ("<image>", "<racm3:break>", "<eoss>", "<reserved08706>")


def chameleon_image_tokens(n_codes: int) -> tuple:
  """Chameleon's names of its VQ codes in the BPE vocabulary: code 12 -> "IMGIMGBCZ" (digits as letters)."""
  letters = "ABCDEFGHIJ"
  return tuple("IMGIMG" + "".join(letters[int(d)] for d in str(i)) + "Z" for i in range(n_codes))


@dataclasses.dataclass(frozen=True)
class VQSize:
  """Chameleon's VQ-VAE: `codes` codebook entries of `embed_dim`, conv width `channels`, one
  2x downsampling per `channel_multiplier` entry after the first."""

  embed_dim: int
  codes: int
  channels: int
  channel_multiplier: tuple


def chameleon(tok, text: Size, image_size: int, vq: VQSize, seed=None):
  """Chameleon: early fusion; the VQ-VAE turns each image (resized to `image_size`) into
  (image_size / 2^(levels-1))^2 codes, each a token of the decoder's vocabulary."""
  from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
  from transformers.models.chameleon import ChameleonImageProcessorPil

  tok = copy.deepcopy(tok)
  tok.sep_token = "<reserved08706>"
  mult = [int(m) for m in vq.channel_multiplier]
  side = image_size // 2 ** (len(mult) - 1)
  ip = ChameleonImageProcessorPil(
    size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
  )
  proc = ChameleonProcessor(image_processor=ip, tokenizer=tok, image_seq_length=side * side)
  cfg = ChameleonConfig(
    **text.decoder(len(tok)),
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
    vocabulary_map=dict(tok.get_vocab()),
    vq_config=dict(
      embed_dim=vq.embed_dim,
      num_embeddings=vq.codes,
      latent_channels=vq.channels,
      resolution=image_size,
      base_channels=vq.channels,
      channel_multiplier=mult,
      num_res_blocks=1,
      attn_resolutions=[],
    ),
  )
  _seeded(seed)
  return ChameleonForConditionalGeneration(cfg), proc
