"""The evaluation protocol: the 5k test split, the authors' query samplers, the disjoint fit split,
the score denominator, the removal rules (ReAlign whitening and the rank cut of the removal SVD are
tested with the other projectors, in tests/test_projectors.py).

Every reference here is written independently from the protocol's description (NumPy only).
"""

import json
import os

import numpy as np
import pytest

from configs import base as base_cfg
from configs import qwen2vl_coco
from sae_jax import projectors
from sae_jax import retrieval as R
from sae_jax import retrieval_tasks as T
from sae_jax import workdir as workdir_lib
from sae_jax.data import coco, synthetic
from sae_jax.errors import SaeJaxError
from sae_jax.stages import retrieval_inputs, retrieve
from tests.helpers.reference import recall_reference

# ------------------------------------------------------------------------- the Karpathy 5k split


def _karpathy_json(tmp_path):
  """Two test images (one with 7 captions) and a train image, in the dataset_coco.json layout."""
  images = []
  for n, (cocoid, split, n_caps) in enumerate(
    ((391895, "test", 7), (522418, "train", 5), (184613, "test", 5))
  ):
    folder = "val2014" if split == "test" else "train2014"
    name = f"COCO_{folder}_{cocoid:012d}.jpg"
    os.makedirs(tmp_path / folder, exist_ok=True)
    (tmp_path / folder / name).write_bytes(b"")  # existence is what the reader checks
    sents = [{"raw": f"caption {j} of {cocoid}", "sentid": 100 * n + j} for j in range(n_caps)]
    images.append(
      {"filepath": folder, "filename": name, "cocoid": cocoid, "split": split, "sentences": sents}
    )
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"images": images}))
  return path


def test_karpathy_5k_split_keeps_five_captions_and_the_json_ids(tmp_path):
  path = _karpathy_json(tmp_path)
  config = qwen2vl_coco.get_config()
  ex = config.extract
  ex.karpathy_json = str(path)
  ex.eval_image_dir = str(tmp_path)
  ev = coco.eval_extract_config(ex)
  assert (ev.dataset, ev.karpathy_split, ev.captions_per_image, ev.write_shards) == (
    "karpathy",
    "test",
    5,
    False,
  )
  src = coco.open_paired(ev)
  assert [im.image_id for im in src.images] == [391895, 184613]  # cocoid, test split only, file order
  assert [c.image_id for c in src.captions] == [391895] * 5 + [184613] * 5  # 7 captions cut to the first 5
  assert [c.caption_id for c in src.captions] == [0, 1, 2, 3, 4, 200, 201, 202, 203, 204]
  assert src.captions[4].text == "caption 4 of 391895"
  assert src[5] == {
    "image_id": 184613,
    "caption_id": 200,
    "caption": "caption 0 of 184613",
    "image": src.image_by_id[184613],
  }
  assert src.image_by_id[184613].path == str(tmp_path / "val2014" / "COCO_val2014_000000184613.jpg")
  # 0 keeps every caption (the training split's default).
  assert len(coco.KarpathyJson(str(path), str(tmp_path), split="test").captions) == 12
  with pytest.raises(SaeJaxError) as e:
    ex.eval_dataset = "mbeir"
    coco.eval_extract_config(ex)
  assert "\n" not in str(e.value) and "config.extract.eval_dataset" in str(e.value)


# ------------------------------------------------------------------------------- query samplers


def _task(rng, n_q=40, n_c=90, d=8):
  """Queries with 0-3 positives each (some candidates nobody's positive), and an exclude column."""
  counts = rng.integers(1, 4, n_q)
  indices = np.concatenate([np.sort(rng.choice(n_c, c, replace=False)) for c in counts])
  indptr = np.concatenate([[0], np.cumsum(counts)])
  exclude = rng.integers(-1, n_c, n_q)
  q = rng.standard_normal((n_q, d)).astype(np.float32)
  c = rng.standard_normal((n_c, d)).astype(np.float32)
  return T.TaskData(q, c, indptr.astype(np.int64), indices.astype(np.int64), exclude.astype(np.int64))


