"""Paired image-caption data from TensorFlow Datasets (`config.extract.dataset = "tfds"`).

TPU users keep COCO as a tfds data directory, often on `gs://`. `TfdsCaptions` reads a split of a
dataset with the `coco_captions` features (`image`, `image/id`, `captions` {`id`, `text`}) through
`tfds.data_source`: random access to ArrayRecord files, no tf.data graph. It is a
`coco.PairedCaptions`, so extraction, its evaluation split and its multi-process split treat it
like the COCO JSON / Karpathy / parquet sources.

Reading: one pass over the records lists the image ids and captions; an image is read again when
extraction reaches it (tfds decodes it to an RGB array, `coco.load_image` takes it as is). The
listing pass decodes the images too: `tfds.data_source` in numpy mode takes no `PartialDecoding`,
and `SkipDecoding` (a decoders dict) makes `tfds.testing.mock_data` re-encode its random examples,
which fails on its uneven random caption sequences. At COCO scale this costs minutes of decoding
once per run (on `extract.num_workers` threads), before the encoder's forward passes. Caption ids are the stored `captions/id`
when every record has one per caption and they are unique across the split (COCO's annotation
ids); otherwise (random test data, builders without ids) `image_id * 1000 + position`, as the
parquet source does, with one warning.

`write_coco_as_tfds` stores a COCO captions JSON + image directory as such a tfds dataset
(ArrayRecord, the image files' bytes unchanged): how a local COCO copy becomes a tfds directory to
upload to a bucket, and how the tests build one from the shapes world.

This module imports TensorFlow Datasets at module level: the library imports it only when
`dataset = "tfds"` (the `tfds` extra).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from sae_jax.data import coco
from sae_jax.errors import SaeJaxError

# Features read; the coco_captions builder has these (and `objects`, `image/filename`, unused).
REQUIRED_FEATURES = ("image", "image/id", "captions")
# Positional caption ids (no usable stored ids): image_id * this + position (as coco.CocoParquet).
CAPTION_ID_STRIDE = 1000


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _reason(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _where(name: str, split: str, data_dir: str) -> str:
  return f"config.extract.tfds_name={name!r} (split {split!r}, data_dir {data_dir or 'the tfds default'!r})"


def _image(source: Any, index: int) -> np.ndarray:
  return np.asarray(source[index]["image"])


def open_source(name: str, split: str, data_dir: str = "") -> Any:
  """`tfds.data_source` of the split, checked for the features read (one line on failure)."""
  where = _where(name, split, data_dir)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # noqa: BLE001 -- tfds raises many types (not found, not prepared, bad split)
    raise SaeJaxError(f"{where}: tfds.data_source failed ({_reason(e)})") from None
  features = source.dataset_info.features
  missing = [f for f in REQUIRED_FEATURES if f not in features.keys()]
  if missing or "text" not in features["captions"].feature.keys():
    raise SaeJaxError(
      f"{where}: features {sorted(features.keys())} lack {missing or ['captions/text']}; expected the "
      f"coco_captions features {REQUIRED_FEATURES} with captions/text"
    )
  return source


class TfdsCaptions(coco.PairedCaptions):
  """A tfds split with the coco_captions features, as image-caption pairs (see the module doc)."""

  def __init__(
    self,
    name: str = "coco_captions",
    split: str = "test",
    data_dir: str = "",
    max_images: int = 0,
    captions_per_image: int = 0,
    workers: int = 4,
  ):
    where = _where(name, split, data_dir)
    source = open_source(name, split, data_dir)
    n = len(source) if not max_images else min(len(source), int(max_images))

    def listing(i: int) -> tuple:
      try:
        r = source[i]
      except Exception as e:  # noqa: BLE001 -- unreadable or damaged ArrayRecord files
        raise SaeJaxError(f"{where}: record {i} does not read ({_reason(e)})") from None
      texts = [_text(t) for t in np.asarray(r["captions"]["text"]).tolist()]
      return int(r["image/id"]), texts, np.asarray(r["captions"].get("id", []), np.int64).reshape(-1)

    # The images are decoded in this pass too (see the module doc): `workers` threads (PIL decodes
    # without the GIL), results in record order.
    with concurrent.futures.ThreadPoolExecutor(max(1, int(workers))) as pool:
      listed = list(pool.map(listing, range(n)))
    image_ids = [x[0] for x in listed]
    texts = [x[1] for x in listed]
    stored_ids = [x[2] for x in listed]
    caption_ids = self._caption_ids(image_ids, texts, stored_ids, where)
    refs = [
      coco.ImageRef(iid, f"{name}/{split}[{i}]", loader=functools.partial(_image, source, i))
      for i, iid in enumerate(image_ids)
    ]
    caps = [
      coco.Caption(int(cid), iid, text)
      for iid, ids, ts in zip(image_ids, caption_ids, texts)
      for cid, text in zip(ids, ts)
    ]
    self.tfds_name, self.tfds_split = name, split
    super().__init__(refs, caps, where, captions_per_image=captions_per_image)

  @staticmethod
  def _caption_ids(image_ids: list, texts: list, stored: list, where: str) -> list:
    usable = all(len(s) == len(t) for s, t in zip(stored, texts))
    if usable:
      flat = np.concatenate(stored) if stored else np.zeros(0, np.int64)
      usable = np.unique(flat).size == flat.size
    if usable:
      return [s.tolist() for s in stored]
    logging.warning(
      "%s: captions/id is missing, not one per caption or not unique; caption ids are "
      "image_id * %d + position",
      where,
      CAPTION_ID_STRIDE,
    )
    return [[iid * CAPTION_ID_STRIDE + j for j in range(len(t))] for iid, t in zip(image_ids, texts)]


def open_tfds(ex: Any) -> TfdsCaptions:
  """The tfds source of `config.extract` (its tfds_* fields)."""
  return TfdsCaptions(
    str(ex.tfds_name),
    str(ex.tfds_split),
    str(ex.tfds_data_dir),
    max_images=int(ex.max_images),
    captions_per_image=int(ex.captions_per_image),
    workers=int(ex.num_workers),
  )


def coco_features() -> tfds.features.FeaturesDict:
  """The coco_captions features this module reads (image bytes stored as given)."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(),
      "image/id": tfds.features.Scalar(np.int64),
      "image/filename": tfds.features.Text(),
      "captions": tfds.features.Sequence(
        {"id": tfds.features.Scalar(np.int64), "text": tfds.features.Text()}
      ),
    }
  )


