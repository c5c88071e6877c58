"""Activation extraction: a VLM over a paired dataset -> training shards + pooled embeddings.

`run_extraction(config, workdir)` (driven by `config.extract`, see configs/base.py) writes under
`<workdir>/activations/`:

  shards/                 token-level activations in the `sae_jax.activations.v1` format
                          (`sae_jax.data.shards.ShardWriter`), one row per kept token, with
                          `token_types` (0 special, 1 image, 2 text, 3 prompt) and `sample_ids`
                          (the COCO image id for rows of image inputs, CAPTION_ID_OFFSET = 2**40 +
                          the caption id for rows of caption inputs). Contrastive models (CLIP/SigLIP) write one row per sample:
                          its final embedding (what the paper's contrastive SAEs train on).
                          With `shard_rows="pooled"` a decoder also writes one row per sample: its
                          `pooling[0]` vector (type 1 image, 2 caption), the rows an SAE applied to
                          pooled embeddings should train on.
  pooled_<variant>.npz    one file per `config.extract.pooling` variant, arrays
                            image [N, d], text [N, d]  matched by row (row i = one image-caption pair)
                            sample_ids [N] (= caption_ids), image_ids [N], caption_ids [N], captions [N]
                            image_unique [M, d], image_unique_ids [M]  (each image once)
                            modality ['image', 'text'] (the keys holding each modality), pairing
                          With `pairing="all"` (default) there is one row per image-caption pair, the
                          image embedding repeated for each of its captions (55 rows for 11 COCO images
                          with 5 captions each); `pairing="first"` keeps each image's first caption.
  summary.json            counts (images, captions, skipped missing/corrupt, rows), throughput.

Images and captions are encoded separately (image-only and text-only prompts from
`config.extract.templates`), images first. Work is cut into chunks of `chunk_size` samples; each
finished chunk leaves a small part file, and the shard writer only publishes whole shards, so a
killed run resumes: finished chunks are skipped, and the rows of a re-run chunk that are already
in finished shards are not written twice. Missing images are skipped when the source is opened and
corrupt ones when decoded; both are counted (and their captions dropped from the pairs).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
import time
from typing import Optional

import numpy as np
from absl import logging

from sae_jax import config_utils, preemption
from sae_jax import workdir as workdir_lib
from sae_jax.data import coco, paired
from sae_jax.data import shards as shards_lib
from sae_jax.errors import SaeJaxError
from sae_jax.progress import Progress
from sae_jax.stages import extract_mbeir, extract_parts
from sae_jax.stages.pooled import check_variants, pool_batch

# Shard `sample_ids`: the image id for rows of image inputs, CAPTION_ID_OFFSET + caption id for rows
# of caption inputs (COCO image and caption ids overlap, so they need disjoint ranges).
CAPTION_ID_OFFSET = 1 << 40


class _Deferred:
  """`submit` that runs the job when its result is asked for (in the caller's thread)."""

  class _Result:
    def __init__(self, fn, args):
      self.fn, self.args = fn, args

    def result(self):
      return self.fn(*self.args)

  def submit(self, fn, *args):
    return self._Result(fn, args)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


class _Chunk:
  """One resumable unit: `kind` ('image' | 'text'), its position and item list."""

  def __init__(self, kind, index, items):
    self.kind, self.index, self.items = kind, index, items

  @property
  def name(self):
    return f"{self.kind}-{self.index:05d}"


def _fingerprint(ex, encoder) -> dict:
  keys = (
    "model_name",
    "family",
    "layer",
    "dataset",
    "captions_json",
    "image_dir",
    "karpathy_json",
    "karpathy_split",
    "parquet_files",
    "max_images",
    "pooling",
    "templates",
    "contrastive_tokens",
    "write_shards",
    "shard_token_types",
    "shard_dtype",
    "rows_per_shard",
    "chunk_size",
    "tiny_scale",
    "pairing",
  )
  fp = {}
  for k in keys:
    v = ex[k]
    if hasattr(v, "to_dict"):
      v = v.to_dict()
    fp[k] = list(v) if isinstance(v, tuple) else v
  if ex.dataset == "tfds":  # only for it, so earlier extractions keep their fingerprint
    fp.update(tfds_name=ex.tfds_name, tfds_split=ex.tfds_split, tfds_data_dir=ex.tfds_data_dir)
  if int(ex.captions_per_image):  # only when set, so earlier extractions keep their fingerprint
    fp["captions_per_image"] = int(ex.captions_per_image)
  if bool(ex.chat_template):
    fp["chat_template"] = True
  if str(ex.shard_rows) != "tokens":  # only when set, so earlier extractions keep their fingerprint
    fp["shard_rows"] = str(ex.shard_rows)
  fp["d"] = encoder.d
  fp["family_resolved"] = encoder.family
  return fp


class Extractor:
  """Holds the encoder, the shard writer and the resume bookkeeping of one extraction run."""

  def __init__(self, config, workdir: str, encoder=None, source=None, split: str = "train"):
    from sae_jax import encoders

    # split "eval": the evaluation split's pooled embeddings only, in <workdir>/activations/eval/.
    self.split = split
    self.ex = ex = config.extract if split == "train" else coco.eval_extract_config(config.extract)
    self.source = source if source is not None else paired.open_source(ex)
    self.encoder = encoder if encoder is not None else encoders.load_encoder(ex)
    self.variants = check_variants(ex.pooling, self.encoder)
    self.act_dir = os.path.join(workdir, "activations", *(("eval",) if split == "eval" else ()))
    self.parts_dir = os.path.join(self.act_dir, "parts")
    self.shard_dir = os.path.join(self.act_dir, "shards")
    self.chunk_size = max(1, int(ex.chunk_size))
    self.batch_size = max(1, int(ex.batch_size))
    self.fingerprint = _fingerprint(ex, self.encoder)
    keep = config_utils.as_tuple(ex.shard_token_types)
    bad = [t for t in keep if t not in shards_lib.TOKEN_TYPES]
    if bad:
      raise SaeJaxError(
        f"config.extract.shard_token_types: unknown {bad}; expected some of {shards_lib.TOKEN_TYPES}"
      )
    self.keep_types = np.array([shards_lib.TOKEN_TYPES.index(t) for t in keep], np.uint8)
    if str(ex.shard_rows) not in ("tokens", "pooled"):
      raise SaeJaxError(f'config.extract.shard_rows={ex.shard_rows!r}: expected "tokens" or "pooled"')
    self.pooled_rows = str(ex.shard_rows) == "pooled"
    if self.pooled_rows and self.variants[0] == "embed":
      self.pooled_rows = False  # a contrastive model's rows are already one embedding per sample
    self.skipped_corrupt = 0
    self.rows_written = 0

  # ---- resume bookkeeping -------------------------------------------------------------------------
  def _check_previous(self) -> Optional[dict]:
    """Returns the previous summary if this exact extraction already completed; errors on mismatch."""
    os.makedirs(self.act_dir, exist_ok=True)
    fp_path = os.path.join(self.act_dir, "extract_config.json")
    if os.path.exists(fp_path):
      old = workdir_lib.read_json(fp_path)  # a damaged file: one line naming it
      if old != json.loads(json.dumps(self.fingerprint)):
        diff = sorted(
          k
          for k in set(old) | set(self.fingerprint)
          if old.get(k) != json.loads(json.dumps(self.fingerprint)).get(k)
        )
        raise SaeJaxError(
          f"{self.act_dir} holds an extraction with a different config.extract "
          f"(fields {diff}); use a new --workdir or delete {self.act_dir}"
        )
    else:
      workdir_lib.atomic_write_json(fp_path, self.fingerprint)
    summary = os.path.join(self.act_dir, "summary.json")
    if os.path.exists(summary):
      return workdir_lib.read_json(summary)
    return None

  def _open_writer(self):
    if not self.ex.write_shards:
      return None
    return shards_lib.ShardWriter(
      self.shard_dir,
      d=self.encoder.d,
      dtype=self.ex.shard_dtype,
      rows_per_shard=int(self.ex.rows_per_shard),
      metadata={
        "extract": self.fingerprint,
        "token_types": list(shards_lib.TOKEN_TYPES),
        "sample_ids": f"image id (image inputs) / {CAPTION_ID_OFFSET} + caption id (caption inputs)",
      },
    )

  # ---- one chunk --------------------------------------------------------------------------------
  def _batches(self, chunk, pool, prep):
    """Yields (item ids, prepared inputs or None, ok mask) per batch.

    On a GPU a single `prep` thread decodes the images of batch i+1 (fanned out over `pool`) and runs
    the encoder's CPU side (`prepare`: processor, tokenizer) while the caller runs `forward` on batch
    i (one prep thread: fast tokenizers must not be driven from two threads at once). On a CPU
    `prep` is `_Deferred` and the job runs inline when its result is needed.
    """
    bs = self.batch_size
    groups = [chunk.items[i : i + bs] for i in range(0, len(chunk.items), bs)]

    def load(ref):
      try:
        return coco.load_image(ref)
      except coco.ImageLoadError as e:
        logging.warning("extract: skipping %s", e)
        return None

    def job(g):
      if chunk.kind == "text":
        return [c.caption_id for c in g], self.encoder.prepare(texts=[c.text for c in g]), [True] * len(g)
      imgs = list(pool.map(load, g))
      ok = [im is not None for im in imgs]
      kept = [im for im in imgs if im is not None]
      return [r.image_id for r in g], (self.encoder.prepare(images=kept) if kept else None), ok

    pending = prep.submit(job, groups[0]) if groups else None
    for gi in range(len(groups)):
      result = pending.result()
      pending = prep.submit(job, groups[gi + 1]) if gi + 1 < len(groups) else None
      yield result

  def _run_chunk(self, chunk, writer, row_start, rows_done, pool, prep, progress):
    pooled = {v: [] for v in self.variants}
    ids, ok_all = [], []
    n_rows = 0
    for item_ids, prepared, ok in self._batches(chunk, pool, prep):
      ok_all += ok
      progress.update(len(ok))
      if prepared is None:
        continue
      kept_ids = np.array([i for i, o in zip(item_ids, ok) if o], np.int64)
      out = self.encoder.forward(prepared)
      by_variant = pool_batch(out, self.variants)
      for v, arr in by_variant.items():
        pooled[v].append(arr)
      ids.append(kept_ids)
      if writer is not None:
        if self.pooled_rows:
          rows = by_variant[self.variants[0]]
          types = np.full(rows.shape[0], 2 if chunk.kind == "text" else 1, np.uint8)
          sample = np.arange(rows.shape[0])
        else:
          rows, types, sample = self.encoder.rows(out)
        sel = np.isin(types, self.keep_types)
        offset = CAPTION_ID_OFFSET if chunk.kind == "text" else 0
        rows, types, sample = rows[sel], types[sel], kept_ids[sample[sel]] + offset
        # Rows already published in finished shards by an earlier (killed) run are not re-added.
        skip = min(max(rows_done - (row_start + n_rows), 0), rows.shape[0])
        if skip < rows.shape[0]:
          writer.add(rows[skip:], token_types=types[skip:], sample_ids=sample[skip:])
          self.rows_written += rows.shape[0] - skip
        n_rows += rows.shape[0]
    ok_all = np.array(ok_all, bool)
    self.skipped_corrupt += int((~ok_all).sum())
    d_of = {v: (self.encoder.d_embed if v == "embed" else self.encoder.d) for v in self.variants}
    arrays = {
      f"pooled_{v}": (np.concatenate(a) if a else np.zeros((0, d_of[v]), np.float32))
      for v, a in pooled.items()
    }
    arrays.update(
      ids=np.concatenate(ids) if ids else np.zeros((0,), np.int64),
      ok=ok_all,
      row_start=np.int64(row_start),
      row_end=np.int64(row_start + n_rows),
    )
    workdir_lib.atomic_savez(os.path.join(self.parts_dir, chunk.name + ".npz"), **arrays)
    return arrays

  def _run_phase(self, kind, items, writer, row_cursor, rows_done, pool, prep):
    chunks = [
      _Chunk(kind, i, items[s : s + self.chunk_size])
      for i, s in enumerate(range(0, len(items), self.chunk_size))
    ]
    results = []
    todo = []
    for ch in chunks:
      path = os.path.join(self.parts_dir, ch.name + ".npz")
      if os.path.exists(path):
        try:
          with np.load(path) as z:
            part = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 -- a damaged part file only means: run its chunk again
          print(
            f"warning: {path} does not load ({type(e).__name__}: {e}); re-running chunk {ch.name}",
            file=sys.stderr,
          )
          todo = chunks[len(results) :]
          break
        if int(part["row_end"]) <= rows_done or writer is None:
          results.append(part)
          row_cursor = int(part["row_end"])
          self.skipped_corrupt += int((~part["ok"]).sum())
          continue
      todo = chunks[len(results) :]
      break
    done_items = sum(len(c.items) for c in chunks[: len(results)])
    if todo:
      logging.info(
        "extract %s: %d chunk(s) of %d done, %d to run", kind, len(results), len(chunks), len(todo)
      )
    progress = Progress(len(items), f"extract {kind}", float(self.ex.log_every_s), done=done_items)
    for ch in todo:
      part = self._run_chunk(ch, writer, row_cursor, rows_done, pool, prep, progress)
      results.append(part)
      row_cursor = int(part["row_end"])
      preemption.check(f"after extraction chunk {ch.name} (its part file is saved)")
    progress.close()
    self.rates[kind] = progress.rate
    return results, row_cursor

  # ---- the run ----------------------------------------------------------------------------------
  def run(self) -> dict:
    previous = self._check_previous()
    if previous is not None and previous.get("complete"):
      logging.info("extract: %s is complete (%s); nothing to do", self.act_dir, previous.get("counts"))
      return previous
    os.makedirs(self.parts_dir, exist_ok=True)
    writer = self._open_writer()
    rows_done = writer.total_rows if writer is not None else 0
    if rows_done:
      logging.info("extract: resuming after %d finished shard(s), %d rows", writer.finished_shards, rows_done)
    self.rates = {}
    t0 = time.perf_counter()
    src = self.source
    workers = max(1, int(self.ex.num_workers))
    # On a GPU the CPU side of batch i+1 overlaps the forward of batch i (one prep thread). On a CPU
    # the forward already uses every core and a second thread only adds contention: prep runs inline.
    overlap = self.encoder.device.type != "cpu"
    with (
      concurrent.futures.ThreadPoolExecutor(workers) as pool,
      concurrent.futures.ThreadPoolExecutor(1) if overlap else _Deferred() as prep,
    ):
      img_parts, cursor = self._run_phase("image", src.images, writer, 0, rows_done, pool, prep)
      ok_ids = set(int(i) for p in img_parts for i in p["ids"])
      captions = [c for c in src.captions if c.image_id in ok_ids]
      txt_parts, cursor = self._run_phase("text", captions, writer, cursor, rows_done, pool, prep)
    index = writer.close() if writer is not None else None
    elapsed = time.perf_counter() - t0
    counts = self._write_pooled(img_parts, txt_parts, captions)
    counts.update(
      skipped_missing=int(src.skipped.get("missing", 0)),
      skipped_corrupt=self.skipped_corrupt,
      shard_rows=int(index["total_rows"]) if index else 0,
      shards=len(index["shards"]) if index else 0,
    )
    if counts["skipped_missing"] or counts["skipped_corrupt"]:
      logging.warning(
        "extract: skipped %d missing and %d corrupt image(s) (and their captions)",
        counts["skipped_missing"],
        counts["skipped_corrupt"],
      )
    summary = {
      "complete": True,
      "split": self.split,
      "captions_per_image": int(self.ex.captions_per_image),
      "chat_template": bool(self.encoder.chat_template),
      "counts": counts,
      "d": self.encoder.d,
      "model": self.ex.model_name,
      "family": self.encoder.family,
      "variants": list(self.variants),
      "pairing": self.ex.pairing,
      "shard_dir": self.shard_dir if writer is not None else "",
      "items_per_s": self.rates,
      "elapsed_s": round(elapsed, 3),
      "rows_written_this_run": self.rows_written,
    }
    workdir_lib.atomic_write_json(os.path.join(self.act_dir, "summary.json"), summary)
    shutil.rmtree(self.parts_dir, ignore_errors=True)
    logging.info("extract: done %s", counts)
    return summary

  def _write_pooled(self, img_parts, txt_parts, captions) -> dict:
    img_ids = np.concatenate([p["ids"] for p in img_parts]) if img_parts else np.zeros(0, np.int64)
    txt_ids = np.concatenate([p["ids"] for p in txt_parts]) if txt_parts else np.zeros(0, np.int64)
    cap_by_id = {c.caption_id: c for c in captions}
    if list(txt_ids) != [c.caption_id for c in captions]:
      raise SaeJaxError(
        f"{self.parts_dir}: part files do not cover the captions in order; delete {self.act_dir} and re-run"
      )
    row_of_image = {int(i): r for r, i in enumerate(img_ids)}
    pairing = self.ex.pairing
    if pairing not in ("all", "first"):
      raise SaeJaxError(f'config.extract.pairing={pairing!r}: expected "all" or "first"')
    sel, seen = [], set()
    for r, cid in enumerate(txt_ids):
      iid = cap_by_id[int(cid)].image_id
      if pairing == "first" and iid in seen:
        continue
      seen.add(iid)
      sel.append(r)
    sel = np.array(sel, np.int64)
    pair_img = np.array([row_of_image[cap_by_id[int(txt_ids[r])].image_id] for r in sel], np.int64)
    for v in self.variants:
      img = np.concatenate([p[f"pooled_{v}"] for p in img_parts])
      txt = np.concatenate([p[f"pooled_{v}"] for p in txt_parts])
      workdir_lib.atomic_savez(
        os.path.join(self.act_dir, f"pooled_{v}.npz"),
        image=img[pair_img],
        text=txt[sel],
        sample_ids=txt_ids[sel],
        image_ids=img_ids[pair_img],
        caption_ids=txt_ids[sel],
        captions=np.array([cap_by_id[int(txt_ids[r])].text for r in sel]),
        image_unique=img,
        image_unique_ids=img_ids,
        modality=np.array(["image", "text"]),
        pairing=np.array(pairing),
        variant=np.array(v),
        chat_template=np.array(bool(self.encoder.chat_template)),
      )
    return {"images": int(img_ids.shape[0]), "captions": int(txt_ids.shape[0]), "pairs": int(sel.shape[0])}


def run_part(config, workdir: str, index: int, count: int, encoder=None, source=None) -> dict:
  """Extracts this process's part, then merges if every part is complete; returns the merged
  summary (`merged: True`) or, while other parts are unfinished, this part's, with `part` = its own."""
  ex = config.extract
  source = source if source is not None else paired.open_source(ex)
  chunk = max(1, int(ex.chunk_size))
  if index * chunk >= len(source.images):
    raise SaeJaxError(
      f"config.extract.process_count={count}: process {index} has no images ({len(source.images)} images in "
      f"chunks of config.extract.chunk_size={chunk}); use fewer processes or smaller chunks"
    )
  extractor = Extractor(
    config, workdir, encoder=encoder, source=extract_parts.subset(source, index, count, chunk)
  )
  # The part's own directory (the Extractor's resume logic is unchanged inside it).
  extractor.act_dir = extract_parts.part_dir(workdir, index, count)
  extractor.parts_dir = os.path.join(extractor.act_dir, "parts")
  extractor.shard_dir = os.path.join(extractor.act_dir, "shards")
  part = extractor.run()
  merged = extract_parts.merge_if_complete(workdir, count, source, extractor.fingerprint)
  if merged is None:
    logging.info("extract: part %d of %d complete; the last process to finish merges", index, count)
  # The merging process reports the merged extraction, the others their part.
  summary = {**(merged or part), "process_index": index, "process_count": count, "part": part}
  if index == 0 and ex.eval_dataset:
    summary["eval"] = Extractor(config, workdir, encoder=extractor.encoder, split="eval").run()
  return summary


def run_extraction(config, workdir: str) -> dict:
  """Extract activations for `config.extract` into `<workdir>/activations/`; returns the summary."""
  if config.extract.dataset == "mbeir":
    return extract_mbeir.run_mbeir_extraction(config, workdir)
  with preemption.watch():  # SIGTERM: finish the chunk, exit PREEMPTED_EXIT_CODE; a re-run resumes
    index, count = extract_parts.process_split(config.extract)
    if count > 1:  # one part per process, merged by the last to finish
      return run_part(config, workdir, index, count)
    train = Extractor(config, workdir)
    summary = train.run()
    if config.extract.eval_dataset:
      # Same encoder, the evaluation split (pooled only): <workdir>/activations/eval/.
      summary["eval"] = Extractor(config, workdir, encoder=train.encoder, split="eval").run()
    return summary
