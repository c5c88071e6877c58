"""What a researcher sees: configured K in every table and figure, small candidate pools, the stdout
summary of each main, and the drawn elements of the figures (read through matplotlib's objects)."""

import json
import math
import os
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest

from configs import base as base_cfg
from sae_jax.data import synthetic
from sae_jax.errors import SaeJaxError
from sae_jax.plots import analysis as plot_a
from sae_jax.plots import retrieval as plot_r
from sae_jax.stages import retrieval_tables, retrieve
from tests.helpers import env
from tests.helpers.reference import recall_reference


def _pooled_workdir(tmp_path, n_pairs: int, seed: int = 5, variants=("mean",)):
  """<tmp>/activations/pooled_<v>.npz of planted pairs and <tmp>/analysis/concepts.npz whose
  attribution ranks the planted distractors first (no SAE needed)."""
  src = synthetic.PlantedSource(synthetic.default_synthetic_config())
  pairs = src.paired(n_pairs, seed=seed)
  act = tmp_path / "activations"
  act.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for v in variants:
    noise = 0.0 if v == "mean" else 0.5
    img = pairs.image + rng.normal(0, noise, pairs.image.shape).astype(np.float32)
    np.savez(act / f"pooled_{v}.npz", image=img, text=pairs.text, sample_ids=np.arange(n_pairs))
  kinds = np.asarray(src.kinds)
  attribution = np.where(kinds == synthetic.KINDS.index("distractor"), 10.0, rng.random(len(kinds)))
  (tmp_path / "analysis").mkdir()
  np.savez(tmp_path / "analysis" / "concepts.npz", attribution=attribution, D=src.dictionary)
  return str(tmp_path)


def _pooled_config(ks, variants=("mean",)):
  config = base_cfg.get_config()
  r = config.retrieval
  r.source = "pooled"
  r.variants = variants
  r.tasks = ("image_to_text", "text_to_image")
  r.ks = ks
  r.removal_fraction = 0.04  # ceil(0.04 * 124) = 5 planted-dictionary atoms
  r.sweep_ranks = (1, 2, 4)
  r.save_embeddings = True
  return config


def _table_header(md: str) -> list[str]:
  line = next(x for x in md.splitlines() if x.startswith("| Task |"))
  return [c.strip() for c in line.strip("|").split("|")]


def test_configured_ks_are_every_column(tmp_path):
  """ks=(1, 5) used to crash Table 2's writer (it read R@10); every output now follows ks."""
  workdir = _pooled_workdir(tmp_path, 120, variants=("mean", "last_token", "mean_no_image"))
  lines = []
  results = retrieve.run_retrieval(
    _pooled_config((5, 1), ("mean", "last_token", "mean_no_image")), workdir, log=lines.append
  )
  out = tmp_path / "retrieval"
  for by_var in results.values():
    for rec in by_var.values():
      assert sorted(k for k in rec if k.startswith("R@") and k[2:].isdigit()) == ["R@1", "R@5"]
  t2, t3 = (out / "table2.md").read_text(), (out / "table3.md").read_text()
  assert _table_header(t2) == [
    "Task",
    "Setting",
    "queries",
    "candidates",
    "subset",
    "R@1",
    "R@5",
    "ΔR@1 vs base [95% CI]",
    "settings",
  ]
  assert _table_header(t3) == ["Task", "Setting", "queries", "candidates", "subset", "R@1", "R@5"]
  base = results["image_to_text"]["mean"]
  assert f"| MSCOCO q_i->c_t | Base | 120 | 120 | all | {base['R@1']:.2f} | {base['R@5']:.2f} |" in t2
  sweep = json.loads((out / "rank_sweep.json").read_text())
  assert sorted(sweep["metrics"]) == ["R@1", "R@5"]
  # Figure 4 draws the configured K only.
  fig, drawn = plot_r.draw_masking(results)
  try:
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["R@1", "R@5"]
    assert set(drawn) == {(t, v) for t in results for v in ("mean", "mean_no_image")}
  finally:
    plt.close(fig)
  # Every reported number recomputed from the saved embeddings by an independent reference.
  with np.load(out / "embeddings_image_to_text_mean+removal.npz") as z:
    ref = recall_reference(
      z["queries"] @ z["candidates"].T, z["positives_indptr"], z["positives_indices"], (1, 5)
    )
  assert results["image_to_text"]["mean+removal"]["R@1"] == pytest.approx(ref["R@1"])
  assert results["image_to_text"]["mean+removal"]["R@5"] == pytest.approx(ref["R@5"])
  assert lines[0].startswith(f"retrieval: wrote {out}/ (") and "table2.md" in lines[0]
  assert (
    f"image_to_text: 120 queries x 120 candidates (all); R@1 base {base['R@1']:.2f} | removal " in lines[1]
  )