def _qrels(data):
  """The task as the authors' tables: query ids, corpus ids, (query-id, corpus-id) rows."""
  qids = np.array([f"q{i:04d}" for i in range(data.n_queries)])
  cids = np.array([f"c{j:04d}" for j in range(data.n_candidates)])
  rows = [
    (qids[i], cids[j])
    for i in range(data.n_queries)
    for j in data.positives_indices[data.positives_indptr[i] : data.positives_indptr[i + 1]]
  ]
  return qids, cids, rows


def _authors_sample(qids, cids, rows, n, seed):
  """`sample_dataset`: seeded choice of query ids; queries, qrels and corpus filtered by membership."""
  np.random.seed(seed)
  picked = set(np.random.choice(np.unique(qids), size=min(n, len(qids)), replace=False))
  rows = [r for r in rows if r[0] in picked]
  keep_c = {r[1] for r in rows}
  return [q for q in qids if q in picked], [c for c in cids if c in keep_c], rows


def _authors_one_to_one(qids, cids, rows, n, seed):
  """`sample_dataset_one_to_one`: first qrel per query (by query id), duplicate corpus ids dropped."""
  np.random.seed(seed)
  picked = set(np.random.choice(np.unique(qids), size=min(n, len(qids)), replace=False))
  first = {}
  for qid, cid in rows:
    if qid in picked and qid not in first:
      first[qid] = cid
  kept, seen = [], set()
  for qid in sorted(first):
    if first[qid] not in seen:
      seen.add(first[qid])
      kept.append((qid, first[qid]))
  keep_q = {q for q, _ in kept}
  return [q for q in qids if q in keep_q], [c for c in cids if c in seen], kept


def _check_against(sub, data, qids, cids, ref_q, ref_c, ref_rows):
  q_row = {q: i for i, q in enumerate(qids)}
  c_row = {c: j for j, c in enumerate(cids)}
  np.testing.assert_array_equal(sub.queries, data.queries[[q_row[q] for q in ref_q]])
  np.testing.assert_array_equal(sub.candidates, data.candidates[[c_row[c] for c in ref_c]])
  new_c = {c: j for j, c in enumerate(ref_c)}
  for i, qid in enumerate(ref_q):
    want = sorted(new_c[c] for q, c in ref_rows if q == qid)
    got = sorted(sub.positives_indices[sub.positives_indptr[i] : sub.positives_indptr[i + 1]].tolist())
    assert got == want, qid
    old_ex = data.exclude[q_row[qid]]
    assert sub.exclude[i] == (new_c.get(cids[old_ex], -1) if old_ex >= 0 else -1)


@pytest.mark.parametrize("n", [15, 40, 1000])
def test_random_restrict_pool_matches_the_authors_sampler(n):
  data = _task(np.random.default_rng(3))
  qids, cids, rows = _qrels(data)
  sub = data.subset(n, "random_restrict_pool", 42)
  ref_q, ref_c, ref_rows = _authors_sample(qids, cids, rows, n, 42)
  assert sub.n_queries == min(n, 40) and sub.n_candidates == len(ref_c) < data.n_candidates
  _check_against(sub, data, qids, cids, ref_q, ref_c, ref_rows)
  # Another seed draws other queries; "first" keeps the whole pool.
  assert not np.array_equal(
    data.subset(15, "random_restrict_pool", 0).queries, data.subset(15, "random_restrict_pool", 42).queries
  )
  assert data.subset(15, "first").n_candidates == data.n_candidates
  # Recall on the subset: the same as a dense reference over the authors' arrays.
  ks = (1, 5)
  rec = retrieve.evaluate_task(sub, ks, exclude_reference=False)
  sim = R.l2_normalize(sub.queries.astype(np.float64)) @ R.l2_normalize(sub.candidates.astype(np.float64)).T
  ref = recall_reference(sim, sub.positives_indptr, sub.positives_indices, ks)
  assert rec["R@1"] == pytest.approx(ref["R@1"]) and rec["R@5"] == pytest.approx(ref["R@5"])


