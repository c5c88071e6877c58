"""M-BEIR extraction stage: encode query and candidate-pool records into pooled embeddings.

`run_mbeir_extraction(config, workdir)` encodes queries and candidates with `config.extract` and writes
`<workdir>/activations/mbeir_{queries,pool}_pooled_<variant>.npz` with `embeddings` [N, d], `ids` [N]
(str), `modality` [N] (str), `image_paths` [N] (str, '' for text records), plus
`mbeir_qrels.json` ({qid: [positive dids]}). Records whose image is missing or corrupt are skipped
and counted (`skipped` in `mbeir_summary.json`).
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from sae_jax import workdir as workdir_lib
from sae_jax.data import coco
from sae_jax.data.mbeir import MODALITIES, MBeirParquet, MBeirPool, MBeirQueries, read_parquet_qrels
from sae_jax.errors import SaeJaxError
from sae_jax.progress import Progress
from sae_jax.stages.pooled import check_variants, pool_batch


def encode_records(encoder, records, variants, batch_size: int, log_every_s: float = 10.0):
  """Pooled embeddings of M-BEIR records in their order; (arrays per variant, kept mask)."""
  n = len(records)
  out = {v: [None] * n for v in variants}
  kept = np.ones(n, bool)
  progress = Progress(n, "extract mbeir", log_every_s)
  for mod in MODALITIES:
    idx = [i for i, r in enumerate(records) if r["modality"] == mod]
    for s in range(0, len(idx), batch_size):
      group = idx[s : s + batch_size]
      images, ok = None, group
      if "image" in mod:
        loaded = []
        for i in group:
          try:
            loaded.append((i, coco.load_image(records[i]["image"])))
          except coco.ImageLoadError as e:
            logging.warning("mbeir: skipping record %s: %s", records[i]["id"], e)
            kept[i] = False
        ok = [i for i, _ in loaded]
        images = [im for _, im in loaded]
      progress.update(len(group))
      if not ok:
        continue
      texts = [records[i]["text"] for i in ok] if "text" in mod else None
      res = pool_batch(encoder.encode(images=images, texts=texts), variants)
      for v, arr in res.items():
        for j, i in enumerate(ok):
          out[v][i] = arr[j]
  progress.close()
  return {v: np.stack([a for a, k in zip(out[v], kept) if k]) if kept.any() else None for v in variants}, kept


def run_mbeir_extraction(config, workdir: str, encoder=None) -> dict:
  from sae_jax import encoders  # torch and transformers: the `extract` extra

  ex = config.extract
  if not ex.mbeir_queries and not ex.mbeir_pool and not ex.mbeir_parquet_dir:
    raise SaeJaxError('config.extract.dataset="mbeir" needs config.extract.mbeir_queries and/or mbeir_pool')
  encoder = encoder or encoders.load_encoder(ex)
  variants = check_variants(ex.pooling, encoder)
  act = os.path.join(workdir, "activations")
  os.makedirs(act, exist_ok=True)
  summary = {"skipped": {}, "counts": {}, "variants": list(variants), "model": ex.model_name}
  t0 = time.perf_counter()
  qrels = {}
  if ex.mbeir_parquet_dir:  # the authors' layout: query-/corpus-/qrels-*.parquet
    pq_dir = ex.mbeir_parquet_dir
    sources = [("queries", lambda p, _: MBeirParquet(p, "query"), pq_dir)]
    sources += [("pool", lambda p, _: MBeirParquet(p, "corpus"), pq_dir)]
    qrels = read_parquet_qrels(pq_dir)
  else:
    sources = [("queries", MBeirQueries, ex.mbeir_queries), ("pool", MBeirPool, ex.mbeir_pool)]
  for name, cls, path in sources:
    if not path:
      continue
    src = cls(path, ex.mbeir_image_root)
    if name == "queries" and not ex.mbeir_parquet_dir:
      qrels = {r["id"]: r["positives"] for r in src.records if r["positives"]}
    arrays, kept = encode_records(encoder, src.records, variants, int(ex.batch_size), float(ex.log_every_s))
    ids = np.array([r["id"] for r, k in zip(src.records, kept) if k])
    mods = np.array([r["modality"] for r, k in zip(src.records, kept) if k])
    # Image paths let retrieval find a CIRR query's own reference image among the candidates.
    paths = np.array(
      [r["image"].path if r["image"] is not None else "" for r, k in zip(src.records, kept) if k]
    )
    for v, emb in arrays.items():
      if emb is None:
        raise SaeJaxError(f"{path}: no record could be encoded (all images missing or corrupt)")
      workdir_lib.atomic_savez(
        os.path.join(act, f"mbeir_{name}_pooled_{v}.npz"),
        embeddings=emb,
        ids=ids,
        modality=mods,
        image_paths=paths,
        variant=np.array(v),
      )
    summary["skipped"][name] = int((~kept).sum())
    summary["counts"][name] = int(kept.sum())
  if qrels:
    workdir_lib.atomic_write_json(os.path.join(act, "mbeir_qrels.json"), qrels)
  summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
  workdir_lib.atomic_write_json(os.path.join(act, "mbeir_summary.json"), summary)
  return summary