def test_small_pool_reports_the_k_that_fit(tmp_path):
  """8 candidates and ks=(1, 5, 10): R@10 is left out and said so; R@1 / R@5 are exact."""
  workdir = _pooled_workdir(tmp_path, 8)
  lines = []
  results = retrieve.run_retrieval(_pooled_config((1, 5, 10)), workdir, log=lines.append)
  out = tmp_path / "retrieval"
  for task in ("image_to_text", "text_to_image"):
    for variant, rec in results[task].items():
      assert rec["ks_dropped"] == [10] and "R@10" not in rec
      with np.load(out / f"embeddings_{task}_{variant}.npz") as z:
        ref = recall_reference(
          z["queries"] @ z["candidates"].T, z["positives_indptr"], z["positives_indices"], (1, 5)
        )
      assert (rec["R@1"], rec["R@5"]) == (pytest.approx(ref["R@1"]), pytest.approx(ref["R@5"]))
  t2 = (out / "table2.md").read_text()
  assert _table_header(t2)[5:9] == ["R@1", "R@5", "ΔR@1 vs base [95% CI]", "settings"]
  assert "R@10 not reported for MSCOCO q_i->c_t: only 8 candidates." in t2
  assert "with 8 queries one query moves R@K by 12.5 points" in t2
  assert any("R@10 not reported for MSCOCO q_t->c_i" in line for line in lines)


def test_pool_smaller_than_every_k_writes_nothing(tmp_path):
  workdir = _pooled_workdir(tmp_path, 8)
  with pytest.raises(SaeJaxError) as e:
    retrieve.run_retrieval(_pooled_config((10, 20)), workdir)
  assert "\n" not in str(e.value) and "config.retrieval.ks=(10, 20)" in str(e.value)
  assert "8 candidates" in str(e.value)
  # No retrieval/ and no staging directory of the scored embeddings left behind.
  assert sorted(os.listdir(workdir)) == ["activations", "analysis"]


def test_table3_and_fig_masking_say_what_is_missing(tmp_path):
  """One variant only: no Table 3 of mean rows alone, no empty Figure 4; a stale figure is removed."""
  workdir = _pooled_workdir(tmp_path, 60)
  out = tmp_path / "retrieval"
  out.mkdir()
  (out / "fig_masking.png").write_bytes(b"stale")
  lines = []
  results = retrieve.run_retrieval(_pooled_config((1, 5)), workdir, log=lines.append)
  t3 = (out / "table3.md").read_text()
  assert "| Task |" not in t3 and retrieval_tables.TABLE3_MISSING in t3
  assert not (out / "fig_masking.png").exists()
  assert any(line.startswith("  fig_masking.png: skipped (no mean_no_image") for line in lines)
  with pytest.raises(SaeJaxError):
    plot_r.draw_masking(results)


