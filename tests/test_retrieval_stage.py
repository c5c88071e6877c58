"""The retrieval stage end to end: planted distractor removal, pooled inputs, written artefacts."""

import json
import os

import numpy as np
import pytest

from configs import base as base_cfg
from sae_jax import projectors, removal, retrieval_tasks
from sae_jax.data import synthetic
from sae_jax.errors import SaeJaxError
from sae_jax.stages import retrieval_inputs, retrieve
from tests.helpers.reference import recall_reference, topk_relu_codes


def _perfect_sae(src):
  """The planted dictionary itself as an SAE: W_enc = D^T, no biases."""
  D = src.dictionary.astype(np.float32)
  return {
    "W_enc": D.T.copy(),
    "b_enc": np.zeros(D.shape[0], np.float32),
    "D": D,
    "b_dec": np.zeros(D.shape[1], np.float32),
  }


def _dense_codes_and_dictionary(params, k, image, text):
  """Independent reference codes (dense Top-K of ReLU(x W_enc + b_enc); the params have no pre-bias)."""
  code = lambda x: topk_relu_codes(x.astype(np.float64) @ params["W_enc"] + params["b_enc"], k)
  return code(image), code(text), params["D"].astype(np.float64)


def _i2t_r1(src_pairs, fn=None):
  data = retrieval_tasks.paired_task("image_to_text", src_pairs.image, src_pairs.text)
  if fn is not None:
    data = data.map(fn)
  return retrieve.evaluate_task(data, (1, 5, 10))


def test_attribution_from_sae_matches_dense_reference():
  src = synthetic.PlantedSource(synthetic.default_synthetic_config())
  pairs = src.paired(300, seed=3)
  params = _perfect_sae(src)
  zi, zt, D = _dense_codes_and_dictionary(params, 11, pairs.image, pairs.text)
  M = D @ D.T
  a = retrieval_inputs.attribution_from_sae(params, 11, pairs.image, pairs.text, batch_size=128)
  np.testing.assert_allclose(a, np.mean(zi * (zt @ M) + zt * (zi @ M), axis=0), rtol=2e-4, atol=2e-4)
  # sum_i A_i = 2 mean_pairs <x_hat_image, x_hat_text> (reconstructions without decoder bias).
  assert a.sum() == pytest.approx(2 * np.mean(np.sum((zi @ D) * (zt @ D), axis=1)), rel=1e-4)


def test_planted_removal_raises_r1_and_reaches_oracle_gain():
  src = synthetic.PlantedSource(synthetic.default_synthetic_config())
  fit = src.paired(2000, seed=11)
  ev = src.paired(1500, seed=12)
  params = _perfect_sae(src)
  scores = retrieval_inputs.attribution_from_sae(params, 11, fit.image, fit.text)
  kinds = np.asarray(src.kinds)
  distractor = synthetic.KINDS.index("distractor")
  n_d = int(np.sum(kinds == distractor))
  frac = n_d / len(kinds)
  # The attribution ranks the planted distractors first.
  assert set(np.argsort(-scores)[:n_d]) == set(np.flatnonzero(kinds == distractor))
  removal = projectors.fit_removal(params["D"], scores, rank=n_d, fraction=frac)
  oracle = projectors.subspace_projector(src.dictionary[kinds == distractor])
  base = _i2t_r1(ev)["R@1"]
  rem = _i2t_r1(ev, removal.transform)["R@1"]
  orc = _i2t_r1(ev, oracle.transform)["R@1"]
  assert orc > base + 5, (base, orc)
  assert rem > base + 5, (base, rem)
  assert rem - base >= 0.9 * (orc - base), (base, rem, orc)
  # Removing random concepts instead does not help.
  rand = projectors.fit_removal(
    params["D"], np.random.default_rng(0).random(len(kinds)), rank=n_d, fraction=frac
  )
  assert _i2t_r1(ev, rand.transform)["R@1"] < base + 0.5 * (rem - base)


def _pooled(tmp, name, image, text, **extra):
  os.makedirs(tmp, exist_ok=True)
  np.savez(
    os.path.join(tmp, f"pooled_{name}.npz"),
    image=image,
    text=text,
    sample_ids=np.arange(image.shape[0]),
    **extra,
  )


