"""The study's tokenizers: byte-level BPE trained on the train captions, the prompts, questions and
chat scaffold, in each family's style.
"""

from __future__ import annotations

from typing import Any

from sae_jax.encoders import factories, tiny
from sae_jax.study import shapes as shapes_lib

CLIP_SPECIALS = ("<|endoftext|>", "<|startoftext|>")
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


def tokenizer_corpus(captions: list, templates: dict, caption_prompt: str) -> list:
  """Texts the study's tokenizers are trained on: the captions, every prompt word (templates,
  caption prompt, questions and answers) and the Qwen chat scaffold."""
  prompts = [t.replace("{image}", " ").replace("{text}", " ") for t in templates.values()]
  scaffold = ["system", "You are a helpful assistant.", "user", "assistant"]
  extra = prompts + [caption_prompt] + shapes_lib.question_texts() + scaffold
  return list(captions) + extra * 20  # repeated: rarer than caption words, still merged whole


def train_tokenizer(corpus: list, specials: tuple, vocab_size: int, style: str):
  """Byte-level BPE tokenizer trained on `corpus`. `style`: "clip" wraps texts in BOS ... EOS (the
  text tower pools at EOS), "qwen" adds nothing, "gemma" is SigLIP2 / PaliGemma's (BOS, EOS, PAD,
  UNK), "chameleon" adds BOS."""
  if style == "clip":
    eos = "<|endoftext|>"
    return tiny.bpe_tokenizer(
      corpus, specials, vocab_size, bos="<|startoftext|>", eos=eos, pad=eos, add_bos="eos"
    )
  if style == "qwen":
    return tiny.bpe_tokenizer(corpus, specials, vocab_size, eos="<|endoftext|>", pad="<|endoftext|>")
  if style == "gemma":
    return tiny.bpe_tokenizer(
      corpus, specials, vocab_size, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>"
    )
  if style == "chameleon":
    return tiny.bpe_tokenizer(
      corpus, specials, vocab_size, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True
    )
  raise ValueError(style)


def word_pieces(tok, texts: list) -> dict:
  """The most tokens any whitespace-separated word of `texts` takes where it occurs (attached
  punctuation included), from the tokenizer's character offsets."""
  out: dict = {}
  for text in texts:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for w in text.split():
      pos = text.index(w, pos)
      spans.append((w, pos, pos + len(w)))
      pos += len(w)
    for w, a, b in spans:
      n = sum(1 for s, e in enc["offset_mapping"] if e > s and s < b and e > a)
      out[w] = max(out.get(w, 0), n)
  return out


def tokenizer_for(kind: str, corpus: list, cfg: Any):
  """The tokenizer of generative family `kind` (`cfg`: config.encoder_training), its specials included."""
  vocab = int(cfg.vocab_size)
  if kind.startswith("qwen"):
    return train_tokenizer(corpus, factories.QWEN_SPECIALS, vocab, "qwen")
  if kind == "paligemma":
    return train_tokenizer(corpus, GEMMA_SPECIALS + ("<image>",), vocab, "gemma")
  codes = factories.chameleon_image_tokens(int(cfg.chameleon.vq_codes))
  specials = ("<pad>", "</s>", "<s>", "<unk>") + factories.CHAMELEON_MARKERS + codes
  return train_tokenizer(corpus, specials, vocab + len(codes), "chameleon")
