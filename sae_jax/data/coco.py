"""Paired image-caption sources (COCO): official captions JSON, Karpathy JSON, HF parquet.

Every source is a grain-compatible random-access data source (`__len__`, `__getitem__`) over
image-caption PAIRS (one element per caption), and also exposes the unique `images` and the
`captions` lists that extraction walks. Elements are plain dicts:
  {'image_id': int, 'caption_id': int, 'caption': str, 'image': ImageRef}
`load_image(ref)` decodes an `ImageRef` (file path or in-memory bytes) to an RGB PIL image.

Bad input policy:
  - image file missing        -> skipped and counted (`skipped['missing']`), its captions dropped;
  - image corrupt / undecodable -> `load_image` raises `ImageLoadError`; extraction skips and counts it;
  - image without any caption, empty caption, caption for an unknown image id,
    unreadable/malformed JSON   -> SaeJaxError, one line naming the file and the record.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from typing import Optional, Sequence

import numpy as np

from sae_jax.errors import SaeJaxError


class ImageLoadError(SaeJaxError):
  """A missing or undecodable image (extraction skips and counts these)."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
  image_id: int
  path: str = ""  # file on disk, or a label for in-memory images
  data: Optional[bytes] = None  # encoded bytes (parquet); None for files
  # () -> encoded bytes, or a decoded [H, W, 3] uint8 array (tfds), read lazily
  loader: Optional[object] = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Caption:
  caption_id: int
  image_id: int
  text: str


def load_image(ref: ImageRef):
  """RGB PIL image; ImageLoadError (one line) if missing or corrupt."""
  from PIL import Image

  try:
    if ref.data is not None or ref.loader is not None:
      data = ref.data if ref.data is not None else ref.loader()
      if not isinstance(data, (bytes, bytearray)):  # already decoded (tfds): [H, W, C] uint8
        pixels = np.asarray(data)
        return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
      img = Image.open(io.BytesIO(data))
    else:
      img = Image.open(ref.path)
    img.load()
    return img.convert("RGB")
  except FileNotFoundError:
    raise ImageLoadError(f"image {ref.image_id}: file {ref.path} is missing") from None
  except Exception as e:  # PIL raises OSError/SyntaxError/ValueError... for bad data
    raise ImageLoadError(
      f"image {ref.image_id}: {ref.path or '<bytes>'} is corrupt or not an image "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    ) from None


class PairedCaptions:
  """Base class: `images` (ImageRef list), `captions` (Caption list), random access over pairs."""

  def __init__(
    self,
    images: Sequence[ImageRef],
    captions: Sequence[Caption],
    where: str,
    skipped_missing: int = 0,
    max_images: int = 0,
    captions_per_image: int = 0,
  ):
    self.where = where
    caps_of = {}
    ids = set()
    for im in images:
      if im.image_id in ids:
        raise SaeJaxError(f"{where}: image id {im.image_id} appears twice")
      ids.add(im.image_id)
      caps_of[im.image_id] = []
    for c in captions:
      if not isinstance(c.text, str) or not c.text.strip():
        raise SaeJaxError(f"{where}: caption {c.caption_id} of image {c.image_id} is empty")
      if c.image_id not in caps_of:
        if c.image_id in self._missing_ids:
          continue  # its image file is missing: dropped with the image
        raise SaeJaxError(
          f"{where}: caption {c.caption_id} refers to image id {c.image_id}, which is not in the image list"
        )
      caps_of[c.image_id].append(c)
    for im in images:
      if not caps_of[im.image_id]:
        raise SaeJaxError(
          f"{where}: image {im.image_id} ({os.path.basename(im.path)}) has no captions; "
          f"every image needs at least one"
        )
    if max_images:
      images = list(images)[:max_images]
    if captions_per_image < 0:
      raise SaeJaxError(f"config.extract.captions_per_image={captions_per_image}: expected >= 0 (0 = all)")
    self.images = list(images)
    # The 5k-test protocol keeps 5 captions per image (a few COCO images have 6 or 7): the first
    # `captions_per_image` in file order.
    cut = captions_per_image or None
    self.captions = [c for im in self.images for c in caps_of[im.image_id][:cut]]
    self.captions_per_image = int(captions_per_image)
    self.skipped = {"missing": int(skipped_missing)}
    if not self.images:
      raise SaeJaxError(f"{where}: no usable image ({skipped_missing} image files missing)")

  _missing_ids: frozenset = frozenset()

  def __len__(self) -> int:
    return len(self.captions)

  def __getitem__(self, i: int) -> dict:
    c = self.captions[i]
    return {
      "image_id": c.image_id,
      "caption_id": c.caption_id,
      "caption": c.text,
      "image": self.image_by_id[c.image_id],
    }

  @property
  def image_by_id(self) -> dict:
    if not hasattr(self, "_by_id"):
      self._by_id = {im.image_id: im for im in self.images}
    return self._by_id

  def __repr__(self):
    return (
      f"{type(self).__name__}({self.where}: {len(self.images)} images, {len(self.captions)} "
      f"captions, skipped {self.skipped})"
    )