def test_run_retrieval_on_pooled_files(tmp_path):
  rng = np.random.default_rng(0)
  src = synthetic.PlantedSource(synthetic.default_synthetic_config())
  pairs = src.paired(400, seed=5)
  act = tmp_path / "activations"
  # 2 captions per image in 'mean' (image_ids repeat): multi-positive image->text queries.
  img = np.repeat(pairs.image[:200], 2, axis=0)
  txt = np.concatenate([pairs.text[:200, None], pairs.text[200:400, None]], axis=1).reshape(400, -1)
  image_ids = np.repeat(np.arange(200), 2)
  # An explicit CIRR-like task with the query's reference image excluded.
  cq = pairs.image[:50] + 0.5 * pairs.text[:50]
  cirr = dict(
    image_text_to_image__queries=cq,
    image_text_to_image__candidates=pairs.image[:300],
    image_text_to_image__positives_indptr=np.arange(51),
    image_text_to_image__positives_indices=np.arange(50) + 100,
    image_text_to_image__exclude=np.arange(50),
  )
  _pooled(act, "mean", img, txt, image_ids=image_ids, **cirr)
  _pooled(act, "last_token", img + rng.normal(0, 2.0, img.shape).astype(np.float32), txt, image_ids=image_ids)
  _pooled(act, "mean_no_image", img, txt, image_ids=image_ids, **cirr)
  # Attribution from the analysis stage: distractors scored highest.
  kinds = np.asarray(src.kinds)
  attribution = np.where(kinds == synthetic.KINDS.index("distractor"), 10.0, rng.random(len(kinds)))
  os.makedirs(tmp_path / "analysis")
  np.savez(tmp_path / "analysis" / "concepts.npz", attribution=attribution, D=src.dictionary)

  config = base_cfg.get_config()
  r = config.retrieval
  r.source = "pooled"
  r.variants = ("mean", "last_token", "mean_no_image", "mean_no_prompt")
  r.tasks = ("image_to_text", "text_to_image", "image_text_to_image")
  r.removal_fraction = 0.04  # ceil(0.04 * 124) = 5 atoms
  r.removal_rank = 4
  r.sweep_ranks = (1, 2, 4, 8)
  r.save_embeddings = True
  results = retrieve.run_retrieval(config, str(tmp_path))
  out = tmp_path / "retrieval"
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert set(on_disk["image_to_text"]) == {
    "mean",
    "last_token",
    "mean_no_image",
    "mean+removal",
    "mean+whitening",
    "mean+center",
  }
  assert set(on_disk["image_text_to_image"]) == {
    "mean",
    "mean_no_image",
    "mean+removal",
    "mean+whitening",
    "mean+center",
  }
  i2t = on_disk["image_to_text"]["mean"]
  assert (i2t["n_queries"], i2t["n_candidates"]) == (200, 400)
  assert on_disk["text_to_image"]["mean"]["n_queries"] == 400
  s = on_disk["image_to_text"]["mean+removal"]["settings"]
  assert (s["removal_rank"], s["removal_fraction"], s["n_atoms"], s["transform"]) == (4, 0.04, 5, "removal")
  assert on_disk["image_text_to_image"]["mean"]["settings"]["exclude_reference"] is True
  assert on_disk["image_to_text"]["last_token"]["settings"]["pooling"] == "last_token"
  assert on_disk["image_to_text"]["mean_no_image"]["settings"]["mask"] == "no_image"
  # Every number can be recomputed from the saved embeddings with an independent reference.
  for task, by_var in on_disk.items():
    for variant, rec in by_var.items():
      with np.load(out / f"embeddings_{task}_{variant}.npz") as z:
        q, c = z["queries"], z["candidates"]
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
        ex = z["exclude"] if "exclude" in z.files else None
        ref = recall_reference(q @ c.T, z["positives_indptr"], z["positives_indices"], (1, 5, 10), ex)
      for k in ("R@1", "R@5", "R@10"):
        assert rec[k] == pytest.approx(ref[k]), (task, variant, k)
      # Each figure sits in its bootstrap interval; the base variant's transforms carry the paired change.
      for k in ("R@1", "R@5", "R@10"):
        assert rec[f"{k}_ci95"][0] <= rec[k] <= rec[f"{k}_ci95"][1], (task, variant, k)
      if variant.startswith("mean+"):
        assert rec["delta_vs_base"]["R@1"] == pytest.approx(rec["R@1"] - by_var["mean"]["R@1"])
      else:
        assert "delta_vs_base" not in rec
  # Each task's chance level: p positives among n candidates (CIRR: its excluded reference left out).
  assert i2t["chance"]["R@1"] == pytest.approx(100 * 2 / 400)
  assert i2t["chance"]["R@5"] == pytest.approx(
    100 * (1 - (398 * 397 * 396 * 395 * 394) / (400 * 399 * 398 * 397 * 396))
  )
  assert on_disk["text_to_image"]["mean"]["chance"]["R@5"] == pytest.approx(100 * 5 / 200)
  assert on_disk["image_text_to_image"]["mean"]["chance"]["R@1"] == pytest.approx(100 / 299)
  # Removal of the planted distractors helps; the noisy last-token variant is worse.
  assert on_disk["image_to_text"]["mean+removal"]["R@1"] > i2t["R@1"] + 5
  assert on_disk["image_to_text"]["last_token"]["R@1"] < i2t["R@1"]
  t2 = (out / "table2.md").read_text()
  assert "Removal" in t2 and f"{on_disk['image_to_text']['mean+removal']['R@1']:.2f}" in t2
  t3 = (out / "table3.md").read_text()
  assert "Last token" in t3 and f"{on_disk['image_to_text']['last_token']['R@10']:.2f}" in t3
  assert (out / "fig_masking.png").stat().st_size > 1000
  sweep = json.loads((out / "rank_sweep.json").read_text())
  assert sweep["ranks"] == [0, 1, 2, 4, 5]  # ranks above n_atoms=5 dropped, r=5 added
  assert sweep["metrics"]["R@1"][0] == pytest.approx(i2t["R@1"])
  assert sweep["metrics"]["R@1"][3] == pytest.approx(on_disk["image_to_text"]["mean+removal"]["R@1"])
  assert (out / "rank_sweep.png").exists()
  # The saved projector reproduces the scored removal embeddings.
  proj = projectors.Projector.load(str(out / "removal_projector.npz"))
  with np.load(out / "embeddings_image_to_text_mean+removal.npz") as z:
    q_rem = z["queries"]
  np.testing.assert_allclose(proj.transform(pairs.image[:200]), q_rem, atol=1e-5)


