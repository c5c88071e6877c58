"""How well the analysis recovers the planted source's truth: learned concepts matched to planted
atoms, modality-score AUCs between kinds, and where the top-energy set sits against the
distractor span (`synthetic_check`, in the analysis summary of a synthetic run)."""

from __future__ import annotations

import numpy as np
import scipy.stats

from sae_jax import metrics
from sae_jax.data.synthetic import KINDS, PlantedTruth
from sae_jax.errors import SaeJaxError


def auc_mann_whitney(negatives: np.ndarray, positives: np.ndarray) -> float:
  """ROC AUC of scores separating `positives` from `negatives`: P(pos > neg) + P(pos == neg) / 2.

  The Mann-Whitney U statistic over average ranks (ties count one half), so it equals the area
  under the ROC curve of any threshold rule on the scores.
  """
  neg = np.asarray(negatives, np.float64).reshape(-1)
  pos = np.asarray(positives, np.float64).reshape(-1)
  if neg.size == 0 or pos.size == 0:
    raise SaeJaxError(f"AUC: needs at least one score of each class, got {neg.size} and {pos.size}")
  ranks = scipy.stats.rankdata(np.concatenate([neg, pos]))  # average ranks for ties
  u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
  return float(u / (neg.size * pos.size))


def match_planted(D: np.ndarray, planted: PlantedTruth) -> tuple[np.ndarray, np.ndarray]:
  """For each learned concept: the planted concept of largest cosine, and that cosine."""
  cos = np.asarray(D, np.float64) @ planted.dictionary.astype(np.float64).T
  best = np.argmax(cos, axis=1)
  return best, cos[np.arange(cos.shape[0]), best]


def synthetic_check(
  D: np.ndarray, cm: metrics.ConceptMetrics, planted: PlantedTruth, top_fraction: float, threshold: float
) -> dict:
  """How well the metrics recover the planted structure (only defined for the synthetic source)."""
  best, cos = match_planted(D, planted)
  kind = planted.kinds[best]
  ms = cm.modality_score if not cm.modality_reverse else 1.0 - cm.modality_score
  ok = (cos >= threshold) & np.isfinite(ms)
  out: dict = {"match_threshold": threshold, "matched": int(ok.sum()), "per_kind": {}}
  for k, name in enumerate(KINDS):
    sel = ok & (kind == k)
    covered = np.unique(best[sel]).size
    out["per_kind"][name] = {
      "planted": int(np.sum(planted.kinds == k)),
      "covered": int(covered),
      "learned_matched": int(sel.sum()),
      "modality_mean": float(np.mean(ms[sel])) if sel.any() else None,
    }

  def auc(lo, hi):
    a, b = ok & (kind == lo), ok & (kind == hi)
    if not a.any() or not b.any():
      return None
    return auc_mann_whitney(ms[a], ms[b])

  out["auc_image_vs_text"] = auc(0, 1)
  out["auc_image_vs_shared"] = auc(0, 2)
  out["auc_shared_vs_text"] = auc(2, 1)
  order = np.argsort(-cm.energy, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  top = metrics.top_fraction_set(cm.energy, top_fraction)
  # Distractors co-fire in most rows, so an SAE often learns mixtures of them rather than each
  # atom: test membership in their span (norm of the projection of the unit learned row).
  dist_atoms = planted.distractors.astype(np.float64)
  if dist_atoms.shape[0]:
    q, _ = np.linalg.qr(dist_atoms.T)
    in_span = np.linalg.norm(np.asarray(D, np.float64) @ q, axis=1)
  else:
    in_span = np.zeros(D.shape[0])
  out["top_energy_set_size"] = int(top.size)
  out["top_energy_set_distractor_span"] = [float(x) for x in in_span[top]]
  out["top_energy_set_in_distractor_span_fraction"] = float(np.mean(in_span[top] >= threshold))
  best_learned = np.argmax(np.asarray(D, np.float64) @ dist_atoms.T, axis=0) if dist_atoms.shape[0] else []
  out["distractor_best_learned_energy_ranks"] = [int(rank[i]) for i in best_learned]
  out["energy_share_in_distractor_span"] = float(cm.energy[in_span >= threshold].sum() / cm.energy.sum())
  return out
