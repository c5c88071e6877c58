"""The report's findings: sentences generated from the numbers, stating only what exceeds its noise
(a Recall@1 difference only where the 95% bootstrap intervals say so, a model at chance compared
with nothing, no Table 1 reading of an SAE that does not reconstruct)."""

from __future__ import annotations

from typing import Optional

from sae_jax import uncertainty
from sae_jax.study.report import tables

TASK = "image_to_text"  # the task the findings read: the paper's MSCOCO image->text


def _ci_text(ci: Optional[list]) -> str:
  return "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _delta_text(rec: dict) -> str:
  """' (+1.20, paired 95% interval [0.40, 2.00])' from a variant's `delta_vs_base`, else ''."""
  d = rec.get("delta_vs_base", {})
  if tables.CI_KEY not in d:
    return ""
  verdict = "" if uncertainty.excludes_zero(d[tables.CI_KEY]) else ", no detectable change"
  return f" ({d['R@1']:+.2f}, paired 95% interval{_ci_text(d[tables.CI_KEY])}{verdict})"


def _retrieval_state(rec: dict) -> str:
  """'above' / 'chance' / 'unknown': whether R@1's interval lies above the chance R@1 of the task."""
  ci, chance = rec.get(tables.CI_KEY), rec.get("chance", {}).get("R@1")
  if ci is None or chance is None:
    return "unknown"
  return "above" if ci[0] > chance else "chance"


def _sae_failed(m: dict) -> Optional[str]:
  """Why the model's SAE cannot carry a Table 1 finding (held-out FVU >= 1), else None."""
  fvu = m["settings"].get("eval_fvu")
  if fvu is not None and fvu >= 1.0:
    return (
      f"its SAE's held-out FVU is {fvu:.2f} (>= 1: it reconstructs no better than the mean), so its "
      "concepts are not a description of the model"
    )
  return None


def _record(m: dict, suffix: str = "") -> Optional[dict]:
  """The model's TASK record of its base variant + `suffix` (e.g. "+removal"), None if not scored."""
  return m["retrieval"].get(TASK, {}).get(m["settings"]["base_variant"] + suffix)


def _retrieval_sentences(ms: dict, label: str) -> list:
  """Each model at chance; then each generative model against each contrastive one."""
  out = []
  states = {n: _retrieval_state(_record(ms[n])) for n in ms if _record(ms[n]) is not None}
  for n, state in states.items():
    r = _record(ms[n])
    if state == "chance":
      out.append(
        f"Retrieval ({ms[n]['label']}): R@1 {r['R@1']:.2f}{_ci_text(r.get(tables.CI_KEY))} on {label} is at chance "
        f"({r['chance']['R@1']:.2f}): the model's embedding does not retrieve, so it is compared with no "
        "other model (a model at chance is a failure of this study's model, not a result)."
      )
  gen = [n for n in states if ms[n]["kind"] == "generative"]
  con = [n for n in states if ms[n]["kind"] == "contrastive"]
  for g in gen:
    for c in con:
      a, b = _record(ms[g]), _record(ms[c])
      if "chance" in (states[g], states[c]):
        continue
      if "unknown" in (states[g], states[c]):
        out.append(
          f"Retrieval: {ms[g]['label']} R@1 {a['R@1']:.2f} vs {ms[c]['label']} {b['R@1']:.2f} on {label}; "
          "no interval or chance level recorded, so no difference is stated."
        )
        continue
      (alo, ahi), (blo, bhi) = a[tables.CI_KEY], b[tables.CI_KEY]
      if ahi < blo or bhi < alo:
        verdict = "worse than" if ahi < blo else "better than"
        ratio = f", {b['R@1'] / a['R@1']:.1f}x lower" if ahi < blo and a["R@1"] > 0 else ""
        out.append(
          f"Retrieval: the generative {ms[g]['label']} retrieves {verdict} the contrastive {ms[c]['label']} "
          f"on {label}: R@1 {a['R@1']:.2f}{_ci_text(a[tables.CI_KEY])} vs {b['R@1']:.2f}{_ci_text(b[tables.CI_KEY])}"
          f" (95% intervals do not overlap{ratio})."
        )
      else:
        out.append(
          f"Retrieval: no detectable difference between the generative {ms[g]['label']} and the contrastive "
          f"{ms[c]['label']} on {label}: R@1 {a['R@1']:.2f}{_ci_text(a[tables.CI_KEY])} vs "
          f"{b['R@1']:.2f}{_ci_text(b[tables.CI_KEY])} (the 95% intervals overlap)."
        )
  return out


