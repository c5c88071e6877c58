"""sae_jax.api: the README example runs as written, and the public functions reproduce the stages'
outputs (analysis/concepts.npz, table1.json, retrieval/results.json) on the session's synthetic SAE."""

import contextlib
import io
import json
import re

import numpy as np
import pytest

from sae_jax import api
from sae_jax.data.synthetic import PlantedSource
from sae_jax.errors import SaeJaxError
from sae_jax.stages import analyze, retrieve
from tests.helpers import env
from tests.helpers.reference import dense_codes, recall_reference, topk_relu_codes

README_WORKDIR = "/tmp/sae-synthetic"  # the demo workdir the README example loads


def _readme_example() -> str:
  text = (env.ROOT / "README.md").read_text()
  match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
  assert match, "README.md: no ```python block after <!-- api-example -->"
  return match.group(1)


def test_readme_example_runs(trained_sae):
  code = _readme_example()
  assert README_WORKDIR in code
  out = io.StringIO()
  scope: dict = {}
  with contextlib.redirect_stdout(out):
    exec(compile(code.replace(README_WORKDIR, trained_sae.workdir), "README.md", "exec"), scope)
  lines = out.getvalue().splitlines()
  assert [line.split(" ", 1)[0] for line in lines[1:]] == ["base", "removal", "whitening"]
  table = eval(lines[0])  # noqa: S307 (a dict literal the example printed)
  assert set(table) == {"J(S_E,S_A)", "J(S_E,S_B)", "J(S_A,S_B)", "triple_overlap"}
  recalls = {line.split(" ", 1)[0]: eval(line.split(" ", 1)[1]) for line in lines[1:]}  # noqa: S307
  # The base numbers against an independent reference on the same arrays.
  ev = scope["ev"]
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  n = ev.image.shape[0]
  ref = recall_reference(unit(ev.image) @ unit(ev.text).T, np.arange(n + 1), np.arange(n), (1, 5, 10))
  assert recalls["base"] == {k: round(v, 1) for k, v in ref.items()}
  # Removing the planted distractor subspace helps image -> text retrieval (the paper's claim).
  assert recalls["removal"]["R@1"] > recalls["base"]["R@1"] + 5
  # The codes are the dense Top-K of the encoder pre-activations (no ties at float32 here).
  sae, codes = scope["sae"], scope["codes"]
  x = ev.image[:64].astype(np.float64)
  p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
  pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"] if sae.spec.pre_bias else x @ p["W_enc"] + p["b_enc"]
  want = topk_relu_codes(pre, sae.spec.k)
  got = dense_codes(codes.values[:64], codes.indices[:64], sae.spec.c)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_concept_metrics_and_table1_match_the_analysis_stage(trained_sae, tmp_path):
  config = trained_sae.config()
  a = config.analysis
  a.sae_workdir = trained_sae.workdir
  a.source = "synthetic"
  a.num_pairs = 1500
  a.top_pairs = 0
  summary = analyze.run_analysis(config, str(tmp_path))
  sae = api.load_sae(trained_sae.workdir)
  pairs = PlantedSource(sae.config.data.synthetic).paired(1500, seed=int(a.pair_seed))
  cm = api.concept_metrics(sae, pairs.image, pairs.text, batch_size=512)
  with np.load(tmp_path / "analysis" / "concepts.npz") as z:
    for key in ("energy", "energy_image", "energy_text", "fire_rate_image", "fire_rate_text", "attribution"):
      # float32 sums in other block orders (512 rows here): a tolerance on the array's scale
      np.testing.assert_allclose(
        getattr(cm, key), z[key], rtol=1e-5, atol=1e-6 * np.abs(z[key]).max(), err_msg=key
      )
    for key in ("bridge_diag", "bridge_row", "bridge_col"):
      # float32 sums in other block orders (512 rows here): a tolerance on the array's scale
      np.testing.assert_allclose(
        getattr(cm, key), z[key], rtol=1e-5, atol=1e-6 * np.abs(z[key]).max(), err_msg=key
      )
    np.testing.assert_allclose(cm.modality_score, z["modality_score"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(sae.params["D"], z["D"])
  row = json.loads((tmp_path / "analysis" / "table1.json").read_text())["rows"][0]
  for key, value in api.table1(cm).items():
    assert row[key] == pytest.approx(value), key
  assert summary["table1"]["set_size"] == api.table1(cm)["set_size"] == 3


def test_removal_whitening_and_recall_match_the_retrieval_stage(trained_sae, tmp_path):
  config = trained_sae.config()
  r = config.retrieval
  r.sae_workdir = trained_sae.workdir
  r.source = "synthetic"
  r.attribution = "sae"
  r.synthetic_pairs = 1000
  r.synthetic_fit_pairs = 1000
  r.removal_fraction = 0.015  # ceil(0.015 * 256) = 4 atoms
  r.removal_compare = ("margin",)
  r.tasks = ("image_to_text", "text_to_image")
  r.sweep_ranks = (1,)
  results = retrieve.run_retrieval(config, str(tmp_path))
  sae = api.load_sae(trained_sae.workdir)
  source = PlantedSource(sae.config.data.synthetic)
  seed = int(r.synthetic_seed)
  ev, fit = source.paired(1000, seed=seed), source.paired(1000, seed=seed + 1)
  removal = api.fit_removal(sae, api.concept_metrics(sae, fit.image, fit.text).attribution, fraction=0.015)
  stage_removal = api.Projector.load(str(tmp_path / "retrieval" / "removal_projector.npz"))
  np.testing.assert_allclose(
    removal.basis @ removal.basis.T, stage_removal.basis @ stage_removal.basis.T, atol=1e-5
  )
  cm = api.concept_metrics(sae, fit.image, fit.text)
  neg = api.negatives(sae, fit.image, fit.text)
  margin = api.fit_removal(sae, api.removal_scores(cm, "margin", neg), fraction=0.015)
  np.testing.assert_allclose(api.removal_scores(cm, "margin", neg), 2 * neg - cm.attribution)
  with pytest.raises(SaeJaxError, match="needs negatives="):
    api.removal_scores(cm, "negatives")
  positives = [[i] for i in range(1000)]
  for task, (q, c) in {"image_to_text": (ev.image, ev.text), "text_to_image": (ev.text, ev.image)}.items():
    wq, wc = api.fit_whitening(q, c)
    cq, cc = api.fit_abtt(q, 0), api.fit_abtt(c, 0)
    mine = {
      "mean": api.recall(q, c, positives),
      "mean+removal": api.recall(removal(q), removal(c), positives),
      "mean+removal_by_margin": api.recall(margin(q), margin(c), positives),
      "mean+whitening": api.recall(wq(q), wc(c), positives),
      "mean+center": api.recall(cq(q), cc(c), positives),
    }
    for variant, rec in mine.items():
      for k in ("R@1", "R@5", "R@10"):
        assert rec[k] == pytest.approx(results[task][variant][k], abs=1e-9), (task, variant, k)
  assert results["image_to_text"]["mean+removal"]["R@1"] > results["image_to_text"]["mean"]["R@1"] + 5


def test_positives_and_inputs_are_checked(trained_sae):
  indptr, indices = api.positives_csr([[2], [0, 3], [1]], 4)
  np.testing.assert_array_equal(indptr, [0, 1, 3, 4])
  np.testing.assert_array_equal(indices, [2, 0, 3, 1])
  rng = np.random.default_rng(0)
  q, c = rng.standard_normal((3, 8)), rng.standard_normal((4, 8))
  ref = recall_reference(
    (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T,
    indptr,
    indices,
    (1, 2),
  )
  assert api.recall(q, c, [[2], [0, 3], [1]], ks=(1, 2)) == pytest.approx(ref)
  with pytest.raises(SaeJaxError, match=r"positives: candidate ids must lie in \[0, 4\)"):
    api.recall(q, c, [[2], [0, 4], [1]])
  with pytest.raises(SaeJaxError, match="one list per query"):
    api.recall(q, c, [[2], [0]])
  sae = api.load_sae(trained_sae.workdir)
  with pytest.raises(SaeJaxError, match=r"x: expected float rows \[N, 64\]"):
    api.encode(sae, np.zeros((3, 5)))
  with pytest.raises(SaeJaxError, match="expected one of"):
    api.removal_scores(api.concept_metrics(sae, q[:, :1].repeat(64, 1), c[:3, :1].repeat(64, 1)), "bridge")
