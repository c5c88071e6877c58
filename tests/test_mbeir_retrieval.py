"""M-BEIR extraction output (queries, pool, qrels) -> retrieval tasks, with the CIRR exclusion."""

import json

import numpy as np
import pytest

from configs import base
from sae_jax import retrieval_tasks as T
from sae_jax.errors import SaeJaxError
from sae_jax.stages import retrieve
from tests.helpers.reference import recall_reference


def _mbeir_arrays(rng, d=16, n_q=30, n_c=50):
  pool = {
    "embeddings": rng.standard_normal((n_c, d)).astype(np.float32),
    "ids": np.array([f"9:{j}" for j in range(n_c)]),
    "modality": np.array(["image"] * n_c),
    "image_paths": np.array([f"img/{j}.jpg" for j in range(n_c)]),
  }
  ref = rng.integers(0, n_c, n_q)
  # The query embedding sits next to its own reference image: without the exclusion that
  # reference wins rank 1, the CIRR failure mode the convention removes.
  target = (ref + 1 + np.arange(n_q) % 3) % n_c
  mix = 0.65 * pool["embeddings"][ref] + 0.35 * pool["embeddings"][target]
  queries = {
    "embeddings": mix + 0.01 * rng.standard_normal((n_q, d)).astype(np.float32),
    "ids": np.array([f"7:{i}" for i in range(n_q)]),
    "modality": np.array(["image,text"] * n_q),
    "image_paths": np.array([f"img/{j}.jpg" for j in ref]),
  }
  qrels = {
    f"7:{i}": [f"9:{(ref[i] + 1 + i % 3) % n_c}"] + ([f"9:{(ref[i] + 7) % n_c}"] if i % 2 else [])
    for i in range(n_q - 1)
  }  # the last query has no qrels: it is dropped
  qrels["7:0"].append("9:999")  # a positive outside the pool is ignored
  return queries, pool, qrels, ref


def test_mbeir_arrays_infer_task_positives_and_exclusion():
  rng = np.random.default_rng(0)
  queries, pool, qrels, ref = _mbeir_arrays(rng)
  arrays = T.mbeir_task_arrays(queries, pool, qrels)
  task = "image_text_to_image"
  assert set(arrays) == {
    f"{task}__{k}" for k in ("queries", "candidates", "positives_indptr", "positives_indices", "exclude")
  }
  assert arrays[f"{task}__queries"].shape == (29, 16)
  np.testing.assert_array_equal(arrays[f"{task}__exclude"], ref[:29])
  indptr, indices = arrays[f"{task}__positives_indptr"], arrays[f"{task}__positives_indices"]
  for i in range(29):
    want = sorted({(ref[i] + 1 + i % 3) % 50} | ({(ref[i] + 7) % 50} if i % 2 else set()))
    assert indices[indptr[i] : indptr[i + 1]].tolist() == want


def test_stage_reads_mbeir_files_and_matches_reference(tmp_path):
  rng = np.random.default_rng(1)
  queries, pool, qrels, ref = _mbeir_arrays(rng)
  act = tmp_path / "activations"
  act.mkdir()
  np.savez(act / "mbeir_queries_pooled_mean.npz", **queries)
  np.savez(act / "mbeir_pool_pooled_mean.npz", **pool)
  (act / "mbeir_qrels.json").write_text(json.dumps(qrels))
  config = base.get_config()
  config.data.source = "shards"
  config.retrieval.variants = ("mean",)
  config.retrieval.tasks = ("image_text_to_image",)
  config.retrieval.removal = False
  config.retrieval.whitening = False
  config.retrieval.denominator = "scorable"  # the reference below drops queries without positives
  results = retrieve.run_retrieval(config, str(tmp_path))
  got = results["image_text_to_image"]["mean"]
  arrays = T.mbeir_task_arrays(queries, pool, qrels)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  q = unit(np.asarray(arrays["image_text_to_image__queries"], np.float64))
  c = unit(np.asarray(pool["embeddings"], np.float64))
  want = recall_reference(
    q @ c.T,
    arrays["image_text_to_image__positives_indptr"],
    arrays["image_text_to_image__positives_indices"],
    (1, 5, 10),
    exclude=arrays["image_text_to_image__exclude"],
  )
  for k in (1, 5, 10):
    assert got[f"R@{k}"] == pytest.approx(want[f"R@{k}"])  # both in percent
  # Without the exclusion each query finds its own reference image first.
  no_ex = recall_reference(
    q @ c.T,
    arrays["image_text_to_image__positives_indptr"],
    arrays["image_text_to_image__positives_indices"],
    (1,),
  )
  assert no_ex["R@1"] < 20 < want["R@1"]
  assert got["n_queries"] == 29 and got["settings"]["exclude_reference"] is True


def test_mbeir_errors():
  rng = np.random.default_rng(2)
  queries, pool, qrels, _ = _mbeir_arrays(rng)
  with pytest.raises(SaeJaxError, match="no query has a positive candidate in the pool"):
    T.mbeir_task_arrays(queries, pool, {})
  mixed = dict(queries, modality=np.array(["image"] + ["image,text"] * 29))
  with pytest.raises(SaeJaxError, match="match no task"):
    T.mbeir_task_arrays(mixed, pool, qrels)
