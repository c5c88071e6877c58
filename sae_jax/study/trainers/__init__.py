"""Trains the image-text models of the shapes study (torch, CPU) and saves them as HF checkpoints.

The paper's six families, each trained as a model of its kind:
  clip        `CLIPModel`, the symmetric InfoNCE loss
  siglip      `Siglip2Model` (NaFlex SigLIP2; transformers has it), the pairwise sigmoid loss
  qwen2_vl    `Qwen2VLForConditionalGeneration`  \\
  qwen3_vl    `Qwen3VLForConditionalGeneration`   |  generalists: the mixture below, next-token loss
  paligemma   `PaliGemmaForConditionalGeneration` |  on the answer tokens
  chameleon   `ChameleonForConditionalGeneration` /  (its VQ image tokenizer is trained first,
                                                     its reconstruction loss weighted toward the
                                                     objects: `chameleon.vq_foreground_weight`)

Generative models are trained in two stages, as real MLLMs are. Stage 1: the vision tower and
projector (Chameleon: the embeddings of its VQ code tokens) are aligned with the decoder's word
embeddings by InfoNCE (`generative.vision_*`), standing in for the contrastively pretrained tower a
real MLLM starts from; the tower is then frozen. (Trained from scratch inside the decoder, the
tower's features collapse to a near-constant vector and the decoder ignores the image.) Qwen3-VL's
DeepStack mergers (vision features added to the decoder's first layers, which stage 1 does not
align) stay trainable in stage 2 (`qwen3_vl.train_deepstack`). Stage 2 learns what the embeddings
carry the way real MLLMs do, from a mixture of tasks
(`config.encoder_training.mixture`: the probability of each task per training sequence; each
sequence's loss is the mean over its answer tokens, so a task's weight is its share of the loss):
  caption     image + `generative.caption_prompt` -> one of the image's captions
  image_word  `config.extract.templates.image` (the exact extraction prompt) -> the scene's one-word
              summary (`shapes.summary_word`: the largest object's shape or colour,
              `generative.summary`)
  text_word   `config.extract.templates.text` on a caption -> the same word for that caption's scene
  text_lm     caption modelling on text alone (`caption <eos>`, loss on every token)
  question    image + a short question about colour / shape / count / position -> its answer
  image_gen   Chameleon only (the family that generates images): a caption -> the image's VQ codes
              (`<racm3:break>` codes `<eoss>`, loss on every code), the text-to-image half of its
              mixed-modal training; the image-token positions then predict image content
Prompts are assembled by the family's own extraction encoder (`sae_jax.encoders`), so the training
sequences are token for token the extraction sequences plus the answer; the Qwen families train and
extract inside their chat format (`chat_template`), the answer closed by `<|im_end|>`.

Tokenizers are byte-level BPE trained on the train captions, the prompts, questions and chat
scaffold (`config.encoder_training.vocab_size` leaves room for every word to become one token).

`train_encoder(config, kind, data_dir, out_dir)` writes `out_dir/` with `save_pretrained` (model,
processor, tokenizer), which `config.extract.model_name=<out_dir>` loads like a hub checkpoint, and
`out_dir/quality.json` (test-split figures: retrieval R@1 with chance, probes, samples). A directory
holding `quality.json` is complete and is not retrained.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from sae_jax import workdir as workdir_lib
from sae_jax.data import coco
from sae_jax.encoders import pooling as pooling_lib
from sae_jax.errors import SaeJaxError
from sae_jax.study import shapes as shapes_lib

CONTRASTIVE_KINDS = ("clip", "siglip")
GENERATIVE_KINDS = ("qwen2_vl", "qwen3_vl", "paligemma", "chameleon")
KINDS = CONTRASTIVE_KINDS + GENERATIVE_KINDS
FAMILY_OF_KIND = {
  "clip": "clip",
  "siglip": "siglip",
  "qwen2_vl": "qwen_vl",
  "qwen3_vl": "qwen_vl",
  "paligemma": "paligemma",
  "chameleon": "chameleon",
}
MIXTURE_TASKS = ("caption", "image_word", "text_word", "text_lm", "question", "image_gen")
QUALITY_FILE = "quality.json"
CLIP_SPECIALS = ("<|endoftext|>", "<|startoftext|>")
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
CHAMELEON_MARKERS = ("<image>", "<racm3:break>", "<eoss>", "<reserved08706>")


# ------------------------------------------------------------------------------------------- data


def _split(data_dir: str, split: str, max_images: int = 0) -> coco.CocoCaptionsJson:
  return coco.CocoCaptionsJson(
    os.path.join(data_dir, f"captions_{split}.json"), os.path.join(data_dir, "images"), max_images=max_images
  )


def _images(src: coco.CocoCaptionsJson, idx) -> list:
  return [coco.load_image(src.images[int(i)]) for i in idx]


def _captions_by_image(src: coco.CocoCaptionsJson) -> list:
  by_id: dict = {}
  for c in src.captions:
    by_id.setdefault(c.image_id, []).append(c.text)
  return [by_id[im.image_id] for im in src.images]


def _scenes(data_dir: str, split: str, src: coco.CocoCaptionsJson) -> list:
  """The scene record of every image of `src`, in its image order."""
  path = os.path.join(data_dir, f"scenes_{split}.json")
  if not os.path.exists(path):
    raise SaeJaxError(f"{path} is missing: the generative models' targets come from the scene records")
  with open(path) as f:
    by_id = {s["image_id"]: s for s in json.load(f)}
  return [by_id[im.image_id] for im in src.images]


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
  from sae_jax.encoders import tiny  # torch: the `extract` extra

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


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
  if step < warmup:
    return lr * (step + 1) / warmup
  return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Progress:
  def __init__(self, what: str, total: int, every_s: float, log: Callable):
    self.what, self.total, self.every_s, self.log = what, total, every_s, log
    self.t0 = self.last = time.perf_counter()

  def update(self, step: int, loss: float, extra: str = "") -> None:
    now = time.perf_counter()
    if now - self.last >= self.every_s or step + 1 == self.total:
      self.last = now
      rate = (step + 1) / (now - self.t0)
      eta = (self.total - step - 1) / max(rate, 1e-9)
      self.log(
        f"{self.what}: step {step + 1}/{self.total} | loss {loss:.4f}{extra} | {rate:.2f} steps/s | "
        f"{now - self.t0:.0f} s, eta {eta:.0f} s"
      )


def _wrap(kind: str, model, processor, templates: dict, chat_template: bool):
  """The study's extraction encoder around a model being trained (left in train mode)."""
  from sae_jax import encoders

  enc = encoders.encoder_class(FAMILY_OF_KIND[kind])(
    model, processor, device="cpu", templates=templates, chat_template=chat_template, name=kind
  )
  model.train()
  return enc


