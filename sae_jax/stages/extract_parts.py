"""Extraction split across processes (one per GPU or host), merged once every part is complete.

Process p of P (`config.extract.process_index/process_count`, else torchrun's `RANK/WORLD_SIZE`,
SLURM's `SLURM_PROCID/SLURM_NTASKS`, or Open MPI's `OMPI_COMM_WORLD_RANK/SIZE`, the variables
`jax.distributed` reads too) takes image chunks p, p + P, p + 2P, ... (chunks of
`config.extract.chunk_size` images, the single-process run's chunks) and the captions of those
images, and runs an ordinary extraction of them into its own directory

  <workdir>/activations/process-<p>-of-<P>/   shards/ (v1), parts/, pooled_<variant>.npz, summary.json

so each process resumes on its own (a killed process re-runs only its unfinished chunks). The
process that completes last (any process re-run after all are complete) merges, in a fixed order:

  <workdir>/activations/shards/index.json     format `sae_jax.activations.v2`: every part's shards,
                                              part 0's first, named by their path relative to it
  <workdir>/activations/pooled_<variant>.npz  the single-process layout: images in the source's
                                              image order, pairs in its caption order
  <workdir>/activations/summary.json          counts summed over the parts, "processes": P

The evaluation split (`config.extract.eval_dataset`) is extracted by process 0 alone.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import numpy as np
from absl import logging

from sae_jax import workdir as workdir_lib
from sae_jax.data import coco
from sae_jax.data import shards as shards_lib
from sae_jax.errors import SaeJaxError

# (rank variable, size variable) of launchers, checked in this order after the config fields.
LAUNCHER_ENV = (
  ("RANK", "WORLD_SIZE"),  # torchrun
  ("SLURM_PROCID", "SLURM_NTASKS"),  # srun
  ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # mpirun
)
PER_PAIR_KEYS = ("image", "text", "sample_ids", "image_ids", "caption_ids", "captions")


def process_split(ex, env: Optional[dict] = None) -> tuple[int, int]:
  """(process index, process count) of this extraction: the config fields when
  `process_count > 0`, else the first launcher variables set, else (0, 1)."""
  env = os.environ if env is None else env
  count, index = int(ex.process_count), int(ex.process_index)
  where = "config.extract.process_index/process_count"
  if count <= 0:
    for rank_var, size_var in LAUNCHER_ENV:
      if rank_var in env and size_var in env:
        where = f"${rank_var}/${size_var}"
        try:
          index, count = int(env[rank_var]), int(env[size_var])
        except ValueError:
          raise SaeJaxError(f"{where}={env[rank_var]}/{env[size_var]}: expected integers") from None
        break
    else:
      return 0, 1
  if count < 1 or not 0 <= index < count:
    raise SaeJaxError(f"{where}={index}/{count}: expected 0 <= index < count")
  return index, count


def part_dir(workdir: str, index: int, count: int) -> str:
  return os.path.join(workdir, "activations", f"process-{index:05d}-of-{count:05d}")


def subset(source: coco.PairedCaptions, index: int, count: int, chunk_size: int) -> coco.PairedCaptions:
  """The images of chunks index, index + count, ... and their captions (in the source's order)."""
  images = [im for i, im in enumerate(source.images) if (i // chunk_size) % count == index]
  keep = {im.image_id for im in images}
  part = copy.copy(source)
  part.images = images
  part.captions = [c for c in source.captions if c.image_id in keep]
  part.__dict__.pop("_by_id", None)
  return part


def merge_if_complete(
  workdir: str, count: int, source: coco.PairedCaptions, fingerprint: dict
) -> Optional[dict]:
  """Merges the parts' shards and pooled files when all `count` parts are complete; else None."""
  parts = []
  for p in range(count):
    path = os.path.join(part_dir(workdir, p, count), "summary.json")
    if not os.path.exists(path):
      return None
    summary = workdir_lib.read_json(path)
    if not summary.get("complete"):
      return None
    parts.append(summary)
  act = os.path.join(workdir, "activations")
  names = [os.path.basename(part_dir(workdir, p, count)) for p in range(count)]
  index = None
  if all(s["shard_dir"] for s in parts):
    index = write_merged_index(
      os.path.join(act, "shards"), [os.path.join(act, n, "shards") for n in names], {"processes": count}
    )
  image_rank = {im.image_id: r for r, im in enumerate(source.images)}
  caption_rank = {c.caption_id: r for r, c in enumerate(source.captions)}
  for v in parts[0]["variants"]:
    files = [np.load(os.path.join(act, n, f"pooled_{v}.npz")) for n in names]
    merged = {}
    pair_ids = np.concatenate([f["caption_ids"] for f in files])
    order = np.argsort([caption_rank[int(c)] for c in pair_ids], kind="stable")
    for key in PER_PAIR_KEYS:
      merged[key] = np.concatenate([f[key] for f in files])[order]
    image_ids = np.concatenate([f["image_unique_ids"] for f in files])
    img_order = np.argsort([image_rank[int(i)] for i in image_ids], kind="stable")
    merged["image_unique"] = np.concatenate([f["image_unique"] for f in files])[img_order]
    merged["image_unique_ids"] = image_ids[img_order]
    # Every other key is metadata of the extraction (modality, pairing, variant, chat template...):
    # the same in every part, else the merge would be wrong, so it stops.
    for key in sorted(set(files[0].files) - set(merged)):
      if any(key not in f.files or not np.array_equal(f[key], files[0][key]) for f in files[1:]):
        raise SaeJaxError(f"{act}/process-*/pooled_{v}.npz: {key!r} differs between the parts; cannot merge")
      merged[key] = files[0][key]
    workdir_lib.atomic_savez(os.path.join(act, f"pooled_{v}.npz"), **merged)
  counts = {
    k: sum(int(s["counts"][k]) for s in parts) for k in ("images", "captions", "pairs", "skipped_corrupt")
  }
  counts.update(
    skipped_missing=int(source.skipped.get("missing", 0)),
    shard_rows=int(index["total_rows"]) if index else 0,
    shards=len(index["shards"]) if index else 0,
  )
  summary = {
    **{
      k: parts[0][k] for k in ("split", "captions_per_image", "d", "model", "family", "variants", "pairing")
    },
    "complete": True,
    "merged": True,
    "processes": count,
    "counts": counts,
    "shard_dir": os.path.join(act, "shards") if index else "",
    "parts": names,
    "elapsed_s": max(float(s["elapsed_s"]) for s in parts),
  }
  # A later single-process run on this workdir with the same config finds it complete.
  workdir_lib.atomic_write_json(os.path.join(act, "extract_config.json"), fingerprint)
  workdir_lib.atomic_write_json(os.path.join(act, "summary.json"), summary)
  logging.info("extract: merged %d parts: %s", count, counts)
  return summary


def write_merged_index(directory: str, part_dirs: list[str], metadata: dict) -> dict:
  """`directory/index.json` in format v2 listing the shards of every part directory, in order."""
  os.makedirs(directory, exist_ok=True)
  shards, first = [], None
  for pd in part_dirs:
    index = shards_lib.read_index(pd, allow_empty=True)
    if first is None:
      first = index
    elif (index["d"], index["dtype"]) != (first["d"], first["dtype"]):
      raise SaeJaxError(
        f"{pd}: d={index['d']} dtype={index['dtype']}, the first part has d={first['d']} dtype={first['dtype']}"
      )
    rel = os.path.relpath(pd, directory)
    shards += [{**s, "name": f"{rel}/{s['name']}"} for s in index["shards"]]
  merged = {
    "format": shards_lib.FORMAT_V2,
    "d": first["d"],
    "dtype": first["dtype"],
    "total_rows": sum(s["rows"] for s in shards),
    "shards": shards,
    "parts": [os.path.relpath(pd, directory) for pd in part_dirs],
    "metadata": {**first.get("metadata", {}), **metadata},
  }
  workdir_lib.atomic_write_json(os.path.join(directory, shards_lib.INDEX_FILE), merged)
  return shards_lib.read_index(directory)
