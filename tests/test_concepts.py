"""The concepts stage: streaming top rows and sparse AUROC against brute-force references, labels on
the planted synthetic world, and the pages in a real (headless Chromium) browser."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from sae_jax import concept_stats
from sae_jax import workdir as workdir_lib
from sae_jax.data.synthetic import DISTRACTOR, IMAGE, PlantedSource
from sae_jax.stages import analysis_planted, analyze, concepts
from tests.helpers.trained import synthetic_sae_config


def _random_codes(seed: int, n: int = 400, c: int = 24, k: int = 3) -> tuple:
  rng = np.random.default_rng(seed)
  indices = np.stack([rng.choice(c, k, replace=False) for _ in range(n)])
  values = np.round(rng.uniform(0.0, 2.0, (n, k)), 1).astype(np.float32)  # rounded: many ties
  values[rng.random((n, k)) < 0.25] = 0.0
  dense = np.zeros((n, c), np.float64)
  np.add.at(dense, (np.repeat(np.arange(n), k), indices.ravel()), values.ravel())
  return values, indices, dense


def test_streaming_top_rows_equal_a_brute_force_argsort():
  values, indices, dense = _random_codes(0)
  n_top = 6
  for block in (1, 37, 4096):
    top = concept_stats.top_rows(values, indices, dense.shape[1], n_top, block)
    for j in range(dense.shape[1]):
      order = np.lexsort((np.arange(dense.shape[0]), -dense[:, j]))  # ties: the lower row first
      want = [int(r) for r in order[:n_top] if dense[r, j] > 0]
      got = top.rows[j][top.rows[j] >= 0].tolist()
      assert got == want, (block, j)
      np.testing.assert_array_equal(top.values[j][: len(want)], dense[want, j].astype(np.float32))


def test_sparse_auroc_equals_an_independent_pairwise_count():
  values, indices, dense = _random_codes(1)
  rng = np.random.default_rng(2)
  labels = rng.random((dense.shape[0], 5)) < 0.3
  labels[:, 4] = False  # no positive: undefined
  auc = concept_stats.sparse_auroc(concept_stats.sparse_codes(values, indices, dense.shape[1], 64), labels)
  for j in range(dense.shape[1]):
    for v in range(4):
      pos, neg = dense[labels[:, v], j], dense[~labels[:, v], j]
      diff = pos[:, None] - neg[None, :]  # P(pos > neg) + P(pos == neg) / 2 over all pairs
      want = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
      assert auc[j, v] == pytest.approx(want, abs=1e-12)
      assert auc[j, v] == pytest.approx(analysis_planted.auc_mann_whitney(neg, pos), abs=1e-12)
  assert np.all(np.isnan(auc[:, 4]))


# ------------------------------------------------------------------------------ planted world


def _planted_attributes(cfg, n: int, seed: int) -> dict:
  """Which planted atom fires in each image row / text row: the planted world's truth per row."""
  sample = PlantedSource(cfg).paired(n, seed=seed)
  atoms = [str(j) for j in range(sample.image_codes.shape[1])]
  return {
    "image_atom": concepts.Attribute(atoms, sample.image_codes > 0, "image"),
    "text_atom": concepts.Attribute(atoms, sample.text_codes > 0, "text"),
  }


def _run_stage(config, sae_dir: str, workdir: str) -> tuple:
  """Analysis, then the concepts stage labelled by the planted truth, of the SAE in `sae_dir`."""
  config.analysis.sae_workdir = sae_dir
  config.analysis.num_pairs = 2048
  config.analysis.top_pairs = 0
  analyze.run_analysis(config, workdir)
  loaded = workdir_lib.load_sae(sae_dir)
  synthetic = analyze._synthetic_cfg(config, loaded)
  summary = concepts.run_concepts(
    config,
    workdir,
    _planted_attributes(synthetic, int(config.analysis.num_pairs), int(config.analysis.pair_seed)),
  )
  with open(os.path.join(workdir, "concepts", "concepts.json")) as f:
    data = json.load(f)
  truth = analyze.load_pairs(config, "", loaded, "").planted
  return loaded, truth, summary, data


@pytest.fixture(scope="module")
def planted_concepts(trained_sae, tmp_path_factory):
  """The concepts stage on the shared synthetic SAE, analysed into a fresh workdir."""
  workdir = str(tmp_path_factory.mktemp("concepts_planted"))
  config = trained_sae.config()
  config.concepts.extra_ids = "0,1"
  return (workdir, *_run_stage(config, trained_sae.workdir, workdir))


def test_planted_atoms_get_their_label(planted_concepts):
  _, loaded, truth, summary, data = planted_concepts
  best, cos = analysis_planted.match_planted(np.asarray(loaded.params["D"]), truth)
  rows = data["concepts"]
  content = [i for i in range(len(rows)) if cos[i] >= 0.95 and truth.kinds[best[i]] != DISTRACTOR]
  assert len(content) >= 10
  for i in content:  # each learned atom is labelled by the planted atom it matches
    assert rows[i]["label"].split(" ")[0] in (f"image_atom={best[i]}", f"text_atom={best[i]}"), (i, rows[i])
  # The image-only atoms fire with a fixed set of rows, so their learned atoms predict them cleanly;
  # text atoms compete with more actives per row (4 vs 2) and lose some rows to the Top-K cut.
  image_only = [i for i in content if truth.kinds[best[i]] == IMAGE]
  assert image_only and all(rows[i]["label_auroc"] > 0.95 for i in image_only), [rows[i] for i in image_only]
  assert np.median([rows[i]["label_auroc"] for i in content]) > 0.95
  assert set(summary["composition"]) == {"S_E", "S_A", "S_B"}  # no retrieval run: no removal set