# ------------------------------------------------------------------------------ quality figures


def recall_at_1(img_emb: np.ndarray, txt_emb: np.ndarray, owner: np.ndarray) -> dict:
  """image->text and text->image R@1 (percent) of cosine similarity; owner[j] = image row of
  caption j. Chance: the mean share of an image's captions in the pool; 1/images."""
  a = img_emb / np.maximum(np.linalg.norm(img_emb, axis=1, keepdims=True), 1e-12)
  b = txt_emb / np.maximum(np.linalg.norm(txt_emb, axis=1, keepdims=True), 1e-12)
  sim = a @ b.T
  i2t = float(np.mean(owner[sim.argmax(axis=1)] == np.arange(a.shape[0])) * 100)
  t2i = float(np.mean(sim.argmax(axis=0) == owner) * 100)
  per_image = np.bincount(owner, minlength=a.shape[0])
  chance_i2t = float(np.mean(per_image / owner.shape[0]) * 100)
  return {"i2t_R@1": i2t, "t2i_R@1": t2i, "i2t_chance": chance_i2t, "t2i_chance": 100.0 / a.shape[0]}


def caption_to_caption_r1(txt_emb: np.ndarray, owner: np.ndarray) -> dict:
  """How often a caption's nearest other caption (cosine) describes the same image (percent), and
  the chance of that: (captions per image - 1) / (captions - 1), averaged."""
  b = txt_emb / np.maximum(np.linalg.norm(txt_emb, axis=1, keepdims=True), 1e-12)
  sim = b @ b.T
  np.fill_diagonal(sim, -np.inf)
  hit = owner[sim.argmax(axis=1)] == owner
  per_image = np.bincount(owner)[owner]
  return {
    "c2c_R@1": float(hit.mean() * 100),
    "c2c_chance": float(np.mean((per_image - 1) / (owner.shape[0] - 1)) * 100),
  }


