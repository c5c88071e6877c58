"""Contrastive training of CLIP (symmetric InfoNCE) and SigLIP2 (pairwise sigmoid loss)."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from sae_jax.data import coco
from sae_jax.study.trainers import families
from sae_jax.study.trainers.common import (
  Progress,
  captions_by_image,
  lr_at,
  save_checkpoint,
  scene_records,
  split_images,
  split_source,
  training_encoder,
)
from sae_jax.study.trainers.quality import retrieval_quality
from sae_jax.study.trainers.tokenizers import CLIP_SPECIALS, GEMMA_SPECIALS, train_tokenizer


def train_contrastive(kind: str, config: Any, data_dir: str, out_dir: str, log: Callable) -> dict:
  import torch

  cfg = config.encoder_training
  c = cfg[kind]
  train = split_source(data_dir, "train")
  caps = captions_by_image(train)
  corpus = [t for cs in caps for t in cs]
  if kind == "clip":
    tok = train_tokenizer(corpus, CLIP_SPECIALS, int(cfg.vocab_size), "clip")
  else:
    tok = train_tokenizer(corpus, GEMMA_SPECIALS, int(cfg.vocab_size), "gemma")
  size = coco.load_image(train.images[0]).size[0]
  torch.manual_seed(int(cfg.seed))
  model, processor = families.build(kind, tok, cfg, size)
  enc = training_encoder(kind, model, processor, {}, False)
  # Every train image once through the processor (exactly what extraction will feed the model).
  log(f"{kind}: preparing {len(train.images)} train images")
  parts = [
    enc.image_inputs(split_images(train, range(s, min(s + 512, len(train.images)))))
    for s in range(0, len(train.images), 512)
  ]
  pixels = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
  owner = np.repeat(np.arange(len(caps)), [len(cs) for cs in caps])
  start = np.concatenate([[0], np.cumsum([len(cs) for cs in caps])[:-1]])
  steps, bs = int(c.steps), int(c.batch_size)
  opt = torch.optim.AdamW(model.parameters(), lr=float(c.lr), weight_decay=float(cfg.weight_decay))
  rng = np.random.default_rng(int(cfg.seed))
  progress = Progress(kind, steps, float(cfg.log_every_s), log)
  t0 = time.perf_counter()
  for step in range(steps):
    idx = rng.choice(len(caps), size=min(bs, len(caps)), replace=False)
    cap = start[idx] + rng.integers(0, np.bincount(owner)[idx])  # one random caption of each image
    for g in opt.param_groups:
      g["lr"] = lr_at(step, steps, float(c.lr), int(cfg.warmup_steps))
    text = enc.text_inputs([corpus[j] for j in cap])
    out = model(**text, **{k: v[idx] for k, v in pixels.items()}, return_loss=True)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    progress.update(step, out.loss.item(), f" | logit scale {model.logit_scale.exp().item():.1f}")
  train_s = time.perf_counter() - t0
  model.eval()
  test = split_source(data_dir, "test", int(cfg.eval_images))
  quality = {
    "kind": kind,
    "role": "contrastive",
    "architecture": type(model).__name__,
    "loss": "InfoNCE" if kind == "clip" else "sigmoid",
    **retrieval_quality(enc, test, captions_by_image(test), scene_records(data_dir, "test", test), log, kind),
    "train_seconds": round(train_s, 1),
    "steps": steps,
    "parameters": int(sum(p.numel() for p in model.parameters())),
  }
  return save_checkpoint(model, processor, out_dir, quality)