def test_pooled_missing_is_one_line(tmp_path):
  config = base_cfg.get_config()
  config.retrieval.source = "pooled"
  with pytest.raises(SaeJaxError) as e:
    retrieve.run_retrieval(config, str(tmp_path))
  assert "\n" not in str(e.value) and "pooled_<variant>.npz" in str(e.value)


def test_run_retrieval_synthetic_with_trained_sae(trained_sae, tmp_path):
  """The stage computes the attribution from the session's trained SAE (in another workdir)."""
  config = trained_sae.config()
  r = config.retrieval
  r.sae_workdir = trained_sae.workdir
  r.attribution = "sae"
  r.source = "synthetic"
  r.synthetic_pairs = 1500
  r.synthetic_fit_pairs = 2000
  # 1% of c=256 is 3 atoms, fewer than the 4 planted distractors: take ceil(0.015 * 256) = 4.
  r.removal_fraction = 0.015
  r.removal_rank = -1  # all selected atoms
  r.sweep_ranks = (1, 2, 4)
  r.tasks = ("image_to_text",)
  res = retrieve.run_retrieval(config, str(tmp_path))["image_to_text"]
  assert (tmp_path / "retrieval" / "results.json").exists()
  base, rem, orc = (res[v]["R@1"] for v in ("mean", "mean+removal", "mean+oracle_removal"))
  assert res["mean+removal"]["settings"]["attribution_source"].startswith(trained_sae.workdir)
  assert res["mean+removal"]["settings"]["removal_rank"] == 4
  assert rem > base + 5, (base, rem, orc)
  assert rem - base >= 0.9 * (orc - base), (base, rem, orc)