# Where the configs/*_coco.py presets look (configs/coco_common.py), named in the missing-file error.
DATA_ROOT_HINT = (
  " (the configs/*_coco.py presets read COCO under $COCO_ROOT, default data/coco, and the :tiny "
  "fixture from $COCO_MINI, default data/coco-mini, made by python -m experiments.make_shapes --coco_mini "
  "--out=data/coco-mini; or set the field itself)"
)


def _read_json(path: str, what: str):
  if not os.path.exists(path):
    raise SaeJaxError(f"{what}: {path} does not exist{DATA_ROOT_HINT if what.startswith('config.') else ''}")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SaeJaxError(f"{what}: {path} is not valid JSON ({e})") from None


def _existing(refs):
  ok, missing = [], set()
  for r in refs:
    if os.path.exists(r.path):
      ok.append(r)
    else:
      missing.add(r.image_id)
  return ok, missing


class CocoCaptionsJson(PairedCaptions):
  """Official COCO captions JSON (`images`, `annotations`) + an image directory."""

  def __init__(self, captions_json: str, image_dir: str, max_images: int = 0, captions_per_image: int = 0):
    where = f"config.extract.captions_json={captions_json}"
    d = _read_json(captions_json, "config.extract.captions_json")
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
      raise SaeJaxError(
        f'{where}: expected the official COCO captions schema with "images" and "annotations"'
      )
    if not os.path.isdir(image_dir):
      raise SaeJaxError(f"config.extract.image_dir={image_dir}: not a directory")
    try:
      refs = [ImageRef(int(im["id"]), os.path.join(image_dir, im["file_name"])) for im in d["images"]]
      caps = [Caption(int(a["id"]), int(a["image_id"]), a["caption"]) for a in d["annotations"]]
    except (KeyError, TypeError, ValueError) as e:
      raise SaeJaxError(f"{where}: malformed image or annotation record ({type(e).__name__}: {e})") from None
    refs, missing = _existing(refs)
    self._missing_ids = frozenset(missing)
    super().__init__(
      refs,
      caps,
      where,
      skipped_missing=len(missing),
      max_images=max_images,
      captions_per_image=captions_per_image,
    )


class KarpathyJson(PairedCaptions):
  """Karpathy split JSON (`images[*].{filepath, filename, cocoid|imgid, split, sentences[*].raw}`)."""

  def __init__(
    self,
    karpathy_json: str,
    image_dir: str,
    split: str = "test",
    max_images: int = 0,
    captions_per_image: int = 0,
  ):
    where = f"config.extract.karpathy_json={karpathy_json}"
    d = _read_json(karpathy_json, "config.extract.karpathy_json")
    if not isinstance(d, dict) or "images" not in d:
      raise SaeJaxError(f'{where}: expected a Karpathy split file with an "images" list')
    refs, caps = [], []
    try:
      for im in d["images"]:
        if split and im.get("split") != split:
          continue
        iid = int(im.get("cocoid", im.get("imgid")))
        path = os.path.join(image_dir, im.get("filepath", ""), im["filename"])
        if not os.path.exists(path):  # flat image dir
          flat = os.path.join(image_dir, im["filename"])
          path = flat if os.path.exists(flat) else path
        refs.append(ImageRef(iid, path))
        for j, s in enumerate(im["sentences"]):
          caps.append(Caption(int(s.get("sentid", iid * 100 + j)), iid, s.get("raw", "")))
    except (KeyError, TypeError, ValueError) as e:
      raise SaeJaxError(f"{where}: malformed image record ({type(e).__name__}: {e})") from None
    if not refs:
      raise SaeJaxError(f"{where}: no image in split {split!r}")
    refs, missing = _existing(refs)
    self._missing_ids = frozenset(missing)
    super().__init__(
      refs,
      caps,
      where,
      skipped_missing=len(missing),
      max_images=max_images,
      captions_per_image=captions_per_image,
    )


