"""Uncertainty of retrieval figures: bootstrap intervals over queries and chance levels.

Pure NumPy (no I/O). Every Recall@K of a study is a mean of per-query hits, so its sampling noise is
estimated by resampling the queries with replacement (the percentile bootstrap). A change between
two variants scored on the same queries (base -> removal, base -> whitening) is resampled *paired*:
each draw takes the same queries for both, so the interval is that of the per-query difference,
much narrower than two independent intervals would suggest.

Inputs are first-hit ranks as `sae_jax.retrieval.first_hit_rank` returns them: the 0-based rank of
a query's best-ranked positive, and any value >= K (its list length) for a miss. A query hits at K
when its rank is < K.

`chance_recall` gives the Recall@K of a random ranking, so a report can tell a model at chance from
one that retrieves: a model is "above chance" only where its interval's lower end exceeds it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import special

from sae_jax.errors import SaeJaxError

DEFAULT_N_BOOT = 1000
DEFAULT_LEVEL = 0.95
_DRAW_CHUNK = 100  # resamples per chunk: bounds memory at 100 x n_queries counts


def _ci_key(key: str, level: float) -> str:
  return f"{key}_ci{int(round(100 * level))}"


def _check_ranks(name: str, ranks) -> np.ndarray:
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.size == 0:
    raise SaeJaxError(f"{name}: expected a non-empty 1-D array of first-hit ranks, got shape {ranks.shape}")
  return ranks


def _check_level(level: float) -> None:
  if not 0.0 < level < 1.0:
    raise SaeJaxError(f"bootstrap level must be in (0, 1), got {level}")


def bootstrap_draws(n: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> np.ndarray:
  """int64 [n_boot, n]: row b holds the n query indices (with replacement) of resample b."""
  if n < 1 or n_boot < 1:
    raise SaeJaxError(f"bootstrap needs n >= 1 queries and n_boot >= 1 resamples, got n={n}, n_boot={n_boot}")
  return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def recall_hits(first_hit_rank, ks: Sequence[int] = (1, 5, 10)) -> np.ndarray:
  """float64 [Q, len(ks)]: 1 where the query's first positive ranks inside the top K."""
  ranks = _check_ranks("first_hit_rank", first_hit_rank)
  return (ranks[:, None] < np.asarray(ks)[None, :]).astype(np.float64)


def resampled_means(values, draws: np.ndarray) -> np.ndarray:
  """float64 [n_boot, m]: the column means of `values` [Q, m] over each resample of `draws`.

  Computed from per-resample counts (a [chunk, Q] @ [Q, m] product) rather than by gathering
  [n_boot, Q, m] rows.
  """
  values = np.asarray(values, np.float64)
  if values.ndim == 1:
    values = values[:, None]
  n = values.shape[0]
  if draws.ndim != 2 or draws.shape[1] != n:
    raise SaeJaxError(f"bootstrap draws must be [n_boot, {n}] query indices, got shape {draws.shape}")
  out = np.empty((draws.shape[0], values.shape[1]))
  for start in range(0, draws.shape[0], _DRAW_CHUNK):
    chunk = draws[start : start + _DRAW_CHUNK]
    counts = np.zeros((chunk.shape[0], n))
    np.add.at(counts, (np.arange(chunk.shape[0])[:, None], chunk), 1.0)
    out[start : start + chunk.shape[0]] = counts @ values / n
  return out


def percentile_interval(samples, level: float = DEFAULT_LEVEL) -> np.ndarray:
  """[..., 2]: the (1 - level)/2 and (1 + level)/2 percentiles of `samples` along axis 0."""
  _check_level(level)
  tail = 100.0 * (1.0 - level) / 2.0
  return np.moveaxis(np.percentile(np.asarray(samples), [tail, 100.0 - tail], axis=0), 0, -1)


def _means_with_ci(per_query: np.ndarray, ks, n_boot, seed, level, draws) -> dict:
  """{"R@K": mean in percent, "R@K_ci95": bootstrap interval} of per-query columns [Q, len(ks)]."""
  draws = bootstrap_draws(per_query.shape[0], n_boot, seed) if draws is None else draws
  ci = percentile_interval(100.0 * resampled_means(per_query, draws), level)
  out = {}
  for j, kk in enumerate(ks):
    out[f"R@{kk}"] = float(100.0 * per_query[:, j].mean())
    out[_ci_key(f"R@{kk}", level)] = [float(ci[j, 0]), float(ci[j, 1])]
  return out


def recall_with_ci(
  first_hit_rank,
  ks: Sequence[int] = (1, 5, 10),
  n_boot: int = DEFAULT_N_BOOT,
  seed: int = 0,
  level: float = DEFAULT_LEVEL,
  draws: Optional[np.ndarray] = None,
) -> dict:
  """Recall@K in percent with its percentile-bootstrap interval over queries.

  Returns {"R@1": 37.2, "R@1_ci95": [34.9, 39.6], ...}. `draws` (from `bootstrap_draws`) fixes the
  resamples, e.g. to score several variants on the same ones.
  """
  return _means_with_ci(recall_hits(first_hit_rank, ks), ks, n_boot, seed, level, draws)


def paired_recall_delta(
  rank_a,
  rank_b,
  ks: Sequence[int] = (1, 5, 10),
  n_boot: int = DEFAULT_N_BOOT,
  seed: int = 0,
  level: float = DEFAULT_LEVEL,
  draws: Optional[np.ndarray] = None,
) -> dict:
  """The change a -> b of Recall@K, in percentage points, with a paired bootstrap interval.

  Both variants must be scored on the same queries in the same order. Returns
  {"R@1": b - a, "R@1_ci95": [lo, hi], ...}.
  """
  a = _check_ranks("rank_a", rank_a)
  b = _check_ranks("rank_b", rank_b)
  if a.shape != b.shape:
    raise SaeJaxError(
      f"paired bootstrap needs both variants on the same queries, got {a.shape} and {b.shape}"
    )
  return _means_with_ci(recall_hits(b, ks) - recall_hits(a, ks), ks, n_boot, seed, level, draws)


def excludes_zero(ci: Sequence[float]) -> bool:
  """True when the interval [lo, hi] lies wholly on one side of zero."""
  lo, hi = float(ci[0]), float(ci[1])
  return lo > 0.0 or hi < 0.0


def chance_recall(n_positives, n_candidates: int, ks: Sequence[int] = (1, 5, 10)) -> dict:
  """Recall@K in percent of a uniformly random ranking, averaged over queries.

  A query with p positives among n candidates misses the top K with probability
  C(n - p, K) / C(n, K). `n_positives`: int [Q] (or one int for every query).
  """
  p = np.atleast_1d(np.asarray(n_positives, np.float64))
  if n_candidates < 1 or np.any(p < 0) or np.any(p > n_candidates):
    raise SaeJaxError(
      f"chance_recall: need 0 <= positives <= candidates = {n_candidates}, got {p.min()}..{p.max()}"
    )
  out = {}
  for kk in ks:
    kk_eff = min(int(kk), n_candidates)
    # log C(n-p, K) - log C(n, K) through log-gamma, stable for pools of millions.
    log_miss = (
      special.gammaln(n_candidates - p + 1)
      - special.gammaln(np.maximum(n_candidates - p - kk_eff + 1, 1.0))
      - special.gammaln(n_candidates + 1)
      + special.gammaln(n_candidates - kk_eff + 1)
    )
    miss = np.where(n_candidates - p >= kk_eff, np.exp(log_miss), 0.0)
    out[f"R@{kk}"] = float(100.0 * np.mean(1.0 - miss))
  return out