def test_cumulative_energy_marker_sits_where_the_share_is_measured():
  """c = 150, top 1%: the share is measured at ceil(1.5) = 2 concepts (1.33% of c), not at 1%."""
  rng = np.random.default_rng(0)
  energy = rng.exponential(size=150)
  fig = plot_a.draw_cumulative_energy([{"name": "run", "energy": energy}], 0.01)
  try:
    ax = fig.axes[0]
    markers = [line for line in ax.get_lines() if line.get_gid() == "top_set_marker"]
    assert len(markers) == 1
    e = np.sort(energy)[::-1]
    np.testing.assert_allclose(markers[0].get_xdata(), [100 * 2 / 150])
    np.testing.assert_allclose(markers[0].get_ydata(), [100 * e[:2].sum() / e.sum()])
    label = ax.get_legend().get_texts()[0].get_text()
    assert f"top 2 concepts (ceil 1%) hold {100 * e[:2].sum() / e.sum():.1f}%" in label
    # No line at exactly 1% any more.
    assert not [line for line in ax.get_lines() if np.allclose(line.get_xdata(), 1.0)]
  finally:
    plt.close(fig)


def test_rank_sweep_oracle_lines_are_labelled_per_metric():
  sweep = {
    "ranks": [0, 1, 2, 4],
    "metrics": {"R@1": [10.0, 20.0, 30.0, 31.0], "R@5": [30.0, 40.0, 50.0, 52.0]},
    "oracle": {"R@1": 33.0, "R@5": 55.0},
  }
  fig = plot_r.draw_rank_sweep(sweep, "t")
  try:
    ax = fig.axes[0]
    by_label = {line.get_label(): line for line in ax.get_lines()}
    for m, val in sweep["oracle"].items():
      oracle = by_label[f"{m}, oracle removal"]
      assert list(oracle.get_ydata()) == [val, val] and oracle.get_linestyle() == "--"
      assert oracle.get_color() == by_label[m].get_color()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      "R@1",
      "R@5",
      "R@1, oracle removal",
      "R@5, oracle removal",
    ]
  finally:
    plt.close(fig)


_main = env.run_main