class _RowGroupCache:
  """Lazy reader of the image column of one parquet file, one row group cached at a time."""

  def __init__(self, path):
    self.path = path
    self._group, self._data = None, None

  def get(self, group, row):
    if group != self._group:
      import pyarrow.parquet as pq

      table = pq.ParquetFile(self.path).read_row_group(group, columns=["image"])
      self._group, self._data = group, table.column("image").to_pylist()
    v = self._data[row]
    return v["bytes"] if isinstance(v, dict) else v


class CocoParquet(PairedCaptions):
  """HF parquet with the lmms-lab/COCO-Caption layout: `image` {bytes, path}, `answer` (list of
  captions), `id` (image id; else the row number), `file_name`/`question_id` (labels). Image bytes are
  read lazily per row group. Caption ids are image_id * 1000 + position in `answer`."""

  def __init__(self, files: str | Sequence[str], max_images: int = 0, captions_per_image: int = 0):
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise SaeJaxError(
        'config.extract.parquet_files: reading parquet needs pyarrow (pip install "sae-jax[extract]")'
      ) from None
    paths = sorted(glob.glob(files)) if isinstance(files, str) else list(files)
    where = f"config.extract.parquet_files={files}"
    if not paths:
      raise SaeJaxError(f"{where}: no file matches")
    refs, caps = [], []
    row_base = 0
    for path in paths:
      try:
        pf = pq.ParquetFile(path)
      except Exception as e:  # pylint: disable=broad-except
        raise SaeJaxError(f"{where}: {path} is not a parquet file ({e})") from None
      names = pf.schema_arrow.names
      for col in ("image", "answer"):
        if col not in names:
          raise SaeJaxError(
            f"{where}: {path} has no column {col!r} (columns: {names}); expected the "
            f"lmms-lab/COCO-Caption layout"
          )
      meta_cols = [c for c in ("id", "file_name", "question_id", "answer") if c in names]
      cache = _RowGroupCache(path)
      for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=meta_cols).to_pydict()
        for r in range(len(t["answer"])):
          iid = int(t["id"][r]) if "id" in t and str(t["id"][r]).isdigit() else row_base
          label = t.get("file_name", t.get("question_id", [None] * (r + 1)))[r] or f"row {row_base}"
          refs.append(
            ImageRef(iid, f"{os.path.basename(path)}:{label}", loader=(lambda c=cache, g=g, r=r: c.get(g, r)))
          )
          answers = t["answer"][r] or []
          if isinstance(answers, str):
            answers = [answers]
          for j, a in enumerate(answers):
            caps.append(Caption(iid * 1000 + j, iid, a))
          row_base += 1
    super().__init__(refs, caps, where, max_images=max_images, captions_per_image=captions_per_image)


def open_paired(ex) -> PairedCaptions:
  """The paired source named by `config.extract.dataset`."""
  ds = ex.dataset
  mx = int(ex.max_images)
  cpi = int(ex.captions_per_image)
  if ds == "coco":
    return CocoCaptionsJson(ex.captions_json, ex.image_dir, max_images=mx, captions_per_image=cpi)
  if ds == "karpathy":
    return KarpathyJson(
      ex.karpathy_json, ex.image_dir, split=ex.karpathy_split, max_images=mx, captions_per_image=cpi
    )
  if ds == "parquet":
    return CocoParquet(ex.parquet_files, max_images=mx, captions_per_image=cpi)
  raise SaeJaxError(f"config.extract.dataset={ds!r}: expected coco, karpathy, parquet, tfds or mbeir")


# The evaluation split's fields (`config.extract.eval_*`) and the training-split fields they replace.
EVAL_FIELDS = {
  "eval_dataset": "dataset",
  "eval_captions_json": "captions_json",
  "eval_image_dir": "image_dir",
  "eval_karpathy_split": "karpathy_split",
  "eval_tfds_split": "tfds_split",
  "eval_captions_per_image": "captions_per_image",
  "eval_max_images": "max_images",
}


def eval_extract_config(ex):
  """A copy of `config.extract` that reads the evaluation split (`eval_*` fields), no shards.

  The evaluation split (paper: COCO's Karpathy 5k test, 5 captions per image) only needs pooled
  embeddings; its token activations never train the SAE.
  """
  if ex.eval_dataset not in ("coco", "karpathy", "parquet", "tfds"):
    raise SaeJaxError(
      f'config.extract.eval_dataset={ex.eval_dataset!r}: expected "coco", "karpathy", "parquet" or "tfds" '
      '("" = none)'
    )
  out = ex.copy_and_resolve_references()
  with out.unlocked():
    for src, dst in EVAL_FIELDS.items():
      out[dst] = ex[src]
    out.write_shards = False
  return out
