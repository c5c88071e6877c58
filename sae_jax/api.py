"""The study's tools on your own embeddings: a small public surface over the stages' code.

    from sae_jax import api
    sae = api.load_sae("runs/clip")                       # a training workdir (or an imported one)
    cm = api.concept_metrics(sae, image, text)            # image, text: [N, d] matched pairs
    removal = api.fit_removal(sae, cm.attribution)        # paper Eq. 8-10
    api.recall(removal(queries), removal(candidates), positives)

Every function takes NumPy (or JAX) arrays and returns NumPy arrays; nothing here reads or writes
files except `load_sae`. The stages (`python -m experiments.analyze / retrieve`) call the same code,
so these functions reproduce `analysis/concepts.npz`, `table1.json` and `retrieval/results.json`.

Public names: `load_sae`, `LoadedSAE`, `SparseCodes`, `encode`, `concept_metrics`, `ConceptMetrics`,
`table1`, `REMOVAL_BY`, `negatives`, `removal_scores`, `fit_removal`, `fit_abtt`, `fit_whitening`,
`Projector`, `positives_csr`, `recall`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import chex
import numpy as np

from sae_jax import metrics, projectors, removal, retrieval
from sae_jax.block_encoder import BlockEncoder, encode_rows
from sae_jax.errors import SaeJaxError
from sae_jax.metrics import ConceptMetrics
from sae_jax.projectors import Projector
from sae_jax.workdir import LoadedSAE, load_sae

__all__ = [
  "load_sae",
  "LoadedSAE",
  "SparseCodes",
  "encode",
  "concept_metrics",
  "ConceptMetrics",
  "table1",
  "REMOVAL_BY",
  "negatives",
  "removal_scores",
  "fit_removal",
  "fit_abtt",
  "fit_whitening",
  "Projector",
  "positives_csr",
  "recall",
]

REMOVAL_BY = removal.RULES
DEFAULT_BATCH = 4096  # rows encoded per compiled block


class SparseCodes(NamedTuple):
  """Top-K codes of N rows: `values` float32 [N, k] (>= 0), `indices` int32 [N, k] (concept ids)."""

  values: np.ndarray
  indices: np.ndarray

  def dense(self, c: int) -> np.ndarray:
    """The codes as a dense float32 [N, c] matrix (small N only: N * c floats)."""
    out = np.zeros((self.values.shape[0], int(c)), np.float32)
    np.put_along_axis(out, self.indices.astype(np.int64), self.values, axis=1)
    return out


def _rows(name: str, x: Any, d: int) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[1] != d:
    raise SaeJaxError(f"{name}: expected float rows [N, {d}] (the SAE's width), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise SaeJaxError(f"{name}: holds NaN or Inf; the embeddings must be finite")
  return x


def encode(sae: LoadedSAE, x: Any, batch_size: int = DEFAULT_BATCH) -> SparseCodes:
  """Sparse codes of embeddings x [N, d] (float32) under the SAE (paper Eq. 1).

  Z = TopK(ReLU((x - b_dec) W_enc + b_enc)) with b_dec subtracted only under the `modern` preset's
  pre-bias; returns the k kept entries per row, largest first. Encoded in blocks of `batch_size`
  rows, so N is unbounded.
  """
  x = _rows("x", x, sae.spec.d)
  values, indices = encode_rows(sae.params, sae.spec, x, batch_size)
  chex.assert_shape([values, indices], (x.shape[0], sae.spec.k))
  return SparseCodes(np.asarray(values, np.float32), np.asarray(indices, np.int32))


def concept_metrics(
  sae: LoadedSAE, image: Any, text: Any, *, reverse_modality: bool = False, batch_size: int = DEFAULT_BATCH
) -> ConceptMetrics:
  """Per-concept metrics [c] (float64) of matched pairs: row i of `image` [N, d] and of `text` [N, d]
  (float32) embed the same sample.

  energy           Eq. 3: E[z_i] over image and text rows together ((E_ι + E_τ) / 2)
  modality_score   Eq. 4: E_τ[z_i] / (E_ι[z_i] + E_τ[z_i]); NaN for concepts that never fire
                   (`n_silent`); 1 = text-only, or image-only with `reverse_modality`
  bridge_diag      Eq. 5, the diagonal of B = E_pairs[z_ι z_τᵀ] ⊙ D Dᵀ (B_ii = E[z_ι,i z_τ,i]);
                   `bridge_row`, `bridge_col`, `bridge_score(reduction)` the other reductions
  attribution      Eq. 6: E_pairs[z_ι,i (M z_τ)_i + z_τ,i (M z_ι)_i] with M = D Dᵀ, computed
                   through (M z)_i = <d_i, x̂> (x̂ = z D, no decoder bias), never forming M
  fire_rate_*, energy_image / energy_text, mean_pair_dot, n_pairs: the sums behind them.

  The same numbers as the analysis stage's `concepts.npz` for the same pairs.
  """
  d = sae.spec.d
  image, text = _rows("image", image, d), _rows("text", text, d)
  if image.shape[0] != text.shape[0] or image.shape[0] == 0:
    raise SaeJaxError(
      f"image {image.shape} and text {text.shape}: expected the same N >= 1 rows (matched pairs)"
    )
  D = np.asarray(sae.params["D"], np.float32)
  n = image.shape[0]
  acc = metrics.ConceptAccumulator(D, block_size=batch_size)
  enc = BlockEncoder(sae.params, sae.spec, min(batch_size, n))  # one compilation for every block
  for s in range(0, n, batch_size):
    acc.update(enc(image[s : s + batch_size]), enc(text[s : s + batch_size]))
  return metrics.concept_metrics(acc.sums(), reverse_modality=reverse_modality)


def table1(cm: ConceptMetrics, fraction: float = 0.01, bridge_reduction: str = "diag") -> dict:
  """Paper Table 1 (Eq. 7) for one SAE: Jaccard similarities of the top-`fraction` concept sets by
  energy (S_E), attribution (S_A) and bridge score (S_B, `bridge_reduction` of Eq. 5), and their
  triple overlap |S_E ∩ S_A ∩ S_B| / |S_E ∪ S_A ∪ S_B|. A set holds ceil(fraction · c) concepts
  (at least 1), ties to the lower index. Returns {"c", "set_size", "J(S_E,S_A)", "J(S_E,S_B)",
  "J(S_A,S_B)", "triple_overlap", ...} as the analysis stage's `table1.json` row."""
  return metrics.table1(cm.energy, cm.attribution, cm.bridge_score(bridge_reduction), fraction)