def test_train_analyze_retrieve_print_their_summary(trained_sae, tmp_path):
  """Each main ends with the output paths, the headline numbers and the time on stdout."""
  wd = str(tmp_path / "run")
  train = _main(
    "train",
    "--config=configs/synthetic.py:tiny",
    f"--workdir={wd}",
    "--config.train.num_steps=10",
    "--config.train.tensorboard=False",
  )
  assert train.returncode == 0, train.stderr[-2000:]
  out = train.stdout.splitlines()
  summary = json.loads(next(x for x in out if x.startswith("SUMMARY "))[len("SUMMARY ") :])
  assert (
    out[-4].startswith(f"train: {wd} at step 10 in ")
    and "(checkpoints/, metrics.jsonl, config.json)" in out[-4]
  )
  assert out[-3].startswith(f"  held-out FVU {summary['eval_fvu']:.4f} over {summary['eval_rows']} rows")
  assert (
    out[-2] == f"  planted atoms recovered: mean max cosine {summary['planted_mean_max_cos']:.3f} (1 = all)"
  )
  assert out[-1].startswith("  tiny preset:") and "plumbing, not the quality" in out[-1]

  # Analysis and retrieval of the session's SAE, written into another workdir.
  common = [
    "--config=configs/synthetic.py:tiny",
    f"--workdir={wd}",
    f"--config.analysis.sae_workdir={trained_sae.workdir}",
  ]
  ana = _main(
    "analyze",
    *common,
    "--config.analysis.num_pairs=1000",
    "--config.analysis.top_pairs=0",
    "--config.analysis.block_size=250",
    "--config.analysis.log_every_s=0",
  )
  assert ana.returncode == 0, ana.stderr[-2000:]
  # stderr is a pipe, not a terminal: a progress line per block of codes (log_every_s=0).
  done = re.findall(r"^analysis codes: (\d+)/4 blocks, [\d.]+ blocks/s, ETA \S+$", ana.stderr, re.M)
  assert [int(n) for n in done] == [1, 2, 3, 4], ana.stderr[-2000:]
  lines = ana.stdout.splitlines()
  s = json.loads((tmp_path / "run" / "analysis" / "summary.json").read_text())
  t = s["table1"]
  assert lines[0].startswith(f"analysis: wrote {wd}/analysis/ (concepts.npz, table1.json, table1.md")
  assert lines[1] == (
    f"  pairs: {s['n_pairs']} from synthetic planted source; SAE {trained_sae.workdir} step 300 (c=256, d=64, k=12)"
  )
  assert lines[2] == (
    f"  Table 1 (top 1% = {math.ceil(0.01 * 256)} of 256 concepts, bridge diag): J(S_E,S_A) {t['J(S_E,S_A)']:.4f} | "
    f"J(S_E,S_B) {t['J(S_E,S_B)']:.4f} | J(S_A,S_B) {t['J(S_A,S_B)']:.4f} | triple overlap {t['triple_overlap']:.4f}"
  )
  ret = _main(
    "retrieve",
    "--config=configs/synthetic.py:tiny",
    f"--workdir={wd}",
    f"--config.retrieval.sae_workdir={trained_sae.workdir}",
    "--config.retrieval.synthetic_pairs=500",
    "--config.retrieval.ks=(1,5)",
    "--config.retrieval.tasks=('image_to_text',)",
    "--config.retrieval.log_every_s=0",
  )
  assert ret.returncode == 0, ret.stderr[-2000:]
  settings = re.findall(r"^retrieval: (\d+)/(\d+) settings, [\d.]+ settings/s, ETA \S+$", ret.stderr, re.M)
  n_settings = len(json.loads((tmp_path / "run" / "retrieval" / "results.json").read_text())["image_to_text"])
  assert [int(d) for d, _ in settings] == list(range(1, n_settings + 1)), ret.stderr[-2000:]
  assert {int(t) for _, t in settings} == {n_settings}
  lines = ret.stdout.splitlines()
  res = json.loads((tmp_path / "run" / "retrieval" / "results.json").read_text())["image_to_text"]
  assert lines[0].startswith(f"retrieval: wrote {wd}/retrieval/ (") and " s" in lines[0]
  assert lines[1] == (
    f"  image_to_text: 500 queries x 500 candidates (all); R@1 base {res['mean']['R@1']:.2f} | "
    f"removal {res['mean+removal']['R@1']:.2f} | whitening {res['mean+whitening']['R@1']:.2f}"
  )
  # --print_config lists the fields (with the overrides) and runs nothing; --help says so.
  cfg = _main(
    "retrieve", "--config=configs/synthetic.py:tiny", "--config.retrieval.ks=(1,5)", "--print_config"
  )
  assert cfg.returncode == 0, cfg.stderr[-2000:]
  assert "retrieval:" in cfg.stdout and "- 5" in cfg.stdout and "removal_fraction: 0.02" in cfg.stdout
  helped = _main("analyze", "--help")
  assert "--[no]print_config" in helped.stdout


def test_extract_summary_and_data_root_error(coco_mini, tmp_path):
  wd = str(tmp_path / "clip")
  ext = _main(
    "extract",
    "--config=configs/clip_coco.py:tiny",
    f"--workdir={wd}",
    extra_env={"COCO_MINI": str(coco_mini)},
  )
  assert ext.returncode == 0, ext.stderr[-2000:]
  lines = ext.stdout.splitlines()
  assert lines[0].startswith(f"extract: tiny:clip -> {wd}/activations/ (") and "pooled_embed.npz" in lines[0]
  assert lines[1].startswith("  11 images, 55 captions, 55 pairs")
  assert lines[-1].startswith("  tiny preset:") and "plumbing, not the quality" in lines[-1]
  missing = _main(
    "extract",
    "--config=configs/clip_coco.py:tiny",
    f"--workdir={wd}-2",
    extra_env={"COCO_MINI": str(tmp_path / "none")},
  )
  assert missing.returncode == 1
  err = missing.stderr.strip()
  assert "\n" not in err and err.startswith(
    f"error: config.extract.captions_json: {tmp_path}/none/captions.json"
  )
  assert "$COCO_MINI" in err