def linear_probes(img_emb: np.ndarray, scenes: list, folds: int = 5, seed: int = 0) -> dict:
  """5-fold logistic-regression accuracy (percent) of the single object's shape, colour and grid
  cell from the image embeddings of the single-object scenes, beside the majority-class share."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold, cross_val_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  rows = [i for i, s in enumerate(scenes) if len(s["objects"]) == 1]
  out: dict = {"n_scenes": len(rows)}
  x = img_emb[rows]
  for what in ("shape", "colour", "position"):
    y = np.array(
      [
        s["objects"][0][what] if what != "position" else 3 * s["objects"][0]["row"] + s["objects"][0]["col"]
        for s in (scenes[i] for i in rows)
      ]
    )
    _, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min())) if len(counts) > 1 else 0
    majority = float(counts.max() / max(1, len(y)) * 100)
    if k < 2:
      out[what] = {"accuracy": None, "majority": majority}
      continue
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    acc = float(cross_val_score(clf, x, y, cv=cv).mean() * 100)
    out[what] = {"accuracy": acc, "majority": majority}
  return out


def probe_text(p: dict) -> str:
  parts = [
    f"{w} {p[w]['accuracy']:.0f}% (majority {p[w]['majority']:.0f}%)"
    for w in ("shape", "colour", "position")
    if p[w]["accuracy"] is not None
  ]
  return f"linear probes on {p['n_scenes']} single-object test scenes: " + (", ".join(parts) or "too few")


def _embed(enc, images=None, texts=None, batch: int = 64, pooling: str = "mean") -> np.ndarray:
  """Embeddings as the study extracts them: contrastive `embeds`, decoder token states pooled."""
  import torch

  items = images if images is not None else texts
  out = []
  was_training = enc.model.training
  enc.model.eval()
  with torch.inference_mode():
    for s in range(0, len(items), batch):
      part = items[s : s + batch]
      o = enc.encode(images=part) if images is not None else enc.encode(texts=part)
      if enc.kind == "contrastive":
        out.append(o.embeds.float().numpy())
      else:
        out.append(np.asarray(pooling_lib.pool(pooling, o.hidden.float().numpy(), o.attention_mask.numpy())))
  enc.model.train(was_training)
  return np.concatenate(out)


def _retrieval_quality(enc, test, test_caps, test_scenes, log: Callable, label: str) -> dict:
  img = _embed(enc, images=_images(test, range(len(test.images))))
  txt = _embed(enc, texts=[t for cs in test_caps for t in cs])
  owner = np.repeat(np.arange(len(test_caps)), [len(cs) for cs in test_caps])
  q = {"test_images": len(test.images), "test_captions": int(owner.shape[0])}
  q.update(recall_at_1(img, txt, owner))
  q["i2t_over_chance"] = q["i2t_R@1"] / q["i2t_chance"]
  q.update(caption_to_caption_r1(txt, owner))
  q["probes"] = linear_probes(img, test_scenes)
  pooled = "" if enc.kind == "contrastive" else "mean-pooled "
  log(
    f"{label} quality: {pooled}image->text R@1 {q['i2t_R@1']:.2f}% on {len(test.images)} test images x "
    f"{q['test_captions'] // max(1, len(test.images))} captions (chance {q['i2t_chance']:.2f}%, "
    f"{q['i2t_over_chance']:.1f}x); text->image R@1 {q['t2i_R@1']:.2f}% (chance {q['t2i_chance']:.2f}%); "
    f"caption->caption R@1 {q['c2c_R@1']:.2f}% (chance {q['c2c_chance']:.2f}%); {probe_text(q['probes'])}"
  )
  return q


# ----------------------------------------------------------------------------- contrastive models


def _tower(c: Any) -> dict:
  return dict(
    hidden_size=int(c.hidden),
    intermediate_size=4 * int(c.hidden),
    num_hidden_layers=int(c.layers),
    num_attention_heads=int(c.heads),
  )


def build_clip(tok, cfg: Any, image_size: int):
  from transformers import CLIPConfig, CLIPModel, CLIPProcessor
  from transformers.models.clip import CLIPImageProcessorPil

  c = cfg.clip
  model_cfg = CLIPConfig(
    text_config=dict(
      _tower(c),
      vocab_size=len(tok),
      max_position_embeddings=int(c.max_text_len),
      eos_token_id=tok.eos_token_id,
      bos_token_id=tok.bos_token_id,
      pad_token_id=tok.pad_token_id,
    ),
    vision_config=dict(_tower(c), image_size=image_size, patch_size=int(c.patch_size)),
    projection_dim=int(c.projection_dim),
  )
  ip = CLIPImageProcessorPil(
    size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
  )
  return CLIPModel(model_cfg), CLIPProcessor(image_processor=ip, tokenizer=tok)


def build_siglip(tok, cfg: Any, image_size: int):
  """SigLIP2 (`Siglip2Model`, NaFlex): the image is cut into (image_size / patch_size)^2 patches."""
  import torch
  from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
  from transformers.models.siglip2 import Siglip2ImageProcessorPil

  c = cfg.siglip
  p = int(c.patch_size)
  n_patches = (image_size // p) ** 2
  model_cfg = Siglip2Config(
    text_config=dict(
      _tower(c),
      vocab_size=len(tok),
      max_position_embeddings=int(c.max_text_len),
      pad_token_id=tok.pad_token_id,
      eos_token_id=tok.eos_token_id,
      bos_token_id=tok.bos_token_id,
      projection_size=int(c.hidden),
    ),
    vision_config=dict(_tower(c), patch_size=p, num_patches=n_patches),
  )
  ip = Siglip2ImageProcessorPil(patch_size=p, max_num_patches=n_patches)
  model = Siglip2Model(model_cfg)
  with torch.no_grad():  # the SigLIP paper's init, t' = log 10 and b = -10 (HF leaves them at 0)
    model.logit_scale.fill_(math.log(10.0))
    model.logit_bias.fill_(-10.0)
  return model, Siglip2Processor(image_processor=ip, tokenizer=tok)


def _train_contrastive(kind: str, config: Any, data_dir: str, out_dir: str, log: Callable) -> dict:
  import torch

  cfg = config.encoder_training
  c = cfg[kind]
  train = _split(data_dir, "train")
  caps = _captions_by_image(train)
  corpus = [t for cs in caps for t in cs]
  if kind == "clip":
    tok = train_tokenizer(corpus, CLIP_SPECIALS, int(cfg.vocab_size), "clip")
  else:
    tok = train_tokenizer(corpus, GEMMA_SPECIALS, int(cfg.vocab_size), "gemma")
  size = coco.load_image(train.images[0]).size[0]
  torch.manual_seed(int(cfg.seed))
  model, processor = (build_clip if kind == "clip" else build_siglip)(tok, cfg, size)
  enc = _wrap(kind, model, processor, {}, False)
  # Every train image once through the processor (exactly what extraction will feed the model).
  log(f"{kind}: preparing {len(train.images)} train images")
  parts = [
    enc.image_inputs(_images(train, range(s, min(s + 512, len(train.images)))))
    for s in range(0, len(train.images), 512)
  ]
  pixels = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
  owner = np.repeat(np.arange(len(caps)), [len(cs) for cs in caps])
  start = np.concatenate([[0], np.cumsum([len(cs) for cs in caps])[:-1]])
  steps, bs = int(c.steps), int(c.batch_size)
  opt = torch.optim.AdamW(model.parameters(), lr=float(c.lr), weight_decay=float(cfg.weight_decay))
  rng = np.random.default_rng(int(cfg.seed))
  progress = _Progress(kind, steps, float(cfg.log_every_s), log)
  t0 = time.perf_counter()
  for step in range(steps):
    idx = rng.choice(len(caps), size=min(bs, len(caps)), replace=False)
    cap = start[idx] + rng.integers(0, np.bincount(owner)[idx])  # one random caption of each image
    for g in opt.param_groups:
      g["lr"] = _lr_at(step, steps, float(c.lr), int(cfg.warmup_steps))
    text = enc.text_inputs([corpus[j] for j in cap])
    out = model(**text, **{k: v[idx] for k, v in pixels.items()}, return_loss=True)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    progress.update(step, out.loss.item(), f" | logit scale {model.logit_scale.exp().item():.1f}")
  train_s = time.perf_counter() - t0
  model.eval()
  test = _split(data_dir, "test", int(cfg.eval_images))
  quality = {
    "kind": kind,
    "role": "contrastive",
    "architecture": type(model).__name__,
    "loss": "InfoNCE" if kind == "clip" else "sigmoid",
    **_retrieval_quality(enc, test, _captions_by_image(test), _scenes(data_dir, "test", test), log, kind),
    "train_seconds": round(train_s, 1),
    "steps": steps,
    "parameters": int(sum(p.numel() for p in model.parameters())),
  }
  return _save(model, processor, out_dir, quality)


# ------------------------------------------------------------------------------ generative models


def _qwen_ids(tok) -> dict:
  from sae_jax.encoders import tiny

  return {s: tok.convert_tokens_to_ids(s) for s in tiny.QWEN_SPECIALS}


def _mrope_sections(head_dim: int) -> list:
  half = head_dim // 2  # rotary frequencies per head, split over (time, height, width)
  t = half // 4
  return [t, (half - t) // 2, half - t - (half - t) // 2]


def build_qwen2_vl(tok, cfg: Any):
  from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

  q = cfg.qwen2_vl
  h, heads = int(q.hidden), int(q.heads)
  ids = _qwen_ids(tok)
  eos = ids["<|endoftext|>"]
  model_cfg = Qwen2VLConfig(
    text_config=dict(
      vocab_size=len(tok),
      hidden_size=h,
      intermediate_size=4 * h,
      num_hidden_layers=int(q.layers),
      num_attention_heads=heads,
      num_key_value_heads=int(q.kv_heads),
      max_position_embeddings=512,
      bos_token_id=eos,
      eos_token_id=eos,
      pad_token_id=eos,
      tie_word_embeddings=True,
      rope_scaling={"type": "mrope", "mrope_section": _mrope_sections(h // heads)},
    ),
    vision_config=dict(
      depth=int(q.vision_depth),
      embed_dim=int(q.vision_dim),
      hidden_size=h,
      num_heads=max(1, int(q.vision_dim) // 16),
      mlp_ratio=2,
      patch_size=int(q.patch_size),
      spatial_merge_size=2,
      temporal_patch_size=2,
    ),
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
    tie_word_embeddings=True,
  )
  return Qwen2VLForConditionalGeneration(model_cfg)


def build_qwen3_vl(tok, cfg: Any, image_size: int):
  from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

  q = cfg.qwen3_vl
  h, heads = int(q.hidden), int(q.heads)
  head_dim = h // heads
  ids = _qwen_ids(tok)
  eos = ids["<|endoftext|>"]
  side = image_size // int(q.patch_size)
  model_cfg = Qwen3VLConfig(
    text_config=dict(
      vocab_size=len(tok),
      hidden_size=h,
      intermediate_size=4 * h,
      num_hidden_layers=int(q.layers),
      num_attention_heads=heads,
      num_key_value_heads=int(q.kv_heads),
      head_dim=head_dim,
      max_position_embeddings=512,
      bos_token_id=eos,
      eos_token_id=eos,
      pad_token_id=eos,
      tie_word_embeddings=True,
      rope_scaling={
        "rope_type": "default",
        "mrope_section": _mrope_sections(head_dim),
        "mrope_interleaved": True,
      },
    ),
    vision_config=dict(
      depth=int(q.vision_depth),
      hidden_size=int(q.vision_dim),
      intermediate_size=2 * int(q.vision_dim),
      num_heads=max(1, int(q.vision_dim) // 16),
      patch_size=int(q.patch_size),
      spatial_merge_size=2,
      temporal_patch_size=2,
      out_hidden_size=h,
      num_position_embeddings=side * side,
      deepstack_visual_indexes=[int(q.vision_depth) - 1],
    ),
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
    tie_word_embeddings=True,
  )
  return Qwen3VLForConditionalGeneration(model_cfg)


def _qwen_processor(kind: str, tok, cfg: Any, image_size: int):
  import transformers
  from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

  from sae_jax.encoders.qwen_vl import make_processor

  p = int(cfg[kind].patch_size)
  side = (image_size // (2 * p)) * 2 * p  # the images keep their size (a multiple of 2 patches)
  ip = Qwen2VLImageProcessorPil(
    patch_size=p, merge_size=2, temporal_patch_size=2, min_pixels=side * side, max_pixels=side * side
  )
  cls = transformers.Qwen2VLProcessor if kind == "qwen2_vl" else transformers.Qwen3VLProcessor
  return make_processor(cls, ip, tok)


def build_paligemma(tok, cfg: Any, image_size: int):
  """PaliGemma: a SigLIP vision tower, a linear projector and a Gemma2 decoder with prefix attention."""
  from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
  from transformers.models.siglip import SiglipImageProcessorPil

  c = cfg.paligemma
  tok = copy.deepcopy(tok)
  tok.image_token = "<image>"
  tok.image_token_id = tok.convert_tokens_to_ids("<image>")
  ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
  ip.image_seq_length = (image_size // int(c.patch_size)) ** 2
  h, heads = int(c.hidden), int(c.heads)
  model_cfg = PaliGemmaConfig(
    text_config=dict(
      model_type="gemma2",
      vocab_size=len(tok),
      hidden_size=h,
      intermediate_size=4 * h,
      num_hidden_layers=int(c.layers),
      num_attention_heads=heads,
      num_key_value_heads=int(c.kv_heads),
      head_dim=h // heads,
      max_position_embeddings=512,
      pad_token_id=tok.pad_token_id,
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
    ),
    vision_config=dict(
      hidden_size=int(c.vision_dim),
      intermediate_size=2 * int(c.vision_dim),
      num_hidden_layers=int(c.vision_depth),
      num_attention_heads=max(1, int(c.vision_dim) // 16),
      image_size=image_size,
      patch_size=int(c.patch_size),
      projection_dim=h,
    ),
    image_token_id=tok.image_token_id,
    projection_dim=h,
    hidden_size=h,
  )
  return PaliGemmaForConditionalGeneration(model_cfg), PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


def chameleon_image_tokens(n_codes: int) -> tuple:
  """Chameleon's names of its VQ codes in the BPE vocabulary: code 12 -> "IMGIMGBCZ" (digits as letters)."""
  letters = "ABCDEFGHIJ"
  return tuple("IMGIMG" + "".join(letters[int(d)] for d in str(i)) + "Z" for i in range(n_codes))