def negatives(
  sae: LoadedSAE,
  image: Any,
  text: Any,
  draws: int = removal.DEFAULT_DRAWS,
  seed: int = 0,
  batch_size: int = DEFAULT_BATCH,
) -> np.ndarray:
  """A⁻ [c] (float64): Eq. 6 over unmatched pairs, (image n, text π(n)) for `draws` seeded
  derangements π of the N matched pairs, averaged: what each concept adds to the similarity of
  pairs that do NOT match. The same numbers as the retrieval stage's `negatives` rule."""
  d = sae.spec.d
  image, text = _rows("image", image, d), _rows("text", text, d)
  if image.shape[0] != text.shape[0] or image.shape[0] < 2:
    raise SaeJaxError(
      f"image {image.shape} and text {text.shape}: expected the same N >= 2 rows (matched pairs)"
    )
  code_i = encode_rows(sae.params, sae.spec, image, batch_size)
  code_t = encode_rows(sae.params, sae.spec, text, batch_size)
  return removal.negatives_attribution(np.asarray(sae.params["D"], np.float32), code_i, code_t, draws, seed)


def removal_scores(
  cm: ConceptMetrics, by: str = "attribution", negatives: Optional[Any] = None
) -> np.ndarray:
  """The per-concept score [c] (float64) a removal rule ranks the concepts by: "attribution" A⁺ (the
  paper, Eq. 6), "energy" (Eq. 3), "abs_attribution" (|A⁺|), "negatives" A⁻ (`negatives(...)` of the
  same pairs, passed in) or "margin" 2A⁻ − A⁺ (high for concepts that lift unmatched pairs about as
  much as matched ones; README, equation table)."""
  if by not in REMOVAL_BY:
    raise SaeJaxError(f"removal_scores: by={by!r}, expected one of {REMOVAL_BY}")
  if by in removal.UNMATCHED_RULES and negatives is None:
    raise SaeJaxError(f'removal_scores: by="{by}" needs negatives=api.negatives(sae, image, text)')
  return removal.rule_scores(cm.attribution, cm.energy, negatives)[by]


def fit_abtt(embeddings: Any, n_components: int) -> Projector:
  """All-but-the-top (Mu & Viswanath, 2018), the stages' `+abtt` baseline for one side: rows are
  L2-normalised, centred on their mean, and the top `n_components` principal directions removed;
  0 centres only (`+center`). Fit one per side (queries, candidates) on that side's rows."""
  return projectors.fit_abtt(np.asarray(embeddings, np.float32), int(n_components))


