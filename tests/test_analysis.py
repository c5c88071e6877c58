"""The analysis stage end to end on the planted synthetic source with the session's trained SAE."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sae_jax import metrics
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.data.synthetic import PlantedSource
from sae_jax.errors import SaeJaxError
from sae_jax.stages import analysis_codes, analyze
from tests.helpers.env import ROOT
from tests.helpers.reference import concept_reference, dense_codes


def analysis_config(trained_sae):
  """The trained SAE's config with this file's analysis settings; the SAE is read from its workdir."""
  config = trained_sae.config()
  config.analysis.sae_workdir = trained_sae.workdir
  config.analysis.num_pairs = 2000
  config.analysis.top_pairs = 20
  config.analysis.save_codes = True
  config.analysis.bridge_tile = 64
  return config


@pytest.fixture(scope="module")
def analyzed(trained_sae, tmp_path_factory):
  """(config, SAE workdir, analysis workdir, summary) of one analysis run."""
  config = analysis_config(trained_sae)
  out = str(tmp_path_factory.mktemp("analysis"))
  summary = analyze.run_analysis(config, out)
  return config, trained_sae.workdir, out, summary


def test_outputs_match_dense_recomputation(analyzed):
  config, workdir, analysis_dir, summary = analyzed
  out = os.path.join(analysis_dir, "analysis")
  for name in (
    "concepts.npz",
    "codes.npz",
    "table1.json",
    "table1.md",
    "top_bridge_pairs.csv",
    "fig_modality_kde.png",
    "fig_cumulative_energy.png",
    "summary.json",
  ):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  conc = np.load(os.path.join(out, "concepts.npz"))
  codes = np.load(os.path.join(out, "codes.npz"))
  loaded = workdir_lib.load_sae(workdir)
  D = loaded.params["D"].astype(np.float64)
  c = D.shape[0]
  np.testing.assert_allclose(conc["D"], loaded.params["D"])
  np.testing.assert_allclose(np.linalg.norm(conc["D"], axis=1), 1.0, atol=1e-5)
  assert str(conc["bridge_reduction"]) == "diag" and str(conc["codes_mode"]) == "encode_pooled"
  assert codes["image_values"].shape == (2000, loaded.k) == codes["text_indices"].shape
  # The codes are the SAE's codes of the pooled (here: per-sample) embeddings.
  pairs = PlantedSource(config.data.synthetic).paired(2000, seed=config.analysis.pair_seed)
  direct = sae_lib.encode(
    {k: np.asarray(v) for k, v in loaded.params.items()}, pairs.image[:64], loaded.k, loaded.spec
  )
  np.testing.assert_allclose(
    np.sort(codes["image_values"][:64], 1), np.sort(np.asarray(direct.values), 1), rtol=1e-5, atol=1e-6
  )
  # Every stored metric against the dense formulas on the stored codes.
  ref = concept_reference(
    D, (codes["image_values"], codes["image_indices"]), (codes["text_values"], codes["text_indices"])
  )
  B, ms = ref["B"], ref["modality"]
  np.testing.assert_allclose(conc["energy"], ref["energy"], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.isnan(conc["modality_score"]), np.isnan(ms))
  assert int(conc["n_silent"]) == int(np.isnan(ms).sum())
  np.testing.assert_allclose(conc["modality_score"][~np.isnan(ms)], ms[~np.isnan(ms)], rtol=1e-5)
  np.testing.assert_allclose(conc["attribution"], ref["attribution"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(conc["bridge_score"], ref["diag"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(conc["bridge_sym"], ref["row"] + ref["col"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(conc["bridge_max"], ref["max"], rtol=1e-4, atol=1e-6)
  # Table 1 from the stored scores; top pairs equal the dense B's best co-occurring entries.
  t1 = json.load(open(os.path.join(out, "table1.json")))
  size = int(np.ceil(0.01 * c))  # top-1% sets of the dense scores
  S_E, S_A, S_B = (set(np.argsort(-ref[key])[:size].tolist()) for key in ("energy", "attribution", "diag"))
  jac = lambda a, b: len(a & b) / len(a | b)
  expect = {
    "J(S_E,S_A)": jac(S_E, S_A),
    "J(S_E,S_B)": jac(S_E, S_B),
    "J(S_A,S_B)": jac(S_A, S_B),
    "triple_overlap": len(S_E & S_A & S_B) / len(S_E | S_A | S_B),
  }
  for key, value in expect.items():
    assert t1["rows"][0][key] == pytest.approx(value), key
  assert t1["rows"][0]["set_size"] == 3 and t1["bridge_reduction"] == "diag"
  rows = list(csv.DictReader(open(os.path.join(out, "top_bridge_pairs.csv"))))
  assert len(rows) == 20
  cand = np.sort(np.where(ref["cooc"] != 0, B, -np.inf).reshape(-1))[::-1][:20]
  np.testing.assert_allclose([float(r["B_ij"]) for r in rows], cand, rtol=1e-4, atol=1e-7)
  for r in rows[:5]:
    assert float(r["B_ij"]) == pytest.approx(B[int(r["concept_i"]), int(r["concept_j"])], rel=1e-4)


def test_planted_structure_is_recovered(analyzed):
  config, _, analysis_dir, summary = analyzed
  conc = np.load(os.path.join(analysis_dir, "analysis", "concepts.npz"))
  src = PlantedSource(config.data.synthetic)
  D = conc["D"].astype(np.float64)
  cos = D @ src.dictionary.T
  best, best_cos = cos.argmax(1), cos.max(1)
  kind = src.kinds[best]
  ms = conc["modality_score"]
  ok = (best_cos >= 0.8) & np.isfinite(ms)

  def auc(lo, hi):
    a, b = ok & (kind == lo), ok & (kind == hi)
    assert a.sum() >= 3 and b.sum() >= 3, (lo, hi, a.sum(), b.sum())
    return roc_auc_score(np.r_[np.zeros(a.sum()), np.ones(b.sum())], np.r_[ms[a], ms[b]])

  assert auc(0, 1) >= 0.95  # image-only below text-only
  assert auc(0, 2) >= 0.95  # image-only below shared
  assert auc(2, 1) >= 0.95  # shared below text-only
  syn = summary["synthetic"]
  assert syn["auc_image_vs_text"] == pytest.approx(auc(0, 1))
  # The top-1% energy set is made of the planted distractors (their span: the SAE may learn
  # mixtures of the co-firing distractor atoms).
  q, _ = np.linalg.qr(src.dictionary[src.kinds == 3].T.astype(np.float64))
  top = metrics.top_fraction_set(conc["energy"], 0.01)
  assert np.all(np.linalg.norm(D[top] @ q, axis=1) >= 0.9)
  assert syn["top_energy_set_in_distractor_span_fraction"] == 1.0


def test_pool_token_codes_mode_and_compare_runs(analyzed, trained_sae, tmp_path):
  _, _, analysis_dir, _ = analyzed
  config = analysis_config(trained_sae)
  config.analysis.codes = "pool_token_codes"
  config.analysis.tokens_per_sample = 3
  config.analysis.num_pairs = 500
  config.analysis.compare_workdirs = analysis_dir
  config.analysis.run_name = "token-pooled"
  other = str(tmp_path / "tokens")
  summary = analyze.run_analysis(config, other)
  assert summary["codes"] == "pool_token_codes" and summary["tokens_per_sample"] == 3
  codes = np.load(os.path.join(other, "analysis", "codes.npz"))
  assert codes["image_values"].shape == (500, 3 * 12)  # union of 3 tokens' top-12
  assert str(np.load(os.path.join(other, "analysis", "concepts.npz"))["codes_mode"]) == "pool_token_codes"
  md = open(os.path.join(other, "analysis", "table1.md")).read()
  assert "| token-pooled |" in md and f"| {os.path.basename(analysis_dir)} |" in md
  assert len(json.load(open(os.path.join(other, "analysis", "table1.json")))["rows"]) == 2


def test_pool_token_codes_equals_dense_mean():
  rng = np.random.default_rng(0)
  c, k, n = 20, 3, 5
  seg = np.array([0, 0, 1, 3, 3, 3, 4])
  idx = np.stack([rng.choice(c, k, replace=False) for _ in seg]).astype(np.int32)
  val = rng.uniform(0.1, 1, (seg.size, k)).astype(np.float32)
  v, i = analysis_codes.pool_token_codes(val, idx, seg, n, c)
  want = np.zeros((n, c))
  for r, s in enumerate(seg):
    want[s, idx[r]] += val[r] / np.sum(seg == s)
  np.testing.assert_allclose(dense_codes(v, i, c), want, rtol=1e-6)
  assert v.shape[1] == (want > 0).sum(1).max() and np.all(v[2] == 0)  # widest union; sample 2: no tokens
  assert np.all(np.diff(v[3][v[3] > 0]) <= 0)  # sorted by value


def test_pooled_file_source_and_bad_inputs(trained_sae, tmp_path):
  config, workdir = trained_sae.config(), trained_sae.workdir
  src = PlantedSource(config.data.synthetic)
  pairs = src.paired(300, seed=5)

  def run_with(image, text, name, reduction="diag"):
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, image=image, text=text, sample_ids=np.arange(image.shape[0]))
    cfg = analysis_config(trained_sae)
    cfg.analysis.embeddings_path = path
    cfg.analysis.top_pairs = 0
    cfg.analysis.save_codes = False
    cfg.analysis.bridge_reduction = reduction
    return analyze.run_analysis(cfg, str(tmp_path / name))

  s = run_with(pairs.image, pairs.text, "ok", reduction="max")
  assert s["source"] == "pooled" and s["n_pairs"] == 300 and s["embeddings_path"].endswith("ok.npz")
  assert "synthetic" not in s and s["bridge_reduction"] == "max"
  conc = np.load(str(tmp_path / "ok" / "analysis" / "concepts.npz"))
  assert str(conc["bridge_reduction"]) == "max"
  np.testing.assert_array_equal(conc["bridge_score"], conc["bridge_max"])
  assert not np.allclose(conc["bridge_score"], conc["bridge_diag"])
  assert not os.path.exists(str(tmp_path / "ok" / "analysis" / "top_bridge_pairs.csv"))
  cases = [
    ((pairs.image, pairs.text[:299]), "299 text rows"),
    ((pairs.image[:, :-1], pairs.text[:, :-1]), "width 63 but the SAE"),
    ((pairs.image[:0], pairs.text[:0]), "no image/text pairs"),
  ]
  for j, ((img, txt), needle) in enumerate(cases):
    with pytest.raises(SaeJaxError) as err:
      run_with(img, txt, f"bad{j}")
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
  # A workdir with a config.json but no checkpoint, and one with nothing at all.
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  for path, needle in ((bare, "no checkpoint found"), (tmp_path / "empty", "config.json is missing")):
    with pytest.raises(SaeJaxError) as err:
      analyze.run_analysis(trained_sae.config(), str(path))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_cli_reports_missing_checkpoint_in_one_line(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.analyze",
      "--config=configs/synthetic.py:tiny",
      f"--workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 1
  lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and str(tmp_path) in lines[0], out.stderr[-2000:]