def test_one_to_one_matches_the_authors_sampler():
  data = _task(np.random.default_rng(4), n_q=60, n_c=30)  # small pool: many first positives collide
  qids, cids, rows = _qrels(data)
  sub = data.subset(50, "one_to_one", 42)
  ref_q, ref_c, ref_rows = _authors_one_to_one(qids, cids, rows, 50, 42)
  assert sub.n_queries == len(ref_q) < 50 and sub.n_candidates == sub.n_queries
  assert np.all(np.diff(sub.positives_indptr) == 1)
  _check_against(sub, data, qids, cids, ref_q, ref_c, ref_rows)
  with pytest.raises(SaeJaxError) as e:
    data.subset(5, "random")
  assert "\n" not in str(e.value) and "config.retrieval.subset" in str(e.value)


def test_denominator_counts_queries_without_positives_as_misses():
  rng = np.random.default_rng(5)
  n_c, d = 20, 6
  pool = {
    "embeddings": rng.standard_normal((n_c, d)).astype(np.float32),
    "ids": np.array([f"c{j}" for j in range(n_c)]),
    "modality": np.array(["text"] * n_c),
  }
  queries = {
    "embeddings": pool["embeddings"][:10] + 0.01,  # query i is closest to candidate i
    "ids": np.array([f"q{i}" for i in range(10)]),
    "modality": np.array(["image"] * 10),
  }
  # Queries 0-5 have their own candidate as positive; 6-9 point at ids missing from the pool.
  qrels = {f"q{i}": [f"c{i}"] if i < 6 else ["missing"] for i in range(10)}
  kept = T.mbeir_task_arrays(queries, pool, qrels, keep_unscorable=True)
  dropped = T.mbeir_task_arrays(queries, pool, qrels)
  all_q = T.explicit_task(kept, "image_to_text")
  scorable = T.explicit_task(dropped, "image_to_text")
  assert (all_q.n_queries, all_q.n_unscorable, scorable.n_queries) == (10, 4, 6)
  assert retrieve.evaluate_task(all_q, (1,), allow_unscorable=True)["R@1"] == pytest.approx(60.0)
  assert retrieve.evaluate_task(scorable, (1,))["R@1"] == pytest.approx(100.0)
  assert retrieve.evaluate_task(all_q.scorable(), (1,))["R@1"] == pytest.approx(100.0)
  with pytest.raises(SaeJaxError) as e:
    retrieve.evaluate_task(all_q, (1,))
  assert "\n" not in str(e.value) and "has no positives" in str(e.value)


# ------------------------------------------------------------------------ fit split, removal_by