def fit_removal(sae: LoadedSAE, scores: Any, fraction: float = 0.01, rank: Optional[int] = None) -> Projector:
  """The removal projector of paper Eq. 8-10, from the SAE dictionary D [c, d].

  D_R = the rows of the top ceil(fraction · c) concepts by `scores` [c] (e.g. `cm.attribution` or
  `removal_scores(cm, "margin", negatives)`); D_R = U Σ Vᵀ (Eq. 8); the projector maps h [N, d] to
  normalise(h − V_r V_rᵀ h) (Eq. 9-10), float32, unit rows. `rank` r defaults to every selected
  atom, min(m, d); directions of numerically zero singular values are not removed
  (`projector.info["rank"]` is the rank used). Apply it with `projector(h)`; `projector.save(path)`
  / `Projector.load(path)` store it.
  """
  D = np.asarray(sae.params["D"], np.float32)
  scores = np.asarray(scores, np.float64)
  if scores.shape != (D.shape[0],):
    raise SaeJaxError(f"scores: expected one per concept, shape ({D.shape[0]},), got {scores.shape}")
  m = metrics.top_fraction_size(fraction, D.shape[0], "fraction")
  return projectors.fit_removal(D, scores, min(m, D.shape[1]) if rank is None else int(rank), fraction)


def fit_whitening(
  queries: Any, candidates: Optional[Any] = None, alpha: float = 0.1, mode: str = "realign"
) -> tuple[Projector, Projector]:
  """The whitening baseline (not in the paper): shrinkage whitening W = Σ̂^(−1/2) with
  Σ̂ = (1 − α) Σ + α tr(Σ)/d · I. Returns (query projector, candidate projector), each mapping
  rows [N, d] to normalise((h − μ) W) in float32.

  mode "realign" (the stages' default): one whitening per side, each fitted on that side's
  L2-normalised rows with its own mean (which also removes the offset between the modalities) and
  W = (Σ̂ + 1e-5 · I)^(−1/2); transductive, fitted on the rows it is applied to.
  mode "joint": one whitening fitted on queries and candidates together, the same for both sides.
  """
  q = np.asarray(queries, np.float32)
  c = q if candidates is None else np.asarray(candidates, np.float32)
  if mode == "realign":
    return projectors.fit_realign(q, c, alpha)
  if mode == "joint":
    wp = projectors.fit_whitening(q if candidates is None else np.concatenate([q, c]), alpha)
    return wp, wp
  raise SaeJaxError(f'fit_whitening: mode={mode!r}, expected "realign" or "joint"')


def positives_csr(positives: Sequence[Sequence[int]], n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
  """CSR of positive candidate ids per query: (indptr int64 [Nq + 1], indices int64 [P])."""
  lists = [np.asarray(p, np.int64).reshape(-1) for p in positives]
  indptr = np.concatenate([[0], np.cumsum([p.size for p in lists])]).astype(np.int64)
  indices = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= n_candidates):
    raise SaeJaxError(
      f"positives: candidate ids must lie in [0, {n_candidates}), got {indices.min()}..{indices.max()}"
    )
  return indptr, indices


def recall(
  queries: Any,
  candidates: Any,
  positives: Sequence[Sequence[int]],
  ks: Sequence[int] = (1, 5, 10),
  exclude: Optional[Any] = None,
) -> dict:
  """Recall@K in percent of exact cosine search: queries [Nq, d], candidates [Nc, d] (float32, any
  norm: rows are L2-normalised), `positives[i]` the candidate ids that count as hits for query i
  (at least one each). A query scores 1 at K when any positive is among its K nearest candidates
  (ties to the lower candidate id); `exclude` [Nq] (int, -1 = none) drops one candidate per query
  (CIRR's own reference image). Returns {"R@1": ..., "R@5": ..., "R@10": ...} (float, percent).
  """
  queries = np.asarray(queries, np.float32)
  candidates = np.asarray(candidates, np.float32)
  if len(positives) != queries.shape[0]:
    raise SaeJaxError(f"positives: expected one list per query ({queries.shape[0]}), got {len(positives)}")
  indptr, indices = positives_csr(positives, candidates.shape[0])
  rec, _ = retrieval.evaluate(
    queries, candidates, indptr, indices, ks=tuple(int(k) for k in ks), exclude=exclude
  )
  return rec