def build_chameleon(tok, cfg: Any, image_size: int):
  """Chameleon: early fusion; the VQ-VAE turns each image (resized to `vq_resolution`) into
  (vq_resolution / 2^(levels-1))^2 codes, each a token of the decoder's vocabulary."""
  from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
  from transformers.models.chameleon import ChameleonImageProcessorPil

  c = cfg.chameleon
  tok = copy.deepcopy(tok)
  tok.sep_token = "<reserved08706>"
  mult = [int(m) for m in c.vq_channel_multiplier]
  image_size = int(c.vq_resolution) or image_size  # the processor resizes the images to it
  side = image_size // 2 ** (len(mult) - 1)
  ip = ChameleonImageProcessorPil(
    size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
  )
  proc = ChameleonProcessor(image_processor=ip, tokenizer=tok, image_seq_length=side * side)
  h, heads = int(c.hidden), int(c.heads)
  model_cfg = ChameleonConfig(
    vocab_size=len(tok),
    hidden_size=h,
    intermediate_size=4 * h,
    num_hidden_layers=int(c.layers),
    num_attention_heads=heads,
    num_key_value_heads=int(c.kv_heads),
    max_position_embeddings=512,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
    vocabulary_map=dict(tok.get_vocab()),
    vq_config=dict(
      embed_dim=int(c.vq_embed_dim),
      num_embeddings=int(c.vq_codes),
      latent_channels=int(c.vq_channels),
      resolution=image_size,
      base_channels=int(c.vq_channels),
      channel_multiplier=mult,
      num_res_blocks=1,
      attn_resolutions=[],
    ),
  )
  return ChameleonForConditionalGeneration(model_cfg), proc


def _vq_decoder(embed_dim: int, channels: int, levels: int):
  """A small convolutional decoder (codes -> pixels) that trains the VQ-VAE with a reconstruction
  loss; Chameleon keeps only the encoder and codebook, as the released model does."""
  import torch.nn as nn

  layers = [nn.Conv2d(embed_dim, channels, 3, padding=1), nn.SiLU()]
  for _ in range(levels):
    layers += [nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.SiLU()]
  layers += [nn.Conv2d(channels, 3, 3, padding=1)]
  return nn.Sequential(*layers)