def _write_pooled(path, src, n_images, seed, first_id):
  pairs = src.paired(n_images, seed=seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir_lib.atomic_savez(
    path,
    image=pairs.image,
    text=pairs.text,
    sample_ids=np.arange(n_images) + first_id,
    image_ids=np.arange(n_images) + first_id,
  )
  return pairs


def test_fit_split_is_disjoint_and_recorded(trained_sae, tmp_path):
  config = trained_sae.config()
  src = synthetic.PlantedSource(config.data.synthetic)
  act = tmp_path / "activations"
  train = _write_pooled(str(act / "pooled_mean.npz"), src, 600, seed=11, first_id=10_000)
  _write_pooled(str(act / "eval" / "pooled_mean.npz"), src, 300, seed=12, first_id=0)
  r = config.retrieval
  r.source, r.split, r.fit_on = "pooled", "eval", "train"
  r.attribution, r.sae_workdir = "sae", trained_sae.workdir
  r.variants, r.tasks = ("mean",), ("image_to_text",)
  r.removal_fraction, r.removal_rank = 0.015, -1
  r.removal_compare = ("energy", "abs_attribution")
  r.sweep_ranks = (1, 2)
  r.whitening = False
  res = retrieve.run_retrieval(config, str(tmp_path))["image_to_text"]
  s = res["mean+removal"]["settings"]
  assert s["fit_on"] == "train" and s["fit_split"] == str(act / "pooled_mean.npz")
  assert s["eval_split"] == str(act / "eval" / "pooled_mean.npz")
  assert (s["fit_disjoint"], s["fit_rows_sharing_eval_images"], s["fit_pairs"]) == (True, 0, 600)
  assert res["mean"]["n_queries"] == 300
  assert (s["mbeir_task"], s["authors_task"]) == (3, 4)  # image_to_text in both numberings
  # The removed atoms are the top ones by attribution over the TRAINING pairs; the other rules too.
  loaded = workdir_lib.load_sae(trained_sae.workdir)
  scores = retrieval_inputs.concept_scores_from_sae(
    loaded.params, loaded.k, train.image, train.text, spec=loaded.spec
  )
  proj = projectors.Projector.load(str(tmp_path / "retrieval" / "removal_projector.npz"))
  assert proj.info["atoms"] == projectors.top_fraction(scores["attribution"], 0.015).tolist()
  for rule in ("energy", "abs_attribution"):
    rec = res[f"mean+removal_by_{rule}"]
    assert rec["settings"]["removal_by"] == rule
  sweep = json.loads((tmp_path / "retrieval" / "rank_sweep.json").read_text())
  assert sorted(sweep["by_rule"]) == ["abs_attribution", "attribution", "energy"]
  assert sweep["by_rule"]["attribution"]["metrics"] == sweep["metrics"]
  full = sweep["ranks"].index(4)  # r = all 4 selected atoms: the same as the scored removal
  for rule, name in (("attribution", "mean+removal"), ("energy", "mean+removal_by_energy")):
    assert sweep["by_rule"][rule]["metrics"]["R@1"][full] == pytest.approx(res[name]["R@1"])
  # Overlapping image ids are reported; the same file for both is refused.
  _write_pooled(str(act / "pooled_mean.npz"), src, 600, seed=11, first_id=0)
  res = retrieve.run_retrieval(config, str(tmp_path))["image_to_text"]
  assert res["mean+removal"]["settings"]["fit_disjoint"] is False
  assert res["mean+removal"]["settings"]["fit_rows_sharing_eval_images"] == 300
  r.split = "train"
  with pytest.raises(SaeJaxError) as e:
    retrieve.run_retrieval(config, str(tmp_path))
  assert "\n" not in str(e.value) and 'fit_on="train"' in str(e.value)
  # No training split on disk and no concepts.npz: one line naming the missing file.
  r.split = "eval"
  os.remove(act / "pooled_mean.npz")
  with pytest.raises(SaeJaxError) as e:
    retrieve.run_retrieval(config, str(tmp_path))
  assert "\n" not in str(e.value) and f"{act / 'pooled_mean.npz'} is missing" in str(e.value)


def test_mbeir_files_are_read_with_the_eval_split(tmp_path):
  rng = np.random.default_rng(10)
  act = tmp_path / "activations"
  act.mkdir()
  emb = rng.standard_normal((12, 6)).astype(np.float32)
  np.savez(
    act / "mbeir_queries_pooled_mean.npz",
    embeddings=emb[:4] + 0.01,
    ids=np.array(["q0", "q1", "q2", "q3"]),
    modality=np.array(["image"] * 4),
  )
  np.savez(
    act / "mbeir_pool_pooled_mean.npz",
    embeddings=emb,
    ids=np.array([f"c{j}" for j in range(12)]),
    modality=np.array(["text"] * 12),
  )
  (act / "mbeir_qrels.json").write_text(json.dumps({f"q{i}": [f"c{i}"] for i in range(4)}))
  config = base_cfg.get_config()
  r = config.retrieval
  r.source, r.split, r.variants, r.tasks = "pooled", "eval", ("mean",), ("image_to_text",)
  r.removal, r.whitening, r.ks = False, False, (1,)
  res = retrieve.run_retrieval(config, str(tmp_path))["image_to_text"]["mean"]
  assert (res["n_queries"], res["n_candidates"], res["R@1"]) == (4, 12, 100.0)


def test_synthetic_fit_on_is_recorded():
  config = base_cfg.get_config()
  r = config.retrieval
  for fit_on, disjoint in (("auto", True), ("train", True), ("eval", False)):
    r.fit_on = fit_on
    inputs = retrieve.load_inputs(config, "/nonexistent")
    assert inputs.fit_info["fit_disjoint"] is disjoint
    fit_img = inputs.fit_pairs[0]
    same = fit_img.shape == inputs.variants["mean"]["image"].shape and np.array_equal(
      fit_img, inputs.variants["mean"]["image"]
    )
    assert same is (not disjoint)
  r.fit_on = "test"
  with pytest.raises(SaeJaxError) as e:
    retrieve.load_inputs(config, "/nonexistent")
  assert "\n" not in str(e.value) and "config.retrieval.fit_on" in str(e.value)


# ------------------------------------------------------------------ the authors' parquet layout


def test_mbeir_parquet_layout_extracts_and_scores(coco_mini, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  from configs import qwen2vl_coco
  from sae_jax import encoders
  from sae_jax.data import mbeir
  from sae_jax.stages import extract_mbeir

  images = sorted((coco_mini / "images").iterdir())[:4]
  raw = [p.read_bytes() for p in images]
  d = tmp_path / "cirr"
  d.mkdir()
  # CIRR-like: (reference image, edit text) -> target image; the corpus also holds each reference.
  pq.write_table(
    pa.table(
      {
        "id": ["q0", "q1"],
        "text": ["make it red", "add a dog"],
        "image": [{"bytes": raw[0]}, {"bytes": raw[1]}],
      }
    ),
    d / "query-00000-of-00001.parquet",
  )
  for n, part in enumerate(((0, 1), (2, 3))):
    pq.write_table(
      pa.table(
        {"id": [f"c{j}" for j in part], "text": [None, None], "image": [{"bytes": raw[j]} for j in part]}
      ),
      d / f"corpus-0000{n}-of-00002.parquet",
    )
  pq.write_table(
    pa.table({"query-id": ["q0", "q1", "q1"], "corpus-id": ["c2", "c3", "c0"], "score": [1, 1, 0]}),
    d / "qrels-00000-of-00001.parquet",
  )
  corpus = mbeir.MBeirParquet(str(d), "corpus")
  assert [r["id"] for r in corpus.records] == ["c0", "c1", "c2", "c3"]
  assert {r["modality"] for r in corpus.records} == {"image"}
  queries = mbeir.MBeirParquet(str(d), "query")
  assert [r["modality"] for r in queries.records] == ["image,text"] * 2
  assert queries.records[0]["image"].path == corpus.records[0]["image"].path  # same bytes, same label
  assert mbeir.read_parquet_qrels(str(d)) == {"q0": ["c2"], "q1": ["c3"]}

  cfg = qwen2vl_coco.get_config("tiny")
  cfg.extract.dataset, cfg.extract.mbeir_parquet_dir, cfg.extract.pooling = "mbeir", str(d), ("mean",)
  enc = encoders.load_encoder(cfg.extract)
  summary = extract_mbeir.run_mbeir_extraction(cfg, str(tmp_path / "wd"), encoder=enc)
  assert summary["counts"] == {"queries": 2, "pool": 4}
  act = tmp_path / "wd" / "activations"
  with np.load(act / "mbeir_queries_pooled_mean.npz") as q, np.load(act / "mbeir_pool_pooled_mean.npz") as c:
    arrays = T.mbeir_task_arrays(
      {k: q[k] for k in q.files}, {k: c[k] for k in c.files}, {"q0": ["c2"], "q1": ["c3"]}
    )
  assert arrays["image_text_to_image__exclude"].tolist() == [0, 1]  # each query's own reference image
  assert arrays["image_text_to_image__positives_indices"].tolist() == [2, 3]


# ----------------------------------------------------------------- energy weighting (analysis)


def test_energy_weighting_unique_images(trained_sae, tmp_path):
  from sae_jax.stages import analyze
  from tests.helpers.reference import dense_codes

  config = trained_sae.config()
  src = synthetic.PlantedSource(config.data.synthetic)
  pairs = src.paired(480, seed=21)
  # 60 images with 1..7 captions each: uneven repetition, so the two weightings differ.
  reps = np.random.default_rng(9).integers(1, 8, 60)
  image_ids = np.repeat(np.arange(60), reps)
  n = image_ids.size
  path = str(tmp_path / "pooled_mean.npz")
  np.savez(
    path, image=pairs.image[image_ids], text=pairs.text[:n], sample_ids=np.arange(n), image_ids=image_ids
  )
  energy = {}
  for weighting in ("pairs", "unique_images"):
    cfg = trained_sae.config()
    a = cfg.analysis
    a.sae_workdir, a.embeddings_path, a.source = trained_sae.workdir, path, "pooled"
    a.top_pairs, a.save_codes, a.energy_weighting = 0, True, weighting
    summary = analyze.run_analysis(cfg, str(tmp_path / weighting))
    assert summary["energy_weighting"] == weighting
    out = tmp_path / weighting / "analysis"
    assert "0.6831 is no Jaccard index" in (out / "table1.md").read_text()
    with np.load(out / "concepts.npz") as conc, np.load(out / "codes.npz") as codes:
      c = conc["energy"].shape[0]
      img = dense_codes(codes["image_values"], codes["image_indices"], c)
      txt = dense_codes(codes["text_values"], codes["text_indices"], c)
      energy[weighting] = conc["energy"]
      first = np.unique(image_ids, return_index=True)[1]
      img_mean = img.mean(0) if weighting == "pairs" else img[first].mean(0)
      np.testing.assert_allclose(conc["energy"], (img_mean + txt.mean(0)) / 2, rtol=1e-4, atol=1e-7)
  assert np.abs(energy["pairs"] - energy["unique_images"]).max() > 1e-3
  cfg.analysis.energy_weighting = "images"
  with pytest.raises(SaeJaxError) as e:
    analyze.run_analysis(cfg, str(tmp_path / "bad"))
  assert "\n" not in str(e.value) and "config.analysis.energy_weighting" in str(e.value)


# ---------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize(
  "family,prefix",
  [
    ("qwen2_vl", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"),
    ("qwen3_vl", "<|im_start|>user\n"),
  ],
)
def test_chat_template_scaffold_is_typed_special(family, prefix):
  from PIL import Image

  from configs import qwen2vl_coco
  from sae_jax import encoders
  from sae_jax.data import shards

  special, image, text, prompt = (shards.TOKEN_TYPES.index(t) for t in ("special", "image", "text", "prompt"))
  cfg = qwen2vl_coco.get_config("tiny").extract
  cfg.model_name = f"tiny:{family}"
  assert not cfg.chat_template and qwen2vl_coco.get_config().extract.chat_template
  plain = encoders.load_encoder(cfg)
  cfg.chat_template = True
  chat = encoders.load_encoder(cfg)
  tok = chat.tokenizer
  suffix = "<|im_end|>\n<|im_start|>assistant\n"
  pre = tok(prefix, add_special_tokens=False)["input_ids"]
  suf = tok(suffix, add_special_tokens=False)["input_ids"]
  img = Image.new("RGB", (56, 56), (200, 30, 30))
  for kw in ({"images": [img]}, {"texts": ["a red square on a table"]}, {"images": [img], "texts": ["red"]}):
    ids0, mask0, types0, _ = plain.build(**kw)
    ids1, mask1, types1, _ = chat.build(**kw)
    ids0, types0 = ids0[0][mask0[0] > 0].tolist(), types0[0][mask0[0] > 0].tolist()
    ids1, types1 = ids1[0][mask1[0] > 0].tolist(), types1[0][mask1[0] > 0].tolist()
    # The chat sequence is the plain one inside the scaffold; the scaffold's tokens are all special
    # (its words "system", "user", "assistant" too), the rest keeps its types.
    assert ids1 == pre + ids0 + suf, kw
    assert types1 == [special] * len(pre) + types0 + [special] * len(suf)
    assert tok.decode(ids1[: len(pre)]) == prefix and tok.decode(ids1[len(ids1) - len(suf) :]) == suffix
    assert ("images" in kw) == (image in types1) and ("texts" in kw) == (text in types1) and prompt in types1


@pytest.mark.parametrize("family", ["paligemma", "chameleon", "clip"])
def test_chat_template_elsewhere_is_one_line(family):
  from configs import qwen2vl_coco
  from sae_jax import encoders

  cfg = qwen2vl_coco.get_config("tiny").extract
  cfg.model_name, cfg.chat_template = f"tiny:{family}", True
  with pytest.raises(SaeJaxError) as e:
    encoders.load_encoder(cfg)
  assert "\n" not in str(e.value) and "config.extract.chat_template=True" in str(e.value)


def test_chat_template_recorded_in_pooled_files_and_summary(coco_mini, tmp_path):
  from configs import qwen2vl_coco
  from sae_jax.stages import extract as extract_stage

  config = qwen2vl_coco.get_config("tiny")
  ex = config.extract
  ex.chat_template, ex.max_images, ex.write_shards, ex.pooling = True, 2, False, ("mean",)
  summary = extract_stage.run_extraction(config, str(tmp_path))
  assert summary["chat_template"] is True
  with np.load(tmp_path / "activations" / "pooled_mean.npz") as z:
    assert bool(z["chat_template"])
  assert json.loads((tmp_path / "activations" / "summary.json").read_text())["chat_template"] is True
  assert json.loads((tmp_path / "activations" / "extract_config.json").read_text())["chat_template"] is True


def test_table1_resampled_over_pair_subsets(trained_sae, tmp_path):
  from sae_jax import metrics
  from sae_jax.stages import analyze
  from tests.helpers.reference import concept_reference

  cfg = trained_sae.config()
  a = cfg.analysis
  a.sae_workdir, a.source, a.num_pairs, a.top_pairs, a.save_codes = (
    trained_sae.workdir,
    "synthetic",
    600,
    0,
    True,
  )
  a.table1_resamples, a.table1_resample_fraction = 3, 0.5
  a.top_fraction = 0.1  # 26 of 256 concepts: sets that overlap, and overlaps that vary between subsets
  summary = analyze.run_analysis(cfg, str(tmp_path / "run"))
  out = tmp_path / "run" / "analysis"
  row = json.loads((out / "table1.json").read_text())["rows"][0]
  res = row["table1_resampled"]
  assert (res["resamples"], res["pairs_per_resample"], res["seed"]) == (3, 300, a.pair_seed)
  # Independent recomputation: the same draws, dense codes, M = D D^T, the diag bridge score.
  with np.load(out / "codes.npz") as z, np.load(out / "concepts.npz") as conc:
    iv, ii, tv, ti, D = z["image_values"], z["image_indices"], z["text_values"], z["text_indices"], conc["D"]
  rng = np.random.default_rng(a.pair_seed)
  got = []
  for _ in range(3):
    idx = np.sort(rng.choice(600, size=300, replace=False))
    ref = concept_reference(D, (iv[idx], ii[idx]), (tv[idx], ti[idx]))
    got.append(metrics.table1(ref["energy"], ref["attribution"], ref["diag"], a.top_fraction))
  for k in ("J(S_E,S_A)", "J(S_E,S_B)", "J(S_A,S_B)", "triple_overlap"):
    vals = np.array([g[k] for g in got])
    assert res["mean"][k] == pytest.approx(vals.mean()) and res["std"][k] == pytest.approx(vals.std(ddof=1))
  assert "random subsets of 300 pairs" in (out / "table1.md").read_text()
  assert max(res["std"].values()) > 0  # the subsets do differ
  assert summary["table1"] == {k: row[k] for k in summary["table1"]}