def _energy_sentence(m: dict) -> str:
  """How concentrated the model's concept energy is, or why it is not interpreted."""
  e = m["energy"]
  why = _sae_failed(m)
  if why:
    return f"Energy and Table 1 ({m['label']}): not interpreted: {why}."
  return (
    f"Energy ({m['label']}): the top {100 * e['top_fraction']:g}% of concepts ({m['table1']['set_size']} of "
    f"{e['c']}) carry {100 * e['top_share']:.1f}% of the energy; {e['concepts_for_half']} concepts carry half "
    f"of it ({100 * e['concepts_for_half'] / e['c']:.1f}% of the dictionary)."
  )


def _removal_sentence(m: dict, label: str) -> Optional[str]:
  """What removing the top-attribution subspace does to R@1 (None without a removal variant)."""
  r, b = _record(m), _record(m, "+removal")
  if r is None or b is None:
    return None
  s = b["settings"]
  delta = b.get("delta_vs_base", {})
  w = _record(m, "+whitening")
  wt = f"; the whitening baseline gives {w['R@1']:.2f}{_delta_text(w)}" if w is not None else ""
  head = f"Removal ({m['label']}): removing the top-attribution subspace (rank {s.get('removal_rank')})"
  if tables.CI_KEY not in delta:
    return (
      f"{head}: {label} R@1 {r['R@1']:.2f} -> {b['R@1']:.2f}{wt}; no paired interval recorded, so no "
      "change is stated."
    )
  if uncertainty.excludes_zero(delta[tables.CI_KEY]):
    verb = "helps" if delta["R@1"] > 0 else "hurts"
    return (
      f"{head} {verb} {label} R@1: {r['R@1']:.2f} -> {b['R@1']:.2f} ({delta['R@1']:+.2f}, paired 95% "
      f"interval{_ci_text(delta[tables.CI_KEY])}){wt}."
    )
  return (
    f"{head}: no detectable change of {label} R@1: {r['R@1']:.2f} -> {b['R@1']:.2f} ({delta['R@1']:+.2f}, "
    f"paired 95% interval{_ci_text(delta[tables.CI_KEY])} includes 0){wt}."
  )


def _overlap_sentence(m: dict) -> str:
  """Table 1's Jaccards of the main SAE, how coarse they are, and their spread over the SAE seeds."""
  t = m["table1"]
  size = int(t["set_size"])
  coarse = (
    f" (sets of {size} concepts: a Jaccard moves in steps of {1 / (2 * size):.2f} or more)"
    if size < 21
    else ""
  )
  sd = m.get("table1_seeds")
  spread = (
    f"; over {sd['n']} SAE seeds (mean ± std): J(S_E,S_A) {sd['mean']['J(S_E,S_A)']:.2f} ± "
    f"{sd['std']['J(S_E,S_A)']:.2f}, J(S_E,S_B) {sd['mean']['J(S_E,S_B)']:.2f} ± {sd['std']['J(S_E,S_B)']:.2f}, "
    f"triple overlap {sd['mean']['triple_overlap']:.2f} ± {sd['std']['triple_overlap']:.2f}"
    if sd and sd["n"] > 1
    else ""
  )
  return (
    f"Overlap ({m['label']}): J(S_E,S_A) {t['J(S_E,S_A)']:.2f}, J(S_E,S_B) {t['J(S_E,S_B)']:.2f}, "
    f"triple overlap {t['triple_overlap']:.2f}{coarse}{spread}."
  )


def findings(data: dict) -> list:
  """Sentences stating what the numbers say, whichever way they come out, and only what exceeds its
  noise: a Recall@1 difference only where the 95% bootstrap intervals (over queries) say so, a model
  at chance compared with nothing, and no Table 1 reading of an SAE that does not reconstruct."""
  ms = data["models"]
  label = tables.task_label(TASK, data["dataset"])
  out = _retrieval_sentences(ms, label)
  out += [_energy_sentence(m) for m in ms.values()]
  out += [x for x in (_removal_sentence(m, label) for m in ms.values()) if x is not None]
  out += [_overlap_sentence(m) for m in ms.values() if not _sae_failed(m)]
  return out