def _foreground_weights(x, alpha: float):
  """[B, 1, H, W] per-pixel weights of the VQ-VAE's reconstruction loss: 1 + alpha * the pixel's
  distance from its image's per-channel median (the background), normalised to mean 1 per image.
  With plain MSE the codes describe the background that fills most pixels; small objects, what the
  captions talk about, would share codes with it."""
  import torch

  if alpha <= 0:
    return torch.ones_like(x[:, :1])
  med = x.flatten(2).median(dim=2).values[:, :, None, None]
  w = 1 + alpha * (x - med).norm(dim=1, keepdim=True)
  return w / w.mean(dim=(2, 3), keepdim=True)


def train_chameleon_vq(model, processor, images: list, cfg: Any, log: Callable) -> dict:
  """Trains Chameleon's VQ-VAE (encoder, quant conv, codebook) to reconstruct `images` (MSE plus the
  codebook / commitment loss, straight-through gradients); the codebook starts at, and unused codes
  restart from, encoder outputs (a random codebook collapses onto a few codes). Returns figures on
  the training images: reconstruction MSE beside the pixel variance, codes used, perplexity."""
  import torch

  c = cfg.chameleon
  vq = model.model.vqmodel
  px = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
  levels = len(c.vq_channel_multiplier) - 1
  dec = _vq_decoder(int(c.vq_embed_dim), int(c.vq_channels), levels)
  params = list(vq.encoder.parameters()) + list(vq.quant_conv.parameters()) + list(vq.quantize.parameters())
  opt = torch.optim.Adam(params + list(dec.parameters()), lr=float(c.vq_lr))
  rng = np.random.default_rng(int(cfg.seed))
  steps, bs = int(c.vq_steps), int(c.vq_batch_size)
  progress = _Progress("chameleon VQ-VAE", steps, float(cfg.log_every_s), log)
  vq.train()
  n_codes = int(c.vq_codes)
  fg = float(c.vq_foreground_weight)
  usage = torch.zeros(n_codes)
  every = max(1, min(50, steps // 10))
  for step in range(steps):
    idx = torch.as_tensor(rng.choice(px.shape[0], size=min(bs, px.shape[0]), replace=False))
    x = px[idx]
    z = vq.quant_conv(vq.encoder(x))
    if step % every == 0 and step + 1 < steps:  # (re)start unused codes at random encoder outputs
      dead = torch.arange(n_codes) if step == 0 else torch.nonzero(usage < 1e-3).flatten()
      if len(dead):
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.as_tensor(rng.integers(0, flat.shape[0], size=len(dead)))
        with torch.no_grad():
          vq.quantize.embedding.weight[dead] = flat[pick]
        usage[dead] = 1.0
    zq, emb_loss, codes = vq.quantize(z)
    recon = dec(zq)
    rec = torch.mean(_foreground_weights(x, fg) * (recon - x) ** 2)
    loss = rec + emb_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    usage = 0.9 * usage + 0.1 * torch.bincount(codes, minlength=n_codes).float()
    progress.update(step, loss.item(), f" | reconstruction {rec.item():.4f}")
  vq.eval()
  with torch.inference_mode():
    x = px[: min(512, px.shape[0])]
    z = vq.quant_conv(vq.encoder(x))
    zq, _, codes = vq.quantize(z)
    mse = float(torch.mean((dec(zq) - x) ** 2))
    p = torch.bincount(codes, minlength=n_codes).float()
    p = p / p.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    var = float(x.var())
  figures = {
    "vq_reconstruction_mse": mse,
    "vq_pixel_variance": var,
    "vq_codes_used": int((p > 0).sum()),
    "vq_codes": n_codes,
    "vq_perplexity": perplexity,
    "vq_steps": steps,
  }
  log(
    f"chameleon VQ-VAE: reconstruction MSE {mse:.4f} (pixel variance {var:.4f}), {figures['vq_codes_used']}"
    f"/{n_codes} codes used, perplexity {perplexity:.1f}"
  )
  return figures


class _MixtureBatcher:
  """Builds training sequences of the generalist mixture with the family's extraction encoder: the
  prompt is exactly what extraction feeds the model; the answer (+ end token) carries the labels."""

  def __init__(self, enc, kind: str, caption_prompt: str):
    import torch

    self.torch = torch
    self.enc = enc
    self.kind = kind
    self.tok = enc.tokenizer
    self.templates = dict(enc.templates)
    self.caption_prompt = caption_prompt
    self.eos = int(self.tok.eos_token_id)
    self.end = int(self.tok.convert_tokens_to_ids("<|im_end|>")) if enc.chat_template else self.eos
    self.answer_lead = "" if enc.chat_template else " "

  def _prompts(self, template: str, images=None, texts=None):
    """Unpadded prompt ids of each sample and the vision inputs (one encoder build)."""
    mode = "image" if texts is None else ("text" if images is None else "pair")
    self.enc.templates = {mode: template}
    try:
      ids, attn, _, vision = self.enc.build(images, texts)
    finally:
      self.enc.templates = self.templates
    return [ids[i][attn[i].bool()].tolist() for i in range(ids.shape[0])], vision

  def batch(self, samples: list) -> dict:
    """samples: (task, image or None, text or None, answer or None); text_lm has text only."""
    torch = self.torch
    groups: dict = {}
    for i, (task, image, text, answer) in enumerate(samples):
      if task in ("text_lm", "image_gen"):
        key = (task,)
      elif task == "caption":
        key = ("image", "{image} " + self.caption_prompt)
      elif task == "image_word":
        key = ("image", self.templates["image"])
      elif task == "text_word":
        key = ("text", self.templates["text"])
      else:  # question: the text is the question
        key = ("image", "{image} " + text)
      groups.setdefault(key, []).append(i)
    seqs, labels, answer_masks, vision_parts, tasks = [], [], [], [], []
    for key, rows in groups.items():
      if key[0] == "text_lm":
        for i in rows:
          body = self.tok(samples[i][2], add_special_tokens=False)["input_ids"] + [self.eos]
          pre = list(self.enc.prefix_ids(False))
          seqs.append(pre + body)
          labels.append([-100] * len(pre) + body)
          answer_masks.append([0] * len(pre) + [1] * len(body))
          tasks.append("text_lm")
        continue
      if key[0] == "image_gen":  # samples[i][1]: the image's code token ids (no pixels needed)
        boi, eoi = self.tok.convert_tokens_to_ids(["<racm3:break>", "<eoss>"])
        for i in rows:
          pre = (
            list(self.enc.prefix_ids(False)) + self.tok(samples[i][2], add_special_tokens=False)["input_ids"]
          )
          body = [int(c) for c in samples[i][1]] + [eoi]
          seqs.append(pre + [boi] + body)
          labels.append([-100] * (len(pre) + 1) + body)
          answer_masks.append([0] * (len(pre) + 1) + [1] * len(body))
          tasks.append("image_gen")
        continue
      images = [samples[i][1] for i in rows] if key[0] == "image" else None
      texts = [samples[i][2] for i in rows] if key[0] == "text" else None
      prompts, vision = self._prompts(key[1], images, texts)
      if vision:
        vision_parts.append(vision)
      for i, p in zip(rows, prompts):
        ans = self.tok(self.answer_lead + samples[i][3], add_special_tokens=False)["input_ids"] + [self.end]
        seqs.append(p + ans)
        labels.append([-100] * len(p) + ans)
        answer_masks.append([0] * len(p) + [1] * len(ans))
        tasks.append(samples[i][0])
    n = max(len(s) for s in seqs)
    pad = int(self.enc.pad_id)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    suffix = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, (s, lb, am) in enumerate(zip(seqs, labels, answer_masks)):
      ids[r, : len(s)] = torch.tensor(s)
      lab[r, : len(s)] = torch.tensor(lb)
      mask[r, : len(s)] = 1
      suffix[r, : len(s)] = torch.tensor(am)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if self.kind.startswith("qwen"):
      inputs["mm_token_type_ids"] = (ids == self.enc.image_token_id).long()
    if self.kind == "paligemma":  # prefix (0) attends both ways, the answer (1) causally
      inputs["token_type_ids"] = suffix
    for k in vision_parts[0] if vision_parts else ():
      inputs[k] = torch.cat([v[k] for v in vision_parts])
    return {"inputs": inputs, "labels": lab, "tasks": tasks}


def _sequence_losses(model, batch: dict):
  """Per-sequence mean next-token cross-entropy over the answer tokens, and the argmax hits."""
  import torch
  from transformers import ChameleonForConditionalGeneration

  if isinstance(model, ChameleonForConditionalGeneration):
    # HF's Chameleon sets the image tokens' logits to the dtype's minimum (its release does not
    # generate images); image_gen trains them, so the loss reads the LM head's logits directly.
    logits = model.lm_head(model.model(**batch["inputs"]).last_hidden_state)[:, :-1].float()
  else:
    logits = model(**batch["inputs"]).logits[:, :-1].float()
  tgt = batch["labels"][:, 1:]
  ok = tgt != -100
  ce = torch.nn.functional.cross_entropy(
    logits.reshape(-1, logits.shape[-1]), tgt.clamp(min=0).reshape(-1), reduction="none"
  ).view(tgt.shape)
  per_seq = (ce * ok).sum(1) / ok.sum(1).clamp(min=1)
  hits = ((logits.argmax(-1) == tgt) | ~ok).all(1)  # every answer token right
  return per_seq, hits


class _MixtureSampler:
  """Draws the mixture's samples from a split: tasks by weight, images and captions at random."""

  def __init__(
    self, src, caps: list, scenes: list, weights: dict, seed: int, summary: str = "shape", codes=None
  ):
    """`codes`: [N, n] VQ code token ids of every image (Chameleon); without them no image_gen."""
    self.src, self.caps, self.scenes, self.summary, self.codes = src, caps, scenes, summary, codes
    self.tasks = [
      t for t in MIXTURE_TASKS if float(weights[t]) > 0 and (t != "image_gen" or codes is not None)
    ]
    w = np.array([float(weights[t]) for t in self.tasks])
    self.p = w / w.sum()
    self.rng = np.random.default_rng(seed)
    self.image_cache: dict = {}

  def image(self, i: int):
    im = self.image_cache.get(i)
    if im is None:
      im = coco.load_image(self.src.images[i])
      if len(self.image_cache) < 20000:
        self.image_cache[i] = im
    return im

  def draw(self, n: int, task: str | None = None) -> list:
    out = []
    for _ in range(n):
      t = task or self.tasks[int(self.rng.choice(len(self.tasks), p=self.p))]
      i = int(self.rng.integers(len(self.caps)))
      cap = self.caps[i][int(self.rng.integers(len(self.caps[i])))]
      scene = self.scenes[i]
      if t == "caption":
        out.append((t, self.image(i), None, cap))
      elif t == "image_word":
        out.append((t, self.image(i), None, shapes_lib.summary_word(scene, self.summary)))
      elif t == "text_word":
        out.append((t, None, cap, shapes_lib.summary_word(scene, self.summary)))
      elif t == "text_lm":
        out.append((t, None, cap, None))
      elif t == "image_gen":
        out.append((t, self.codes[i], cap, None))
      else:
        kind = shapes_lib.QUESTION_KINDS[int(self.rng.integers(len(shapes_lib.QUESTION_KINDS)))]
        qtext, answer = shapes_lib.question(scene, kind, self.rng)
        out.append((t, self.image(i), qtext, answer))
    return out


def _vision_tower(kind: str, model):
  """The continuous vision tower (and projector) of a generative model; None for Chameleon (VQ)."""
  if kind.startswith("qwen"):
    return model.model.visual
  if kind == "paligemma":
    import torch

    return torch.nn.ModuleList([model.model.vision_tower, model.model.multi_modal_projector])
  return None


def _pooled_image_features(kind: str, model, vision: dict):
  """[B, d] mean over each image's token features, as the decoder receives them."""
  import torch

  if kind.startswith("qwen"):
    out = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"])
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
      return torch.stack([f.mean(0) for f in feats])
    n = [int(t.prod()) // 4 for t in vision["image_grid_thw"]]
    return torch.stack([f.mean(0) for f in torch.split(feats, n)])
  if kind == "chameleon":  # the word embeddings of the image's VQ code tokens (the VQ-VAE is frozen)
    with torch.no_grad():
      codes = model.model.get_image_tokens(vision["pixel_values"])
    return model.get_input_embeddings()(codes).mean(1)
  out = model.model.get_image_features(vision["pixel_values"])
  feats = out.pooler_output if hasattr(out, "pooler_output") else out
  return feats.mean(1)


def chameleon_split_codes(model, processor, src: coco.CocoCaptionsJson, chunk: int = 1024):
  """[N, image_seq_length] code token ids of every image of a split, computed once (the VQ-VAE is
  frozen); the images are read a chunk at a time, as the split may be large."""
  import torch

  n = len(src.images)
  return torch.cat(
    [
      chameleon_code_ids(model, processor, _images(src, range(s, min(s + chunk, n))))
      for s in range(0, n, chunk)
    ]
  )


def chameleon_code_ids(model, processor, images: list, batch: int = 128):
  """[N, image_seq_length] the decoder token ids of each image's VQ codes, exactly what
  `ChameleonModel` swaps in for the `<image>` positions (the VQ-VAE is frozen once trained)."""
  import torch

  out = []
  with torch.inference_mode():
    for s in range(0, len(images), batch):
      px = processor.image_processor(images=images[s : s + batch], return_tensors="pt")["pixel_values"]
      out.append(model.model.get_image_tokens(px).long())
  return torch.cat(out)


def pretrain_vision(
  kind: str, model, batcher: "_MixtureBatcher", sampler: "_MixtureSampler", cfg: Any, log
) -> dict:
  """Stage 1, as real MLLMs start from a contrastively trained vision tower: the vision tower (and
  projector) and the decoder's input word embeddings are aligned with the symmetric InfoNCE loss,
  each image's mean token feature against the mean word embedding of one of its captions. The
  tower is then frozen for the generalist stage (`generative.freeze_vision`). Chameleon has no
  continuous tower: the embeddings of its VQ code tokens are aligned the same way, on the codes of
  every training image computed once (the VQ-VAE is frozen), at the family's own `vision_lr`
  (an embedding table learns at a higher rate than a tower; measured at 2000 train images: the
  mean code embedding reaches 12% image->caption R@1 on 200 test images after 500 steps at 1e-2)."""
  import torch

  g = cfg.generative
  lr = float(cfg[kind].get("vision_lr", g.vision_lr))
  steps, bs = int(cfg[kind].get("vision_steps", g.vision_steps)), int(g.vision_batch_size)
  tower = _vision_tower(kind, model)
  emb = model.get_input_embeddings()
  params = (list(tower.parameters()) if tower is not None else []) + list(emb.parameters())
  opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg.weight_decay))
  progress = _Progress(f"{kind} vision stage", steps, float(cfg.log_every_s), log)
  scale = torch.tensor(math.log(1 / 0.07))
  codes = sampler.codes if kind == "chameleon" else None
  acc = 0.0
  for step in range(steps):
    idx = sampler.rng.choice(len(sampler.caps), size=min(bs, len(sampler.caps)), replace=False)
    caps = [sampler.caps[int(i)][int(sampler.rng.integers(len(sampler.caps[int(i)])))] for i in idx]
    if codes is not None:
      img = emb(codes[torch.as_tensor(idx)]).mean(1)
    else:
      _, vision = batcher._prompts("{image}", [sampler.image(int(i)) for i in idx], None)
      img = _pooled_image_features(kind, model, vision)
    img = torch.nn.functional.normalize(img, dim=-1)
    tok = batcher.tok(caps, add_special_tokens=False, padding=True, return_tensors="pt")
    m = tok["attention_mask"].unsqueeze(-1).float()
    txt = torch.nn.functional.normalize((emb(tok["input_ids"]) * m).sum(1) / m.sum(1), dim=-1)
    logits = scale.exp() * img @ txt.T
    target = torch.arange(len(idx))
    loss = (
      torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    ) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    acc = float((logits.argmax(1) == target).float().mean()) * 100
    progress.update(step, loss.item(), f" | batch image->caption top-1 {acc:.0f}%")
  return {"vision_stage_steps": steps, "vision_stage_lr": lr, "vision_stage_last_batch_top1": acc}


class _FrozenRows:
  """Keeps rows of an embedding table fixed through an optimizer's steps (gradient and AdamW's
  decoupled weight decay alike): Chameleon's VQ code embeddings, its frozen 'tower'."""

  def __init__(self, weight, rows):
    import torch

    self.weight, self.rows = weight, torch.as_tensor(rows, dtype=torch.long)
    self.saved = weight.detach()[self.rows].clone()

  def restore(self) -> None:
    import torch

    with torch.no_grad():
      self.weight[self.rows] = self.saved


def _greedy_captions(model, batcher: _MixtureBatcher, images, max_new_tokens: int = 30) -> list:
  import torch

  out = []
  with torch.inference_mode():
    for im in images:
      prompts, vision = batcher._prompts("{image} " + batcher.caption_prompt, [im], None)
      ids = torch.tensor([prompts[0]])
      inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **vision)
      if batcher.kind.startswith("qwen"):
        inputs["mm_token_type_ids"] = (ids == batcher.enc.image_token_id).long()
      if batcher.kind == "paligemma":
        inputs["token_type_ids"] = torch.zeros_like(ids)
      gen = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[batcher.eos, batcher.end],
        pad_token_id=int(batcher.enc.pad_id),
      )
      out.append(batcher.tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
  return out


def _tokenizer_for(kind: str, corpus: list, cfg: Any):
  from sae_jax.encoders import tiny

  vocab = int(cfg.vocab_size)
  if kind.startswith("qwen"):
    return train_tokenizer(corpus, tiny.QWEN_SPECIALS, vocab, "qwen")
  if kind == "paligemma":
    return train_tokenizer(corpus, GEMMA_SPECIALS + ("<image>",), vocab, "gemma")
  codes = chameleon_image_tokens(int(cfg.chameleon.vq_codes))
  specials = ("<pad>", "</s>", "<s>", "<unk>") + CHAMELEON_MARKERS + codes
  return train_tokenizer(corpus, specials, vocab + len(codes), "chameleon")


def _train_generative(
  kind: str, config: Any, data_dir: str, out_dir: str, log: Callable, chat_template: bool
) -> dict:
  import torch

  cfg = config.encoder_training
  g = cfg.generative
  q = cfg[kind]
  templates = dict(config.extract.templates)
  train = _split(data_dir, "train")
  caps = _captions_by_image(train)
  scenes = _scenes(data_dir, "train", train)
  tok = _tokenizer_for(
    kind, tokenizer_corpus([t for cs in caps for t in cs], templates, g.caption_prompt), cfg
  )
  size = coco.load_image(train.images[0]).size[0]
  torch.manual_seed(int(cfg.seed))
  extra: dict = {}
  if kind == "qwen2_vl":
    model, processor = build_qwen2_vl(tok, cfg), _qwen_processor(kind, tok, cfg, size)
  elif kind == "qwen3_vl":
    model, processor = build_qwen3_vl(tok, cfg, size), _qwen_processor(kind, tok, cfg, size)
  elif kind == "paligemma":
    model, processor = build_paligemma(tok, cfg, size)
  else:
    model, processor = build_chameleon(tok, cfg, size)
    n_vq = min(len(train.images), int(cfg.chameleon.vq_images))
    extra = train_chameleon_vq(model, processor, _images(train, range(n_vq)), cfg, log)
    for p in model.model.vqmodel.parameters():  # the image tokenizer is frozen from here on
      p.requires_grad_(False)
  enc = _wrap(kind, model, processor, templates, chat_template)
  batcher = _MixtureBatcher(enc, kind, str(g.caption_prompt))
  codes = chameleon_split_codes(model, processor, train) if kind == "chameleon" else None
  sampler = _MixtureSampler(train, caps, scenes, dict(cfg.mixture), int(cfg.seed), str(g.summary), codes)
  tower = _vision_tower(kind, model)
  if int(g.vision_steps) > 0:
    extra.update(pretrain_vision(kind, model, batcher, sampler, cfg, log))
    if tower is not None and bool(g.freeze_vision):
      for p in tower.parameters():
        p.requires_grad_(False)
      if kind == "qwen3_vl" and bool(q.train_deepstack):
        # Stage 1 aligns only the main merger's output; the DeepStack mergers (vision features added
        # to the decoder's first layers) are adapters that the generalist stage trains.
        for p in model.model.visual.deepstack_merger_list.parameters():
          p.requires_grad_(True)
  frozen_rows = None
  if kind == "chameleon" and bool(g.freeze_vision):
    code_ids = tok.convert_tokens_to_ids(list(chameleon_image_tokens(int(cfg.chameleon.vq_codes))))
    frozen_rows = _FrozenRows(model.get_input_embeddings().weight, code_ids)
  steps, bs = int(q.steps), int(q.batch_size)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=float(q.lr), weight_decay=float(cfg.weight_decay))
  progress = _Progress(kind, steps, float(cfg.log_every_s), log)
  model.train()
  if kind == "chameleon":
    model.model.vqmodel.eval()
  t0 = time.perf_counter()
  for step in range(steps):
    for grp in opt.param_groups:
      grp["lr"] = _lr_at(step, steps, float(q.lr), int(cfg.warmup_steps))
    per_seq, _ = _sequence_losses(model, batcher.batch(sampler.draw(bs)))
    loss = per_seq.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if frozen_rows is not None:
      frozen_rows.restore()
    progress.update(step, loss.item())
  train_s = time.perf_counter() - t0
  model.eval()
  test = _split(data_dir, "test", int(cfg.eval_images))
  test_caps = _captions_by_image(test)
  test_scenes = _scenes(data_dir, "test", test)
  # Per task on held-out samples: teacher-forced share of answers with every token right.
  tester = _MixtureSampler(test, test_caps, test_scenes, dict(cfg.mixture), int(cfg.seed) + 1, str(g.summary))
  task_acc = {}
  with torch.inference_mode():
    for t in MIXTURE_TASKS[:-1]:  # not image_gen: all of an image's codes exactly right is ~never
      hits = []
      for _ in range(int(g.eval_batches)):
        hits.append(_sequence_losses(model, batcher.batch(tester.draw(bs, task=t)))[1].float().numpy())
      task_acc[t] = float(np.concatenate(hits).mean() * 100)
  log(
    f"{kind}: teacher-forced exact answers on test samples: "
    + ", ".join(f"{t} {a:.1f}%" for t, a in task_acc.items())
  )
  quality = {
    "kind": kind,
    "role": "generative",
    "architecture": type(model).__name__,
    "chat_template": bool(chat_template),
    "mixture": {t: float(cfg.mixture[t]) for t in sampler.tasks},
    "answer_accuracy": task_acc,
    **extra,
    **_retrieval_quality(enc, test, test_caps, test_scenes, log, kind),
  }
  n_samples = int(g.sample_captions)
  samples = _greedy_captions(model, batcher, _images(test, range(n_samples)))
  quality["samples"] = [{"generated": s, "reference": test_caps[i]} for i, s in enumerate(samples)]
  for i, s in enumerate(samples):
    log(f"  sample {i}: {s!r}  (reference: {test_caps[i][0]!r})")
  quality.update(
    train_seconds=round(train_s, 1), steps=steps, parameters=int(sum(p.numel() for p in model.parameters()))
  )
  return _save(model, processor, out_dir, quality)


