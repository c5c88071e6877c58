"""Removal rules x planted worlds: Recall@1 (bootstrap 95% intervals over queries) of image->text
retrieval under each rule of `retrieval.removal_by`, the setting chosen on the validation split
(`retrieval.select_on="validation"`), the baselines, and the oracle (the planted distractor span).

Not a speed benchmark: the study of issue 21. For each world, an SAE is trained on the planted
source (the test suite's small modern SAE, 300 steps), then the retrieval stage runs on separate
evaluation pairs, the removal fitted and the settings chosen on the fit pairs. One JSON line per
world: R@1, its interval, the paired change vs base with its interval, and for each removal the mean
squared projection of its directions on the planted distractor span (`overlap`), plus the chosen
setting and the share of the oracle gain it recovers.

  python -m benchmarks.removal_rules                       # the two worlds of benchmarks/README.md
  python -m benchmarks.removal_rules --worlds=default_s0 --workdir=/tmp/removal-rules
  python -m benchmarks.removal_rules --forms      # R@1 / overlap of each candidate form of `margin`
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from configs import synthetic
from sae_jax import projectors, removal, retrieval_tasks
from sae_jax import workdir as workdir_lib
from sae_jax.block_encoder import encode_rows
from sae_jax.data import synthetic as planted
from sae_jax.stages import retrieve
from sae_jax.training import trainer

WORLDS = {
  # The project's planted world (4 distractors firing in 90% of rows at 3x the content magnitude).
  "default_s0": dict(seed=0),
  # The world: 3 distractors firing in 95% of rows, another dictionary and draws.
  "d3p95_s1": dict(seed=1, n_distractor=3, distractor_prob=0.95),
  "default_s2": dict(seed=2),
}
RULES = ("attribution", "energy", "abs_attribution", "negatives", "margin")

_WORLDS = flags.DEFINE_list("worlds", ["default_s0", "d3p95_s1"], f"planted worlds, of {sorted(WORLDS)}")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/removal-rules", "where the SAEs and stage outputs go")
_PAIRS = flags.DEFINE_integer("pairs", 2000, "evaluation pairs (and fit/validation pairs)")
_FORMS = flags.DEFINE_bool(
  "forms", False, "instead: compare forms of the margin score (README equation table)"
)


def margin_forms(world: str, root: str, pairs: int) -> dict:
  """R@1 / overlap on the evaluation pairs of the removal by each candidate form of `margin` (and the
  negatives / attribution it is built from), top 1% and 2% of concepts at full rank."""
  config = _config(world)
  sae_dir = os.path.join(root, f"sae_{world}")
  if not os.path.exists(os.path.join(sae_dir, "checkpoints")):
    trainer.train_and_evaluate(config, sae_dir)
  sae = workdir_lib.load_sae(sae_dir)
  seed = int(config.retrieval.synthetic_seed)  # the stage's eval / fit pairs
  ev = planted.open_planted(config.data.synthetic, pairs, seed)
  fit = planted.open_planted(config.data.synthetic, pairs, seed + 1, with_truth=False)
  truth = ev.truth.distractors
  codes = [encode_rows(sae.params, sae.spec, x, 4096) for x in (fit.image, fit.text)]
  D = np.asarray(sae.params["D"], np.float32)
  scores, _ = removal.concept_scores(D, *codes)
  a, n = scores["attribution"], scores["negatives"]
  forms = {
    "attribution": a,
    "negatives": n,
    "margin 2A- - A+": scores["margin"],
    "ratio A-/(|A+ - A-| + eps)": n / (np.abs(a - n) + 1e-3 * np.mean(np.abs(n))),
    "A-^2 / A+": n * n / np.maximum(a, 1e-12),
  }
  task = retrieval_tasks.paired_task("image_to_text", ev.image, ev.text)
  r1 = lambda p: retrieve.evaluate_task(task if p is None else task.map(p.transform), (1,))["R@1"]
  out = {"world": world, "base": r1(None), "oracle": r1(projectors.subspace_projector(truth)), "forms": {}}
  for name, sc in forms.items():
    for f in (0.01, 0.02):
      m = min(int(np.ceil(f * D.shape[0])), D.shape[1])
      p = projectors.fit_removal(D, sc, m, f)
      out["forms"][f"{name} @{f:g}"] = [round(r1(p), 2), round(removal.subspace_overlap(p.basis, truth), 3)]
  return out


def _config(world: str):
  # The test suite's session SAE (tests/helpers/trained.py): tiny modern preset, 300 steps of 1024 rows.
  config = synthetic.get_config("tiny,modern")
  config.train.num_steps = config.train.checkpoint_every = config.train.log_every = 300
  config.train.tensorboard = config.train.async_checkpoint = False
  config.data.batch_size = 1024
  for key, value in WORLDS[world].items():
    setattr(config.data.synthetic, key, value)
  return config


def run_world(world: str, root: str, pairs: int) -> dict:
  sae_dir = os.path.join(root, f"sae_{world}")
  config = _config(world)
  if not os.path.exists(os.path.join(sae_dir, "checkpoints")):
    trainer.train_and_evaluate(config, sae_dir)
  r = config.retrieval
  r.sae_workdir, r.attribution, r.source = sae_dir, "sae", "synthetic"
  r.synthetic_pairs = r.synthetic_fit_pairs = int(pairs)
  r.tasks = ("image_to_text",)
  r.removal_by, r.removal_compare = RULES[0], RULES[1:]
  r.select_on = "validation"
  res = retrieve.run_retrieval(config, os.path.join(root, f"stage_{world}"))["image_to_text"]
  names = {
    "base": "mean",
    **{rule: "mean+removal" if rule == RULES[0] else f"mean+removal_by_{rule}" for rule in RULES},
    "selected": "mean+removal_selected",
    "whitening": "mean+whitening",
    "center": "mean+center",
    "abtt": "mean+abtt",
    "oracle": "mean+oracle_removal",
  }
  rows = {}
  for label, v in names.items():
    rec = res[v]
    s = rec["settings"]
    row = {"R@1": round(rec["R@1"], 2), "ci95": [round(x, 2) for x in rec["R@1_ci95"]]}
    if "delta_vs_base" in rec:
      d = rec["delta_vs_base"]
      row["delta"] = round(d["R@1"], 2)
      row["delta_ci95"] = [round(x, 2) for x in d["R@1_ci95"]]
    if "overlap_with_planted_distractors" in s:
      row["overlap"] = round(s["overlap_with_planted_distractors"], 3)
      row["fraction"], row["rank"] = s.get("removal_fraction"), s.get("removal_rank")
    rows[label] = row
  sel = res["mean+removal_selected"]["settings"]
  base, orc = res["mean"]["R@1"], res["mean+oracle_removal"]["R@1"]
  return {
    "world": world,
    "synthetic": {k: config.data.synthetic[k] for k in ("seed", "n_distractor", "distractor_prob")},
    "queries": res["mean"]["n_queries"],
    "rows": rows,
    "chosen": {
      "rule": sel["removal_by"],
      "fraction": sel["removal_fraction"],
      "rank": sel["removal_rank"],
      "overlap": round(sel["overlap_with_planted_distractors"], 3),
      "share_of_oracle_gain": round((res["mean+removal_selected"]["R@1"] - base) / (orc - base), 3),
      "abtt_components": res["mean+abtt"]["settings"]["abtt_components"],
    },
    "loadavg": [round(x, 2) for x in os.getloadavg()],
  }


def main(argv):
  del argv
  for world in _WORLDS.value:
    t = time.time()
    out = (margin_forms if _FORMS.value else run_world)(world, _WORKDIR.value, _PAIRS.value)
    out["seconds"] = round(time.time() - t, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  app.run(main)