def write_coco_as_tfds(
  captions_json: str, image_dir: str, data_dir: str, name: str, split: str, version: str = "1.0.0"
) -> str:
  """Stores a COCO captions JSON + image directory as split `split` of tfds dataset `name` under
  `data_dir` (ArrayRecord); returns the dataset's directory. Images keep their file bytes."""
  source = coco.CocoCaptionsJson(captions_json, image_dir)
  caps_of: dict = {}
  for c in source.captions:
    caps_of.setdefault(c.image_id, []).append(c)

  def examples(refs: list) -> Any:
    for i, ref in enumerate(refs):
      with open(ref.path, "rb") as f:
        data = f.read()
      caps = caps_of[ref.image_id]
      yield (
        i,
        {
          "image": data,
          "image/id": ref.image_id,
          "image/filename": os.path.basename(ref.path),
          "captions": {"id": [c.caption_id for c in caps], "text": [c.text for c in caps]},
        },
      )

  try:
    builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=name,
      version=version,
      features=coco_features(),
      split_datasets={split: examples(source.images)},
      data_dir=data_dir,
      file_format="array_record",
      disable_shuffling=True,  # record i = image i of the JSON, as the COCO JSON source lists them
    )
  except RuntimeError as e:
    raise SaeJaxError(f"{data_dir}/{name}: {_reason(e)}") from None
  return os.fspath(builder.data_dir)
