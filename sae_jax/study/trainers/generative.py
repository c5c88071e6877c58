"""The generative models' two training stages: stage 1 aligns the vision tower (Chameleon: its code
embeddings) with the word embeddings by InfoNCE; stage 2 trains the decoder on the mixture.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from sae_jax.data import coco
from sae_jax.encoders import factories
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
from sae_jax.study.trainers.mixture import MIXTURE_TASKS, MixtureBatcher, MixtureSampler, sequence_losses
from sae_jax.study.trainers.quality import retrieval_quality
from sae_jax.study.trainers.tokenizers import tokenizer_corpus, tokenizer_for
from sae_jax.study.trainers.vq import chameleon_split_codes, train_chameleon_vq


def vision_tower(kind: str, model):
  """The continuous vision tower (and projector) of a generative model; None for Chameleon (VQ)."""
  if kind.startswith("qwen"):
    return model.model.visual
  if kind == "paligemma":
    import torch

    return torch.nn.ModuleList([model.model.vision_tower, model.model.multi_modal_projector])
  return None


def pooled_image_features(kind: str, model, vision: dict):
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


def pretrain_vision(
  kind: str, model, batcher: "MixtureBatcher", sampler: "MixtureSampler", cfg: Any, log
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
  tower = vision_tower(kind, model)
  emb = model.get_input_embeddings()
  params = (list(tower.parameters()) if tower is not None else []) + list(emb.parameters())
  opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg.weight_decay))
  progress = Progress(f"{kind} vision stage", steps, float(cfg.log_every_s), log)
  scale = torch.tensor(math.log(1 / 0.07))
  codes = sampler.codes if kind == "chameleon" else None
  acc = 0.0
  for step in range(steps):
    idx = sampler.rng.choice(len(sampler.caps), size=min(bs, len(sampler.caps)), replace=False)
    caps = [sampler.caps[int(i)][int(sampler.rng.integers(len(sampler.caps[int(i)])))] for i in idx]
    if codes is not None:
      img = emb(codes[torch.as_tensor(idx)]).mean(1)
    else:
      _, vision = batcher.prompts("{image}", [sampler.image(int(i)) for i in idx], None)
      img = pooled_image_features(kind, model, vision)
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


class FrozenRows:
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


def greedy_captions(model, batcher: MixtureBatcher, images, max_new_tokens: int = 30) -> list:
  import torch

  out = []
  with torch.inference_mode():
    for im in images:
      prompts, vision = batcher.prompts("{image} " + batcher.caption_prompt, [im], None)
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


def train_generative(
  kind: str, config: Any, data_dir: str, out_dir: str, log: Callable, chat_template: bool
) -> dict:
  import torch

  cfg = config.encoder_training
  g = cfg.generative
  q = cfg[kind]
  templates = dict(config.extract.templates)
  train = split_source(data_dir, "train")
  caps = captions_by_image(train)
  scenes = scene_records(data_dir, "train", train)
  tok = tokenizer_for(
    kind, tokenizer_corpus([t for cs in caps for t in cs], templates, g.caption_prompt), cfg
  )
  size = coco.load_image(train.images[0]).size[0]
  torch.manual_seed(int(cfg.seed))
  extra: dict = {}
  model, processor = families.build(kind, tok, cfg, size)
  if kind == "chameleon":
    n_vq = min(len(train.images), int(cfg.chameleon.vq_images))
    extra = train_chameleon_vq(model, processor, split_images(train, range(n_vq)), cfg, log)
    for p in model.model.vqmodel.parameters():  # the image tokenizer is frozen from here on
      p.requires_grad_(False)
  enc = training_encoder(kind, model, processor, templates, chat_template)
  batcher = MixtureBatcher(enc, kind, str(g.caption_prompt))
  codes = chameleon_split_codes(model, processor, train) if kind == "chameleon" else None
  sampler = MixtureSampler(train, caps, scenes, dict(cfg.mixture), int(cfg.seed), str(g.summary), codes)
  tower = vision_tower(kind, model)
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
    code_ids = tok.convert_tokens_to_ids(list(factories.chameleon_image_tokens(int(cfg.chameleon.vq_codes))))
    frozen_rows = FrozenRows(model.get_input_embeddings().weight, code_ids)
  steps, bs = int(q.steps), int(q.batch_size)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=float(q.lr), weight_decay=float(cfg.weight_decay))
  progress = Progress(kind, steps, float(cfg.log_every_s), log)
  model.train()
  if kind == "chameleon":
    model.model.vqmodel.eval()
  t0 = time.perf_counter()
  for step in range(steps):
    for grp in opt.param_groups:
      grp["lr"] = lr_at(step, steps, float(q.lr), int(cfg.warmup_steps))
    per_seq, _ = sequence_losses(model, batcher.batch(sampler.draw(bs)))
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
  test = split_source(data_dir, "test", int(cfg.eval_images))
  test_caps = captions_by_image(test)
  test_scenes = scene_records(data_dir, "test", test)
  # Per task on held-out samples: teacher-forced share of answers with every token right.
  tester = MixtureSampler(test, test_caps, test_scenes, dict(cfg.mixture), int(cfg.seed) + 1, str(g.summary))
  task_acc = {}
  with torch.inference_mode():
    for t in MIXTURE_TASKS[:-1]:  # not image_gen: all of an image's codes exactly right is ~never
      hits = []
      for _ in range(int(g.eval_batches)):
        hits.append(sequence_losses(model, batcher.batch(tester.draw(bs, task=t)))[1].float().numpy())
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
    **retrieval_quality(enc, test, test_caps, test_scenes, log, kind),
  }
  n_samples = int(g.sample_captions)
  samples = greedy_captions(model, batcher, split_images(test, range(n_samples)))
  quality["samples"] = [{"generated": s, "reference": test_caps[i]} for i, s in enumerate(samples)]
  for i, s in enumerate(samples):
    log(f"  sample {i}: {s!r}  (reference: {test_caps[i][0]!r})")
  quality.update(
    train_seconds=round(train_s, 1), steps=steps, parameters=int(sum(p.numel() for p in model.parameters()))
  )
  return save_checkpoint(model, processor, out_dir, quality)
