"""M-BEIR (UniIR) retrieval data: query jsonl, candidate-pool jsonl, qrels; and their extraction.

Records (one JSON object per line, as released by UniIR):
  query:     {"qid": "9:1", "query_txt": str|null, "query_img_path": str|null,
              "query_modality": "text"|"image"|"image,text", "pos_cand_list": ["9:2", ...], ...}
  candidate: {"did": "9:2", "txt": str|null, "img_path": str|null, "modality": ..., ...}
  qrels:     text lines "qid 0 did relevance [task_id]" (TREC style)
Image paths are relative to `image_root`. Sources are grain-compatible random-access sources whose
elements are dicts {'id', 'text', 'image' (coco.ImageRef or None), 'modality'}.

The paper authors' evaluator reads each task as parquet files instead (`MBeirParquet`,
`read_parquet_qrels`): `query-*.parquet` and `corpus-*.parquet` with columns `id`, `text` (null when
the side has no text) and `image` ({'bytes': ...}, null when it has no image), and
`qrels-*.parquet` with `query-id`, `corpus-id` (and `score`, positives > 0, when present). The
modality of a row is what it holds. An in-memory image is labelled `sha1:<digest of its bytes>`, so
a query's own reference image is still recognised among the candidates (CIRR).

The extraction stage for these records is `sae_jax.stages.extract_mbeir`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from sae_jax.data import coco
from sae_jax.errors import SaeJaxError

MODALITIES = ("text", "image", "image,text")


def _read_jsonl(path: str, what: str) -> list[dict]:
  if not os.path.exists(path):
    raise SaeJaxError(f"{what}: {path} does not exist")
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise SaeJaxError(f"{what}: {path} line {n} is not valid JSON ({e.msg})") from None
  return out


class _MBeirSource:
  _id_key = _txt_key = _img_key = _mod_key = ""
  _what = ""

  def __init__(self, path: str, image_root: str = ""):
    self.path = path
    self.records = []
    for n, r in enumerate(_read_jsonl(path, self._what), 1):
      rid = r.get(self._id_key)
      mod = r.get(self._mod_key)
      if rid is None or mod not in MODALITIES:
        raise SaeJaxError(
          f'{self._what}: {path} record {n}: needs "{self._id_key}" and "{self._mod_key}" in '
          f"{MODALITIES}, got {rid!r} / {mod!r}"
        )
      text = r.get(self._txt_key)
      img = r.get(self._img_key)
      if "text" in mod and (not isinstance(text, str) or not text.strip()):
        raise SaeJaxError(
          f'{self._what}: {path} record {rid}: modality {mod!r} but "{self._txt_key}" is empty'
        )
      if "image" in mod and not img:
        raise SaeJaxError(
          f'{self._what}: {path} record {rid}: modality {mod!r} but "{self._img_key}" is empty'
        )
      ref = coco.ImageRef(n - 1, os.path.join(image_root, img)) if "image" in mod else None
      self.records.append(
        {
          "id": str(rid),
          "text": text if "text" in mod else None,
          "image": ref,
          "modality": mod,
          "positives": [str(p) for p in r.get("pos_cand_list", []) or []],
        }
      )

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


class MBeirQueries(_MBeirSource):
  _id_key, _txt_key, _img_key, _mod_key = "qid", "query_txt", "query_img_path", "query_modality"
  _what = "config.extract.mbeir_queries"


class MBeirPool(_MBeirSource):
  _id_key, _txt_key, _img_key, _mod_key = "did", "txt", "img_path", "modality"
  _what = "config.extract.mbeir_pool"


def read_qrels(path: str) -> dict[str, list[str]]:
  """{qid: [did with relevance > 0]} from a TREC-style qrels file."""
  if not os.path.exists(path):
    raise SaeJaxError(f"qrels: {path} does not exist")
  out: dict[str, list[str]] = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) < 4:
        raise SaeJaxError(
          f'qrels: {path} line {n}: expected "qid 0 did relevance [task]", got {line.strip()!r}'
        )
      if float(parts[3]) > 0:
        out.setdefault(parts[0], []).append(parts[2])
  return out


def _parquet_rows(directory: str, prefix: str, columns: tuple, what: str) -> list[dict]:
  """The rows of `<directory>/<prefix>-*.parquet` (sorted, concatenated) as dicts of `columns`."""
  import pyarrow.parquet as pq

  paths = sorted(glob.glob(os.path.join(directory, f"{prefix}-*.parquet")))
  if not paths:
    raise SaeJaxError(f"{what}: no {prefix}-*.parquet in {directory}")
  rows = []
  for path in paths:
    try:
      table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a bad file
      raise SaeJaxError(f"{what}: {path} is not a parquet file ({type(e).__name__})") from None
    names = table.column_names
    if columns[0] not in names or (prefix == "qrels" and columns[1] not in names):
      raise SaeJaxError(f"{what}: {path} has columns {names}; expected {list(columns)}")
    cols = {c: table.column(c).to_pylist() for c in columns if c in names}
    rows += [{c: cols[c][i] if c in cols else None for c in columns} for i in range(table.num_rows)]
  return rows


class MBeirParquet:
  """Queries (`kind="query"`) or candidates (`kind="corpus"`) of one task in the parquet layout."""

  def __init__(self, directory: str, kind: str):
    if kind not in ("query", "corpus"):
      raise SaeJaxError(f'MBeirParquet kind: expected "query" or "corpus", got {kind!r}')
    what = "config.extract.mbeir_parquet_dir"
    self.path = directory
    self.records = []
    for n, r in enumerate(_parquet_rows(directory, kind, ("id", "text", "image"), what)):
      text = r["text"] if isinstance(r["text"], str) and r["text"].strip() else None
      img = r["image"]
      data = img.get("bytes") if isinstance(img, dict) else img
      if text is None and not data:
        raise SaeJaxError(f"{what}: {kind} row {n} (id {r['id']!r}) has neither text nor image bytes")
      mod = ",".join(m for m, present in (("image", bool(data)), ("text", text is not None)) if present)
      ref = coco.ImageRef(n, f"sha1:{hashlib.sha1(data).hexdigest()}", data=data) if data else None
      self.records.append({"id": str(r["id"]), "text": text, "image": ref, "modality": mod, "positives": []})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def read_parquet_qrels(directory: str) -> dict[str, list[str]]:
  """{query id: [corpus ids]} from `qrels-*.parquet` (rows with `score` <= 0 dropped)."""
  out: dict[str, list[str]] = {}
  for r in _parquet_rows(
    directory, "qrels", ("query-id", "corpus-id", "score"), "config.extract.mbeir_parquet_dir"
  ):
    if r["score"] is None or float(r["score"]) > 0:
      out.setdefault(str(r["query-id"]), []).append(str(r["corpus-id"]))
  return out
