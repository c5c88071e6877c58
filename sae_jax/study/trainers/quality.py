"""Quality figures of a trained model on the test split: image<->text and caption->caption R@1 with
chance (through `sae_jax.retrieval` and `sae_jax.uncertainty`), and linear probes of what the image
embeddings read (shape, colour, grid position).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sae_jax import retrieval, uncertainty
from sae_jax.encoders import pooling as pooling_lib
from sae_jax.study.trainers.common import split_images


def _by_owner(owner: np.ndarray, n_images: int) -> tuple:
  """CSR positives of each image query: the rows of its captions (`owner[j]`: caption j's image)."""
  order = np.argsort(owner, kind="stable").astype(np.int32)
  return np.searchsorted(owner[order], np.arange(n_images + 1)).astype(np.int32), order


def recall_at_1(img_emb: np.ndarray, txt_emb: np.ndarray, owner: np.ndarray) -> dict:
  """image->text and text->image R@1 (percent) of cosine similarity (`retrieval.evaluate`) and
  their chance (`uncertainty.chance_recall`); owner[j] = image row of caption j."""
  n, m = img_emb.shape[0], owner.shape[0]
  indptr, order = _by_owner(owner, n)
  i2t, _ = retrieval.evaluate(img_emb, txt_emb, indptr, order, ks=(1,))
  t2i, _ = retrieval.evaluate(
    txt_emb, img_emb, np.arange(m + 1, dtype=np.int32), owner.astype(np.int32), ks=(1,)
  )
  per_image = np.bincount(owner, minlength=n)
  return {
    "i2t_R@1": i2t["R@1"],
    "t2i_R@1": t2i["R@1"],
    "i2t_chance": uncertainty.chance_recall(per_image, m, (1,))["R@1"],
    "t2i_chance": uncertainty.chance_recall(1, n, (1,))["R@1"],
  }


def caption_to_caption_r1(txt_emb: np.ndarray, owner: np.ndarray) -> dict:
  """How often a caption's nearest other caption (cosine) describes the same image (percent), and
  the chance of that: (captions per image - 1) among the other captions."""
  m = owner.shape[0]
  # Each caption's positives: the other captions of its image (itself is excluded from its pool).
  same = [np.flatnonzero((owner == owner[j]) & (np.arange(m) != j)) for j in range(m)]
  indptr = np.concatenate([[0], np.cumsum([len(s) for s in same])]).astype(np.int32)
  indices = np.concatenate(same).astype(np.int32)
  rec, _ = retrieval.evaluate(
    txt_emb, txt_emb, indptr, indices, ks=(1,), exclude=np.arange(m, dtype=np.int32)
  )
  return {"c2c_R@1": rec["R@1"], "c2c_chance": uncertainty.chance_recall(np.diff(indptr), m - 1, (1,))["R@1"]}


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


def embed(enc, images=None, texts=None, batch: int = 64, pooling: str = "mean") -> np.ndarray:
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


def retrieval_quality(enc, test, test_caps, test_scenes, log: Callable, label: str) -> dict:
  img = embed(enc, images=split_images(test, range(len(test.images))))
  txt = embed(enc, texts=[t for cs in test_caps for t in cs])
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
