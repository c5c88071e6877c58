"""Which concepts the removal (paper Eq. 8-10) takes out, and how its settings are chosen.

Rules (`retrieval.removal_by`): each ranks the c concepts of an SAE by one score [c]; the removal
takes the top `fraction` of them and removes the top-r right singular vectors of their atoms.

  attribution      A⁺_i = E_matched[z_ι,i <d_i, x̂_τ> + z_τ,i <d_i, x̂_ι>]          (paper Eq. 6)
  energy           E_i = (E[z_ι,i] + E[z_τ,i]) / 2                                  (paper Eq. 3)
  abs_attribution  |A⁺_i|
  negatives        A⁻_i = the same sum over unmatched (image n, text π(n)) pairs, π a seeded
                   derangement, averaged over `draws` of them
  margin           A⁻_i − (A⁺_i − A⁻_i) = 2 A⁻_i − A⁺_i

Why `margin`: a concept that is large in matched pairs is not thereby a distractor (content concepts
are large there too). A distractor lifts the similarity of unmatched pairs about as much as that of
matched ones (A⁺ − A⁻ ≈ 0, A⁻ large); a content concept lifts matched pairs far more (A⁺ − A⁻ ≫ A⁻).
The margin rewards the first and penalises the second by exactly what removing it costs the
matched-over-unmatched gap. Forms compared on planted worlds (benchmarks/README.md): this
difference, the ratio A⁻ / (|A⁺ − A⁻| + ε) and A⁻² / A⁺; the ratio ranks rare concepts with
A⁺ ≈ A⁻ ≈ 0 first and A⁻² / A⁺ blows up where A⁺ crosses zero, the difference does neither.

Selection (`select_removal`, `select_abtt`): every candidate setting is scored by R@1 on a
validation split that the caller keeps image-disjoint from the scored split. `how="best"` takes the
highest R@1 (ties to the earlier candidate); `how="one_se"` (the one-standard-error rule of Breiman et
al.) takes the candidate that removes the least (rank, then fraction) among those within one binomial
standard error, 100·sqrt(p(1−p)/n), of the best: validation R@1 differences smaller than that are
noise, and removing fewer directions keeps more content.

The projectors themselves (the removal's SVD, all-but-the-top, whitening, centring) are
`sae_jax.projectors`. Pure array code: no I/O; the stage that reads workdirs is
`sae_jax.stages.retrieve`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import numpy as np

from sae_jax import metrics, projectors
from sae_jax.errors import SaeJaxError

RULES = ("attribution", "energy", "abs_attribution", "negatives", "margin")
UNMATCHED_RULES = ("negatives", "margin")  # rules that need unmatched pairs
DEFAULT_DRAWS = 4


def _check_rule(rule: str, field: str = "config.retrieval.removal_by") -> str:
  if rule not in RULES:
    raise SaeJaxError(f"{field}: {rule!r} is not one of {RULES}")
  return rule


# --------------------------------------------------------------------------------------------
# Unmatched pairs and the per-concept scores.
# --------------------------------------------------------------------------------------------


def derangement(n: int, seed: int) -> np.ndarray:
  """A seeded permutation π of range(n) with π(j) != j for every j (n >= 2): a random order
  shifted by a random nonzero offset, so every row is paired with another row."""
  if n < 2:
    raise SaeJaxError(f"unmatched pairs need at least 2 matched pairs, got {n}")
  rng = np.random.default_rng([int(seed), 21])
  order = rng.permutation(n)
  shift = int(rng.integers(1, n))
  perm = np.empty(n, np.int64)
  perm[order] = order[(np.arange(n) + shift) % n]
  return perm


def unmatched_permutations(n: int, draws: int = DEFAULT_DRAWS, seed: int = 0) -> np.ndarray:
  """[draws, n] int64: row j pairs image n with text perm[j, n] (a derangement, seeded by (seed, j))."""
  if int(draws) < 1:
    raise SaeJaxError(f"config.retrieval.negatives_draws={draws}: expected a positive integer")
  return np.stack([derangement(n, int(seed) * 1000 + j) for j in range(int(draws))])


def _take(code: tuple, rows: np.ndarray) -> tuple:
  return tuple(np.asarray(x)[rows] for x in code)


def negatives_attribution(
  dictionary: Any, code_image: tuple, code_text: tuple, draws: int = DEFAULT_DRAWS, seed: int = 0
) -> np.ndarray:
  """A⁻ [c] float64: Eq. 6 over unmatched pairs (image n, text π_j(n)), averaged over `draws`
  seeded derangements π_j. Codes are sparse (values [N, k], indices [N, k]) as `sae.encode` gives."""
  n = np.shape(code_image[0])[0]
  perms = unmatched_permutations(n, draws, seed)
  total = None
  for perm in perms:
    cm = metrics.compute_concept_metrics(dictionary, code_image, _take(code_text, perm))
    total = cm.attribution if total is None else total + cm.attribution
  return np.asarray(total / perms.shape[0], np.float64)


def margin_score(attribution: Any, negatives: Any) -> np.ndarray:
  """margin_i = A⁻_i − (A⁺_i − A⁻_i): what concept i adds to unmatched pairs minus what it adds to
  matched pairs over unmatched ones (see the module docstring for the forms compared)."""
  a = np.asarray(attribution, np.float64)
  n = np.asarray(negatives, np.float64)
  chex.assert_equal_shape([a, n])
  return 2.0 * n - a


def rule_scores(attribution: Any, energy: Optional[Any] = None, negatives: Optional[Any] = None) -> dict:
  """{rule: [c] float64} for every rule of `RULES` the inputs allow (`energy` needs the energies,
  the unmatched rules the A⁻ of `negatives_attribution`)."""
  a = np.asarray(attribution, np.float64)
  out = {"attribution": a, "abs_attribution": np.abs(a)}
  for name, x in (("energy", energy), ("negatives", negatives)):
    if x is not None and np.shape(x) != a.shape:
      raise SaeJaxError(f"{name}: expected one score per concept {a.shape}, got {np.shape(x)}")
  if energy is not None:
    out["energy"] = np.asarray(energy, np.float64)
  if negatives is not None:
    out["negatives"] = np.asarray(negatives, np.float64)
    out["margin"] = margin_score(a, out["negatives"])
  return out


def concept_scores(
  dictionary: Any, code_image: tuple, code_text: tuple, draws: int = DEFAULT_DRAWS, seed: int = 0
) -> tuple[dict, metrics.ConceptMetrics]:
  """({rule: [c]} for every rule of `RULES`, the matched pairs' ConceptMetrics) from sparse codes."""
  cm = metrics.compute_concept_metrics(dictionary, code_image, code_text)
  neg = negatives_attribution(dictionary, code_image, code_text, draws, seed)
  return rule_scores(cm.attribution, cm.energy, neg), cm


# --------------------------------------------------------------------------------------------
# Selection on a validation split.
# --------------------------------------------------------------------------------------------


class Candidate(NamedTuple):
  rule: str
  fraction: float
  rank: int  # requested; the projector's info["rank"] is the rank used


class Selection(NamedTuple):
  """The chosen setting, its projector, and every candidate's validation R@1 (in grid order)."""

  chosen: Any
  projector: Any
  table: list  # [{"rule"/"fraction"/"rank" or "n_components", "rank_used", "R@1"}]


def removal_grid(
  rules: Sequence[str], fractions: Sequence[float], ranks: Sequence[int], c: int, d: int
) -> list[Candidate]:
  """Every (rule, fraction, rank) with rank <= min(atoms selected, d); a rank of -1 means all of them.
  Ordered by rule as given, fraction and rank ascending (ties go to the least removed)."""
  out = []
  for rule in rules:
    _check_rule(rule, "config.retrieval.removal_by / removal_compare")
    for f in sorted({float(x) for x in fractions}):
      full = min(metrics.top_fraction_size(f, c, "config.retrieval.select_fractions"), d)
      rs = sorted({full if int(r) == -1 else int(r) for r in ranks} & set(range(1, full + 1)))
      out += [Candidate(rule, f, r) for r in rs]
  if not out:
    raise SaeJaxError(
      f"removal selection: no candidate (rules {tuple(rules)}, fractions {tuple(fractions)}, ranks {tuple(ranks)})"
    )
  return out


SELECT_HOW = ("best", "one_se")


def _best(r1: list[float]) -> int:
  """Index of the highest R@1, the earliest on ties."""
  return int(np.argmax(np.asarray(r1)))


def one_se_pick(r1: Sequence[float], cost: Sequence[tuple], n_queries: int) -> int:
  """Index of the lowest-`cost` candidate (earliest on ties) whose R@1 (percent) is within one
  binomial standard error of the best R@1 over `n_queries` validation queries."""
  r = np.asarray(r1, np.float64)
  if int(n_queries) < 1:
    raise SaeJaxError(f"one-standard-error rule: n_queries={n_queries}, expected >= 1")
  p = r.max() / 100.0
  se = 100.0 * np.sqrt(p * (1.0 - p) / int(n_queries))
  ok = [i for i in range(r.size) if r[i] >= r.max() - se]
  return min(ok, key=lambda i: (tuple(cost[i]), i))


def _pick(r1: list[float], cost: list[tuple], how: str, n_queries: int) -> int:
  if how not in SELECT_HOW:
    raise SaeJaxError(f"config.retrieval.select_how={how!r}: expected one of {SELECT_HOW}")
  return _best(r1) if how == "best" else one_se_pick(r1, cost, n_queries)


def select_removal(
  dictionary: Any,
  scores: dict,
  grid: Sequence[Candidate],
  validation_r1: Callable[[Optional[projectors.Projector]], float],
  how: str = "one_se",
  n_queries: int = 0,
) -> Selection:
  """The grid's candidate chosen (`how`, see the module docstring) by `validation_r1(projector)`
  (R@1 of the validation split, `n_queries` queries, under that removal). `scores` is {rule: [c]}.
  Only the validation split is looked at."""
  D = np.asarray(dictionary, np.float32)
  table, projs, widest = [], [], {}
  for cand in grid:
    if cand.rule not in scores:
      raise SaeJaxError(f"removal selection: no {cand.rule!r} scores (have {sorted(scores)})")
    key = (cand.rule, cand.fraction)
    if key not in widest:  # one SVD per (rule, fraction): a lower rank keeps its leading directions
      top = max(g.rank for g in grid if (g.rule, g.fraction) == key)
      widest[key] = projectors.fit_removal(D, scores[cand.rule], top, cand.fraction)
    proj = projectors.leading_removal(widest[key], cand.rank)
    projs.append(proj)
    table.append(
      {
        "rule": cand.rule,
        "fraction": cand.fraction,
        "rank": cand.rank,
        "rank_used": int(proj.info["rank"]),
        "R@1": float(validation_r1(proj)),
      }
    )
  cost = [(t["rank_used"], t["fraction"]) for t in table]
  i = _pick([t["R@1"] for t in table], cost, how, n_queries)
  return Selection(grid[i], projs[i], table)


def select_abtt(
  components: Sequence[int], validation_r1: Callable[[int], float], how: str = "one_se", n_queries: int = 0
) -> tuple[int, list]:
  """(the D of `components` chosen by `validation_r1(D)` as `select_removal` does, fewer directions
  being the lower cost; [{"n_components", "R@1"}])."""
  comps = sorted({int(x) for x in components})
  if not comps:
    raise SaeJaxError("config.retrieval.abtt_components: expected at least one D >= 0")
  table = [{"n_components": dd, "R@1": float(validation_r1(dd))} for dd in comps]
  return comps[_pick([t["R@1"] for t in table], [(dd,) for dd in comps], how, n_queries)], table


def validation_split(image_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(validation rows, scored rows) of pooled pairs, disjoint by image: a seeded `fraction` of the
  distinct image ids (at least one, and at least one left) goes to validation with all its rows."""
  ids = np.asarray(image_ids)
  if ids.ndim != 1 or ids.size == 0:
    raise SaeJaxError(f"validation split: expected image ids [N >= 1], got shape {ids.shape}")
  if not 0.0 < float(fraction) < 1.0:
    raise SaeJaxError(f"config.retrieval.validation_fraction={fraction}: expected a value in (0, 1)")
  uniq = np.unique(ids)
  if uniq.size < 2:
    raise SaeJaxError("validation split: the pairs show a single image; nothing is left to score")
  n_val = min(max(1, int(round(float(fraction) * uniq.size))), uniq.size - 1)
  rng = np.random.default_rng([int(seed), 22])
  val_ids = rng.choice(uniq, n_val, replace=False)
  is_val = np.isin(ids, val_ids)
  return np.flatnonzero(is_val), np.flatnonzero(~is_val)


def subspace_overlap(basis: Any, truth: Any) -> float:
  """Mean squared projection of the columns of `basis` [d, r] (orthonormal) onto span(`truth` [m, d]):
  1 when every removed direction lies in the true span, 0 when all are orthogonal to it."""
  b = np.asarray(basis, np.float64)
  q, _ = np.linalg.qr(np.asarray(truth, np.float64).T)
  if b.shape[1] == 0:
    return float("nan")
  return float(np.mean(np.sum((q.T @ b) ** 2, axis=0)))
