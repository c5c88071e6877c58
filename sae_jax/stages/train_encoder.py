"""Trains the two image-text models of the shapes study (torch, CPU) and saves them as HF checkpoints.

  contrastive  a small `CLIPModel` (ViT on the 64x64 images) trained with the symmetric InfoNCE loss
  generative   a small `Qwen2VLForConditionalGeneration` trained as a captioner (image + prompt ->
               caption, loss on the caption tokens) and on text-only caption language modelling, so
               both modalities pass through the decoder as in the paper's MLLMs

`train_encoder(config, kind, data_dir, out_dir)` writes `out_dir/` with `save_pretrained` (model,
processor, tokenizer), which `config.extract.model_name=<out_dir>` loads like a hub checkpoint, and
`out_dir/quality.json` (the figures printed at the end). A directory holding `quality.json` is
complete and is not retrained. The tokenizer is a byte-level BPE trained on the train captions with
the special tokens the processor needs (`config.encoder_training.vocab_size`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from sae_jax import workdir as workdir_lib
from sae_jax.data import coco
from sae_jax.errors import SaeJaxError

KINDS = ("clip", "qwen2_vl")
QUALITY_FILE = "quality.json"
CLIP_SPECIALS = ("<|endoftext|>", "<|startoftext|>")


def train_tokenizer(corpus: list, specials: tuple, vocab_size: int, clip_style: bool):
  """Byte-level BPE tokenizer trained on `corpus`; CLIP style wraps texts in BOS ... EOS (the text
  tower pools at the EOS token), the Qwen style adds nothing."""
  from sae_jax.encoders import tiny  # torch: the `extract` extra

  eos = "<|endoftext|>"
  if clip_style:
    return tiny.bpe_tokenizer(
      corpus, specials, vocab_size, bos="<|startoftext|>", eos=eos, pad=eos, add_bos="eos"
    )
  return tiny.bpe_tokenizer(corpus, specials, vocab_size, eos=eos, pad=eos)


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


# ------------------------------------------------------------------------------------------- CLIP


def build_clip(tok, cfg: Any, image_size: int):
  from transformers import CLIPConfig, CLIPModel, CLIPProcessor
  from transformers.models.clip import CLIPImageProcessorPil

  c = cfg.clip
  tower = dict(
    hidden_size=int(c.hidden),
    intermediate_size=4 * int(c.hidden),
    num_hidden_layers=int(c.layers),
    num_attention_heads=int(c.heads),
  )
  model_cfg = CLIPConfig(
    text_config=dict(
      tower,
      vocab_size=len(tok),
      max_position_embeddings=int(c.max_text_len),
      eos_token_id=tok.eos_token_id,
      bos_token_id=tok.bos_token_id,
      pad_token_id=tok.pad_token_id,
    ),
    vision_config=dict(tower, image_size=image_size, patch_size=int(c.patch_size)),
    projection_dim=int(c.projection_dim),
  )
  ip = CLIPImageProcessorPil(
    size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
  )
  return CLIPModel(model_cfg), CLIPProcessor(image_processor=ip, tokenizer=tok)


def clip_embed(model, processor, images=None, texts=None, batch: int = 256):
  """Unit-norm CLIP embeddings of images or texts (no grad), as the encoder wrapper computes them."""
  import torch

  out = []
  items = images if images is not None else texts
  with torch.inference_mode():
    for s in range(0, len(items), batch):
      part = items[s : s + batch]
      if images is not None:
        px = processor.image_processor(images=part, return_tensors="pt")["pixel_values"]
        e = model.get_image_features(pixel_values=px, return_dict=True).pooler_output
      else:
        t = processor.tokenizer(
          part,
          return_tensors="pt",
          padding=True,
          truncation=True,
          max_length=model.config.text_config.max_position_embeddings,
        )
        e = model.get_text_features(
          input_ids=t["input_ids"], attention_mask=t["attention_mask"], return_dict=True
        ).pooler_output
      out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
  return np.concatenate(out)


def clip_recall_at_1(img_emb: np.ndarray, txt_emb: np.ndarray, owner: np.ndarray) -> dict:
  """image->text and text->image R@1 (percent); owner[j] = image row of caption j."""
  sim = img_emb @ txt_emb.T
  i2t = float(np.mean(owner[sim.argmax(axis=1)] == np.arange(img_emb.shape[0])) * 100)
  t2i = float(np.mean(sim.argmax(axis=0) == owner) * 100)
  per_image = np.bincount(owner, minlength=img_emb.shape[0])
  chance_i2t = float(np.mean(per_image / owner.shape[0]) * 100)
  return {"i2t_R@1": i2t, "t2i_R@1": t2i, "i2t_chance": chance_i2t, "t2i_chance": 100.0 / img_emb.shape[0]}


def _train_clip(cfg: Any, data_dir: str, out_dir: str, log: Callable) -> dict:
  import torch

  c = cfg.clip
  train = _split(data_dir, "train")
  caps = _captions_by_image(train)
  tok = train_tokenizer([t for cs in caps for t in cs], CLIP_SPECIALS, int(cfg.vocab_size), clip_style=True)
  size = coco.load_image(train.images[0]).size[0]
  torch.manual_seed(int(cfg.seed))
  model, processor = build_clip(tok, cfg, size)
  # Every train image once through the processor (exactly what extraction will feed the model).
  log(f"clip: preparing {len(train.images)} train images")
  pixels = torch.cat(
    [
      processor.image_processor(
        images=_images(train, range(s, min(s + 512, len(train.images)))), return_tensors="pt"
      )["pixel_values"].to(torch.bfloat16)
      for s in range(0, len(train.images), 512)
    ]
  )
  flat = [t for cs in caps for t in cs]
  owner = np.repeat(np.arange(len(caps)), [len(cs) for cs in caps])
  start = np.concatenate([[0], np.cumsum([len(cs) for cs in caps])[:-1]])
  enc = tok(flat, padding="max_length", truncation=True, max_length=int(c.max_text_len), return_tensors="pt")
  steps, bs = int(c.steps), int(c.batch_size)
  opt = torch.optim.AdamW(model.parameters(), lr=float(c.lr), weight_decay=float(cfg.weight_decay))
  rng = np.random.default_rng(int(cfg.seed))
  progress = _Progress("clip", steps, float(cfg.log_every_s), log)
  model.train()
  t0 = time.perf_counter()
  for step in range(steps):
    idx = rng.choice(len(caps), size=min(bs, len(caps)), replace=False)
    cap = start[idx] + rng.integers(0, np.bincount(owner)[idx])  # one random caption of each image
    for g in opt.param_groups:
      g["lr"] = _lr_at(step, steps, float(c.lr), int(cfg.warmup_steps))
    ids, mask = enc["input_ids"][cap], enc["attention_mask"][cap]
    keep = int(mask.sum(1).max())  # trim the padding columns of this batch
    out = model(
      input_ids=ids[:, :keep],
      attention_mask=mask[:, :keep],
      pixel_values=pixels[idx].float(),
      return_loss=True,
    )
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    progress.update(step, out.loss.item(), f" | logit scale {model.logit_scale.exp().item():.1f}")
  train_s = time.perf_counter() - t0
  model.eval()
  test = _split(data_dir, "test", int(cfg.eval_images))
  test_caps = _captions_by_image(test)
  img = clip_embed(model, processor, images=_images(test, range(len(test.images))))
  txt = clip_embed(model, processor, texts=[t for cs in test_caps for t in cs])
  owner_t = np.repeat(np.arange(len(test_caps)), [len(cs) for cs in test_caps])
  quality = {
    "kind": "clip",
    "test_images": len(test.images),
    "test_captions": int(owner_t.shape[0]),
    **clip_recall_at_1(img, txt, owner_t),
    "train_seconds": round(train_s, 1),
    "steps": steps,
    "parameters": int(sum(p.numel() for p in model.parameters())),
  }
  quality["i2t_over_chance"] = quality["i2t_R@1"] / quality["i2t_chance"]
  log(
    f"clip quality: image->text R@1 {quality['i2t_R@1']:.2f}% on {len(test.images)} test images x "
    f"{quality['test_captions'] // max(1, len(test.images))} captions (chance {quality['i2t_chance']:.2f}%, "
    f"{quality['i2t_over_chance']:.0f}x); text->image R@1 {quality['t2i_R@1']:.2f}% (chance "
    f"{quality['t2i_chance']:.2f}%)"
  )
  return _save(model, processor, out_dir, quality)


# -------------------------------------------------------------------------------------- Qwen2-VL


def build_qwen2_vl(tok, cfg: Any):
  from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

  from sae_jax.encoders import tiny

  q = cfg.qwen2_vl
  h, heads = int(q.hidden), int(q.heads)
  half = h // heads // 2  # rotary frequencies per head, split over (time, height, width)
  sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
  ids = {s: tok.convert_tokens_to_ids(s) for s in tiny.QWEN_SPECIALS}
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
      rope_scaling={"type": "mrope", "mrope_section": sections},
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


def _qwen_processor(tok, cfg: Any, image_size: int):
  from transformers import Qwen2VLProcessor
  from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

  from sae_jax.encoders.qwen_vl import make_processor

  p = int(cfg.qwen2_vl.patch_size)
  side = (image_size // (2 * p)) * 2 * p  # the images keep their size (a multiple of 2 patches)
  ip = Qwen2VLImageProcessorPil(
    patch_size=p, merge_size=2, temporal_patch_size=2, min_pixels=side * side, max_pixels=side * side
  )
  return make_processor(Qwen2VLProcessor, ip, tok)


class _CaptionBatcher:
  """Captioner sequences `<vision_start> <image_pad>*n <vision_end> prompt caption <eos>` (labels on
  the caption and EOS) and text-only sequences `caption <eos>` (labels on every token)."""

  def __init__(self, processor, model_cfg, prompt: str):
    import torch

    self.torch = torch
    self.processor = processor
    tok = processor.tokenizer
    self.tok = tok
    self.eos = tok.eos_token_id
    self.image_token = model_cfg.image_token_id
    self.vs, self.ve = model_cfg.vision_start_token_id, model_cfg.vision_end_token_id
    self.prompt_ids = tok(" " + prompt + " ", add_special_tokens=False)["input_ids"]

  def image_inputs(self, images):
    out = self.processor.image_processor(images=images, return_tensors="pt")
    merge = self.processor.image_processor.merge_size
    n_tokens = [int(t.prod()) // merge**2 for t in out["image_grid_thw"]]
    return out["pixel_values"], out["image_grid_thw"], n_tokens

  def _pad(self, seqs, labels):
    torch = self.torch
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), self.eos, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, (s, lb) in enumerate(zip(seqs, labels)):
      ids[r, : len(s)] = torch.tensor(s)
      lab[r, : len(s)] = torch.tensor(lb)
      mask[r, : len(s)] = 1
    return ids, mask, lab

  def captioner(self, images, captions):
    pixel_values, grid, n_tokens = self.image_inputs(images)
    seqs, labels = [], []
    for n, cap in zip(n_tokens, captions):
      prefix = [self.vs] + [self.image_token] * n + [self.ve] + self.prompt_ids
      body = self.tok(cap, add_special_tokens=False)["input_ids"] + [self.eos]
      seqs.append(prefix + body)
      labels.append([-100] * len(prefix) + body)
    ids, mask, lab = self._pad(seqs, labels)
    return dict(
      input_ids=ids,
      attention_mask=mask,
      labels=lab,
      pixel_values=pixel_values,
      image_grid_thw=grid,
      mm_token_type_ids=(ids == self.image_token).long(),
    )

  def text_only(self, captions):
    seqs = [self.tok(c, add_special_tokens=False)["input_ids"] + [self.eos] for c in captions]
    ids, mask, lab = self._pad(seqs, seqs)
    return dict(input_ids=ids, attention_mask=mask, labels=lab)


def _token_accuracy(model, batcher, images, captions, batch: int = 64) -> float:
  """Teacher-forced next-token accuracy on the caption tokens (and EOS) of captioner sequences."""
  import torch

  hit = total = 0
  with torch.inference_mode():
    for s in range(0, len(captions), batch):
      inp = batcher.captioner(images[s : s + batch], captions[s : s + batch])
      labels = inp.pop("labels")
      logits = model(**inp).logits
      pred = logits[:, :-1].argmax(-1)
      tgt = labels[:, 1:]
      ok = tgt != -100
      hit += int((pred[ok] == tgt[ok]).sum())
      total += int(ok.sum())
  return 100.0 * hit / max(1, total)


def _greedy_captions(model, batcher, images, max_new_tokens: int = 40) -> list:
  import torch

  out = []
  with torch.inference_mode():
    for im in images:
      inp = batcher.captioner([im], [""])
      inp.pop("labels")
      n = int(inp["attention_mask"].sum()) - 1  # drop the EOS of the empty caption
      inp["input_ids"], inp["attention_mask"] = inp["input_ids"][:, :n], inp["attention_mask"][:, :n]
      inp["mm_token_type_ids"] = inp["mm_token_type_ids"][:, :n]
      gen = model.generate(
        **inp,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=batcher.eos,
        pad_token_id=batcher.eos,
      )
      out.append(batcher.tok.decode(gen[0, n:], skip_special_tokens=True).strip())
  return out


def _train_qwen2_vl(cfg: Any, data_dir: str, out_dir: str, log: Callable) -> dict:
  import torch

  from sae_jax.encoders import tiny

  q = cfg.qwen2_vl
  train = _split(data_dir, "train")
  caps = _captions_by_image(train)
  prompts = [q.prompt]
  tok = train_tokenizer(
    [t for cs in caps for t in cs] + prompts, tiny.QWEN_SPECIALS, int(cfg.vocab_size), clip_style=False
  )
  size = coco.load_image(train.images[0]).size[0]
  torch.manual_seed(int(cfg.seed))
  model = build_qwen2_vl(tok, cfg)
  processor = _qwen_processor(tok, cfg, size)
  batcher = _CaptionBatcher(processor, model.config, str(q.prompt))
  steps, bs = int(q.steps), int(q.batch_size)
  opt = torch.optim.AdamW(model.parameters(), lr=float(q.lr), weight_decay=float(cfg.weight_decay))
  rng = np.random.default_rng(int(cfg.seed))
  progress = _Progress("qwen2_vl", steps, float(cfg.log_every_s), log)
  w_text = float(q.text_lm_weight)
  model.train()
  t0 = time.perf_counter()
  for step in range(steps):
    idx = rng.choice(len(caps), size=min(bs, len(caps)), replace=False)
    captions = [caps[i][rng.integers(len(caps[i]))] for i in idx]
    for g in opt.param_groups:
      g["lr"] = _lr_at(step, steps, float(q.lr), int(cfg.warmup_steps))
    loss_cap = model(**batcher.captioner(_images(train, idx), captions)).loss
    loss = loss_cap
    if w_text > 0:
      tidx = rng.choice(len(caps), size=min(bs, len(caps)), replace=False)
      loss_txt = model(**batcher.text_only([caps[i][rng.integers(len(caps[i]))] for i in tidx])).loss
      loss = loss_cap + w_text * loss_txt
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    progress.update(step, loss.item(), f" | captioner {loss_cap.item():.4f}")
  train_s = time.perf_counter() - t0
  model.eval()
  test = _split(data_dir, "test", int(cfg.eval_images))
  test_caps = _captions_by_image(test)
  n_eval = min(len(test.images), 200)  # teacher-forced accuracy on the first caption of 200 images
  images = _images(test, range(n_eval))
  acc = _token_accuracy(model, batcher, images, [cs[0] for cs in test_caps[:n_eval]])
  n_samples = int(q.sample_captions)
  samples = _greedy_captions(model, batcher, images[:n_samples])
  quality = {
    "kind": "qwen2_vl",
    "token_accuracy": acc,
    "token_accuracy_images": n_eval,
    "samples": [{"generated": g, "reference": test_caps[i]} for i, g in enumerate(samples)],
    "train_seconds": round(train_s, 1),
    "steps": steps,
    "parameters": int(sum(p.numel() for p in model.parameters())),
  }
  log(f"qwen2_vl quality: teacher-forced caption token accuracy {acc:.2f}% on {n_eval} test captions")
  for i, g in enumerate(samples):
    log(f"  sample {i}: {g!r}  (reference: {test_caps[i][0]!r})")
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


def train_encoder(config: Any, kind: str, data_dir: str, out_dir: str, log: Callable = print) -> dict:
  """Trains model `kind` on the shapes data in `data_dir` into `out_dir` (skipped when complete)."""
  import torch

  if kind not in KINDS:
    raise SaeJaxError(f"config.study.model.<name>.source=train:{kind}: expected train:clip or train:qwen2_vl")
  done = os.path.join(out_dir, QUALITY_FILE)
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  for split in ("train", "test"):
    if not os.path.exists(os.path.join(data_dir, f"captions_{split}.json")):
      raise SaeJaxError(f"{data_dir}: captions_{split}.json is missing (make the shapes data first)")
  torch.set_num_threads(int(config.encoder_training.threads))
  cfg = config.encoder_training
  return (_train_clip if kind == "clip" else _train_qwen2_vl)(cfg, data_dir, os.path.abspath(out_dir), log)
