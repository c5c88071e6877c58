"""M-BEIR (UniIR) retrieval data: query jsonl, candidate-pool jsonl, qrels; and their extraction.

Records (one JSON object per line, as released by UniIR):
  query:     {"qid": "9:1", "query_txt": str|null, "query_img_path": str|null,
              "query_modality": "text"|"image"|"image,text", "pos_cand_list": ["9:2", ...], ...}
  candidate: {"did": "9:2", "txt": str|null, "img_path": str|null, "modality": ..., ...}
  qrels:     text lines "qid 0 did relevance [task_id]" (TREC style)
Image paths are relative to `image_root`. Sources are grain-compatible random-access sources whose
elements are dicts {'id', 'text', 'image' (coco.ImageRef or None), 'modality'}.

`run_mbeir_extraction(config, workdir)` encodes queries and candidates with `config.extract` and writes
`<workdir>/activations/mbeir_{queries,pool}_pooled_<variant>.npz` with `embeddings` [N, d], `ids` [N]
(str), `modality` [N] (str), `image_paths` [N] (str, '' for text records), plus `mbeir_qrels.json` ({qid: [positive dids]}). Records whose image is
missing or corrupt are skipped and counted (`skipped` in `mbeir_summary.json`).
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import numpy as np

from sae_jax.data import coco
from sae_jax.errors import SaeJaxError

MODALITIES = ('text', 'image', 'image,text')


def _read_jsonl(path: str, what: str) -> list[dict]:
  if not os.path.exists(path):
    raise SaeJaxError(f'{what}: {path} does not exist')
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise SaeJaxError(f'{what}: {path} line {n} is not valid JSON ({e.msg})') from None
  return out


class _MBeirSource:
  _id_key = _txt_key = _img_key = _mod_key = ''
  _what = ''

  def __init__(self, path: str, image_root: str = ''):
    self.path = path
    self.records = []
    for n, r in enumerate(_read_jsonl(path, self._what), 1):
      rid = r.get(self._id_key)
      mod = r.get(self._mod_key)
      if rid is None or mod not in MODALITIES:
        raise SaeJaxError(f'{self._what}: {path} record {n}: needs "{self._id_key}" and "{self._mod_key}" in '
                          f'{MODALITIES}, got {rid!r} / {mod!r}')
      text = r.get(self._txt_key)
      img = r.get(self._img_key)
      if 'text' in mod and (not isinstance(text, str) or not text.strip()):
        raise SaeJaxError(f'{self._what}: {path} record {rid}: modality {mod!r} but "{self._txt_key}" is empty')
      if 'image' in mod and not img:
        raise SaeJaxError(f'{self._what}: {path} record {rid}: modality {mod!r} but "{self._img_key}" is empty')
      ref = coco.ImageRef(n - 1, os.path.join(image_root, img)) if 'image' in mod else None
      self.records.append({'id': str(rid), 'text': text if 'text' in mod else None, 'image': ref,
                           'modality': mod, 'positives': [str(p) for p in r.get('pos_cand_list', []) or []]})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


class MBeirQueries(_MBeirSource):
  _id_key, _txt_key, _img_key, _mod_key = 'qid', 'query_txt', 'query_img_path', 'query_modality'
  _what = 'config.extract.mbeir_queries'


class MBeirPool(_MBeirSource):
  _id_key, _txt_key, _img_key, _mod_key = 'did', 'txt', 'img_path', 'modality'
  _what = 'config.extract.mbeir_pool'


def read_qrels(path: str) -> dict[str, list[str]]:
  """{qid: [did with relevance > 0]} from a TREC-style qrels file."""
  if not os.path.exists(path):
    raise SaeJaxError(f'qrels: {path} does not exist')
  out: dict[str, list[str]] = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) < 4:
        raise SaeJaxError(f'qrels: {path} line {n}: expected "qid 0 did relevance [task]", got {line.strip()!r}')
      if float(parts[3]) > 0:
        out.setdefault(parts[0], []).append(parts[2])
  return out


def encode_records(encoder, records, variants, batch_size: int, log_every_s: float = 10.0):
  """Pooled embeddings of M-BEIR records in their order; (arrays per variant, kept mask)."""
  from sae_jax.extract import Progress, pool_batch
  n = len(records)
  out = {v: [None] * n for v in variants}
  kept = np.ones(n, bool)
  progress = Progress(n, 'mbeir', log_every_s)
  for mod in MODALITIES:
    idx = [i for i, r in enumerate(records) if r['modality'] == mod]
    for s in range(0, len(idx), batch_size):
      group = idx[s:s + batch_size]
      images, ok = None, group
      if 'image' in mod:
        loaded = []
        for i in group:
          try:
            loaded.append((i, coco.load_image(records[i]['image'])))
          except coco.ImageLoadError as e:
            logging.warning('mbeir: skipping record %s: %s', records[i]['id'], e)
            kept[i] = False
        ok = [i for i, _ in loaded]
        images = [im for _, im in loaded]
      progress.update(len(group))
      if not ok:
        continue
      texts = [records[i]['text'] for i in ok] if 'text' in mod else None
      res = pool_batch(encoder.encode(images=images, texts=texts), variants)
      for v, arr in res.items():
        for j, i in enumerate(ok):
          out[v][i] = arr[j]
  progress.close()
  return {v: np.stack([a for a, k in zip(out[v], kept) if k]) if kept.any() else None
          for v in variants}, kept


def run_mbeir_extraction(config, workdir: str, encoder=None) -> dict:
  from sae_jax import encoders
  from sae_jax.extract import _atomic_json, _atomic_savez, check_variants
  ex = config.extract
  if not ex.mbeir_queries and not ex.mbeir_pool:
    raise SaeJaxError('config.extract.dataset="mbeir" needs config.extract.mbeir_queries and/or mbeir_pool')
  encoder = encoder or encoders.load_encoder(ex)
  variants = check_variants(ex.pooling, encoder)
  act = os.path.join(workdir, 'activations')
  os.makedirs(act, exist_ok=True)
  summary = {'skipped': {}, 'counts': {}, 'variants': list(variants), 'model': ex.model_name}
  t0 = time.perf_counter()
  qrels = {}
  for name, cls, path in (('queries', MBeirQueries, ex.mbeir_queries), ('pool', MBeirPool, ex.mbeir_pool)):
    if not path:
      continue
    src = cls(path, ex.mbeir_image_root)
    if name == 'queries':
      qrels = {r['id']: r['positives'] for r in src.records if r['positives']}
    arrays, kept = encode_records(encoder, src.records, variants, int(ex.batch_size), float(ex.log_every_s))
    ids = np.array([r['id'] for r, k in zip(src.records, kept) if k])
    mods = np.array([r['modality'] for r, k in zip(src.records, kept) if k])
    # Image paths let retrieval find a CIRR query's own reference image among the candidates.
    paths = np.array([r['image'].path if r['image'] is not None else '' for r, k in zip(src.records, kept)
                      if k])
    for v, emb in arrays.items():
      if emb is None:
        raise SaeJaxError(f'{path}: no record could be encoded (all images missing or corrupt)')
      _atomic_savez(os.path.join(act, f'mbeir_{name}_pooled_{v}.npz'), embeddings=emb, ids=ids,
                    modality=mods, image_paths=paths, variant=np.array(v))
    summary['skipped'][name] = int((~kept).sum())
    summary['counts'][name] = int(kept.sum())
  if qrels:
    _atomic_json(os.path.join(act, 'mbeir_qrels.json'), qrels)
  summary['elapsed_s'] = round(time.perf_counter() - t0, 3)
  _atomic_json(os.path.join(act, 'mbeir_summary.json'), summary)
  return summary