def test_a_distractor_atom_is_content_free(tmp_path):
  """One distractor firing in 97% of the rows of both modalities, an SAE without a pre-bias (a
  pre-bias absorbs the distractor's mean, and its concept then fires on half the rows)."""
  from sae_jax.training import trainer

  config = synthetic_sae_config()
  config.data.synthetic.n_distractor = 1
  config.data.synthetic.distractor_prob = 0.97
  config.sae.pre_bias = "no"
  sae_dir = str(tmp_path / "sae")
  trainer.train_and_evaluate(config, sae_dir)
  loaded, truth, summary, data = _run_stage(config, sae_dir, str(tmp_path / "run"))
  cos = np.asarray(loaded.params["D"], np.float64) @ truth.distractors[0].astype(np.float64)
  learned = int(np.argmax(cos))  # the learned concept of the distractor atom
  row = data["concepts"][learned]
  assert row["category"] == "content-free", row
  assert row["fire_rate_image"] >= 0.9 and row["fire_rate_text"] >= 0.9
  assert "content-free" in summary["composition"]["S_E"]  # the distractor carries energy


def test_every_card_exists_with_its_histogram(planted_concepts):
  workdir, _, _, summary, data = planted_concepts
  ids = {c["id"] for c in data["cards"]}
  assert {0, 1} <= ids and len(ids) == summary["n_cards"]
  for i in ids:
    assert os.path.exists(os.path.join(workdir, "concepts", "cards", f"{i}.html"))
    assert os.path.getsize(os.path.join(workdir, "concepts", "cards", f"hist_{i}.png")) > 0


# ------------------------------------------------------------------------------ a real browser


def _chromium() -> tuple:
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  driver = shutil.which("chromedriver")
  if not browser or not driver:
    pytest.skip("chromium not found")
  return browser, driver


def _write_pages_with_thumbnails(root: str) -> str:
  """A small concepts/ of a shapes-like world: 30 pairs, 12 concepts, thumbnails from PNG files."""
  from PIL import Image

  from configs import base

  values, indices, _ = _random_codes(3, n=30, c=12, k=3)
  values[:, 0] = np.maximum(values[:, 0], 0.1)  # every row fires: no empty card
  os.makedirs(os.path.join(root, "images"))
  for r in range(30):
    Image.new("RGB", (16, 16), (8 * r, 100, 200)).save(os.path.join(root, "images", f"{r}.png"))
  sp = concept_stats.sparse_codes(values, indices, 12)
  top = concept_stats.top_rows(values, indices, 12, 4)
  rng = np.random.default_rng(0)
  conc = {k: rng.random(12) for k in ("energy", "modality_score", "bridge_score", "attribution")}
  sets = {"S_E": np.array([0, 1]), "S_A": np.array([2]), "S_B": np.array([1, 3])}
  labels = concepts.label_concepts(sp, sp, {}, 0.75, 0.9)
  cards = np.array([0, 1, 2, 3])
  result = dict(
    conc=conc,
    sets=sets,
    labels=labels,
    a_minus=rng.random(12),
    top_image=(top.values, np.maximum(top.rows, 0), top.rows >= 0),
    top_text=(top.values, top.rows, top.rows >= 0),
    codes=(sp, sp),
    cards=cards,
    nearest=concept_stats.nearest_by_cosine(rng.standard_normal((12, 8)), cards, 3),
    seconds={},
    truth=[],
  )
  rows = concepts.Rows(
    np.array([f"caption {r}" for r in range(30)]),
    np.arange(30),
    {r: os.path.join(root, "images", f"{r}.png") for r in range(30)},
  )
  out = os.path.join(root, "concepts")
  concepts.concepts_html.write_pages(out, base.concepts_section(), result, rows, np.zeros((12, 8)))
  return out


def test_pages_in_headless_chromium(tmp_path):
  browser, driver_path = _chromium()
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By

  out = _write_pages_with_thumbnails(str(tmp_path))
  opts = webdriver.ChromeOptions()
  opts.binary_location = browser
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    opts.add_argument(arg)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  drv = webdriver.Chrome(service=Service(driver_path), options=opts)
  try:
    drv.get("file://" + os.path.join(out, "index.html"))
    ids = lambda: [
      int(r.find_element(By.TAG_NAME, "td").text)
      for r in drv.find_elements(By.CSS_SELECTOR, "#concepts tbody tr")
    ]
    assert ids() == list(range(12))
    energy = [float(x) for x in drv.execute_script(
      "return Array.from(document.querySelectorAll('#concepts tbody tr')).map(r => r.cells[1].textContent)")]  # fmt: skip
    drv.find_elements(By.CSS_SELECTOR, "#concepts th")[1].click()  # energy, ascending
    assert ids() == [int(i) for i in np.argsort(energy, kind="stable")]
    drv.find_elements(By.CSS_SELECTOR, "#concepts th")[1].click()  # again: descending
    assert ids()[0] == int(np.argmax(energy))
    drv.find_element(By.LINK_TEXT, "0").click()  # the card of concept 0
    assert drv.title == "Concept 0"
    imgs = drv.find_elements(By.TAG_NAME, "img")
    assert len(imgs) >= 2  # thumbnails and the histogram
    widths = drv.execute_script(
      "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
    )
    assert all(w > 0 for w in widths), widths
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
  finally:
    drv.quit()