def test_nonfinite_embeddings_are_one_line():
  rng = np.random.default_rng(0)
  img = rng.standard_normal((20, 8)).astype(np.float32)
  txt = rng.standard_normal((20, 8)).astype(np.float32)
  txt[3, 2] = np.nan
  with pytest.raises(SaeJaxError) as e:
    retrieve.evaluate_task(retrieval_tasks.paired_task("image_to_text", img, txt), (1, 5))
  assert "\n" not in str(e.value) and "candidates: 1 rows hold NaN" in str(e.value)
  # image ids shared by two rows: one image query with two caption positives.
  data = retrieval_tasks.paired_task("image_to_text", img, np.nan_to_num(txt), image_ids=np.arange(20) // 2)
  assert data.n_queries == 10 and data.n_candidates == 20
  np.testing.assert_array_equal(data.positives_indptr, np.arange(0, 21, 2))
  np.testing.assert_array_equal(data.positives_indices, np.arange(20))


def _gate_config(trained_sae):
  config = trained_sae.config()
  r = config.retrieval
  r.sae_workdir, r.attribution = trained_sae.workdir, "sae"
  r.tasks = ("image_to_text",)
  r.removal_compare = ("energy", "abs_attribution", "negatives", "margin")
  r.select_on = "validation"
  r.sweep_ranks = (1, 4)
  r.bootstrap_n = 200
  return config


def test_validation_chosen_removal_finds_the_planted_distractors(trained_sae, tmp_path):
  """The gate of the selection: on the planted world (4 distractor atoms), the removal chosen on the
  fit split (never the scored pairs) lies in the distractor span and recovers most of the oracle gain."""
  config = _gate_config(trained_sae)
  r = config.retrieval
  r.source, r.synthetic_pairs, r.synthetic_fit_pairs = "synthetic", 1500, 1500
  res = retrieve.run_retrieval(config, str(tmp_path))["image_to_text"]
  sel = res["mean+removal_selected"]
  s = sel["settings"]
  assert s["selected_on"] == "validation" and s["validation_split"] == s["fit_split"]
  assert s["fit_disjoint"] is True and s["validation_queries"] == 1500
  assert len(s["validation_candidates"]) > 20  # every rule x fraction x rank was scored
  # The chosen subspace: the mean squared projection of its directions on the planted span.
  proj = projectors.Projector.load(str(tmp_path / "retrieval" / "removal_selected_projector.npz"))
  src = synthetic.PlantedSource(config.data.synthetic)
  truth = src.dictionary[np.asarray(src.kinds) == synthetic.DISTRACTOR]
  q, _ = np.linalg.qr(truth.T.astype(np.float64))
  overlap = float(np.mean(np.sum((q.T @ proj.basis.astype(np.float64)) ** 2, axis=0)))
  assert overlap == pytest.approx(s["overlap_with_planted_distractors"], abs=1e-6)
  assert overlap >= 0.9, s
  base, orc = res["mean"]["R@1"], res["mean+oracle_removal"]["R@1"]
  assert orc > base + 10
  assert sel["R@1"] - base >= 0.85 * (orc - base), (base, sel["R@1"], orc)
  assert sel["delta_vs_base"]["R@1_ci95"][0] > 0  # the paired interval excludes no change
  # All-but-the-top with D chosen there, and the diagnostics of the removed concepts.
  assert res["mean+abtt"]["settings"]["abtt_components"] in (1, 2, 4, 8, 16)
  md = (tmp_path / "retrieval" / "removal_concepts.md").read_text()
  assert "| removal_selected |" in md and "margin" in md
  assert (tmp_path / "retrieval" / "fig_removal_concepts.png").stat().st_size > 1000
  sweep = json.loads((tmp_path / "retrieval" / "rank_sweep.json").read_text())
  assert sweep["selected_on"].startswith("test split (oracle")


def _carved_run(config, tmp, image, text, ids):
  _pooled(str(tmp / "activations"), "mean", image, text, image_ids=ids)
  return retrieve.run_retrieval(config, str(tmp))["image_to_text"]


def test_selection_ignores_the_scored_labels_and_is_seeded(trained_sae, tmp_path):
  """Without a fit split, the validation split is a seeded image-disjoint part of the pooled pairs,
  left out of scoring; permuting the scored pairs' labels changes no choice."""
  config = _gate_config(trained_sae)
  r = config.retrieval
  r.source, r.variants, r.whitening = "pooled", ("mean",), False
  r.validation_fraction, r.validation_seed = 0.4, 5
  r.select_fractions, r.select_ranks = (0.01, 0.02), (1, 2, -1)
  src = synthetic.PlantedSource(config.data.synthetic)
  pairs = src.paired(500, seed=21)
  ids = np.repeat(np.arange(250), 2)  # two captions per image
  val, scored = removal.validation_split(ids, 0.4, 5)
  first = _carved_run(config, tmp_path / "a", pairs.image, pairs.text, ids)
  s = first["mean+removal_selected"]["settings"]
  assert (s["fit_on"], s["validation_images"], s["validation_pairs"]) == ("validation", 100, 200)
  assert first["mean"]["n_queries"] == np.unique(ids[scored]).size == 150  # only the other images
  # The scored pairs' texts permuted among themselves: the scored numbers change, the choices do not.
  text = pairs.text.copy()
  text[scored] = text[scored][np.random.default_rng(0).permutation(scored.size)]
  permuted = _carved_run(config, tmp_path / "b", pairs.image, text, ids)
  assert permuted["mean"]["R@1"] < first["mean"]["R@1"] - 5
  for v in ("mean+removal_selected", "mean+abtt"):
    a, b = first[v]["settings"], permuted[v]["settings"]
    keys = ("removal_by", "removal_fraction", "removal_rank", "abtt_components", "validation_candidates")
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, v
  # Seeded: the same seed gives the same split and choice, another seed another split.
  again = _carved_run(config, tmp_path / "c", pairs.image, pairs.text, ids)
  same = lambda x: {k: v for k, v in x.items() if k != "eval_split"}  # the workdirs differ
  assert same(again["mean+removal_selected"]["settings"]) == same(s)
  assert again["mean+removal_selected"]["R@1"] == first["mean+removal_selected"]["R@1"]
  r.validation_seed = 6
  other = _carved_run(config, tmp_path / "d", pairs.image, pairs.text, ids)
  assert other["mean+removal_selected"]["settings"]["validation_R@1_base"] != s["validation_R@1_base"]