def _save(model, processor, out_dir: str, quality: dict) -> dict:
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  model.save_pretrained(tmp)
  processor.save_pretrained(tmp)
  workdir_lib.atomic_write_json(os.path.join(tmp, QUALITY_FILE), quality)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)  # the checkpoint appears whole or not at all
  return quality


def train_encoder(
  config: Any, kind: str, data_dir: str, out_dir: str, log: Callable = print, chat_template: bool = False
) -> dict:
  """Trains model `kind` on the shapes data in `data_dir` into `out_dir` (skipped when complete).
  `chat_template`: generative models train inside their chat format (extraction must use it too)."""
  import torch

  if kind not in KINDS:
    raise SaeJaxError(
      f"config.study.model.<name>.source=train:{kind}: expected train:<kind> with kind one of {KINDS}"
    )
  done = os.path.join(out_dir, QUALITY_FILE)
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  for split in ("train", "test"):
    if not os.path.exists(os.path.join(data_dir, f"captions_{split}.json")):
      raise SaeJaxError(f"{data_dir}: captions_{split}.json is missing (make the shapes data first)")
  torch.set_num_threads(int(config.encoder_training.threads))
  out_dir = os.path.abspath(out_dir)
  if kind in CONTRASTIVE_KINDS:
    return _train_contrastive(kind, config, data_dir, out_dir, log)
  return _train_generative(kind, config, data_dir, out_dir, log, chat_template)
