"""The generalist mixture of the generative models: samples drawn by task weight (`MixtureSampler`),
built into token sequences with the family's extraction encoder (`MixtureBatcher`), and the
per-sequence answer loss (`sequence_losses`).
"""

from __future__ import annotations

import numpy as np

from sae_jax.data import coco
from sae_jax.study import shapes as shapes_lib

MIXTURE_TASKS = ("caption", "image_word", "text_word", "text_lm", "question", "image_gen")


class MixtureBatcher:
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

  def prompts(self, template: str, images=None, texts=None):
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
      prompts, vision = self.prompts(key[1], images, texts)
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


def sequence_losses(model, batch: dict):
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


class MixtureSampler:
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
