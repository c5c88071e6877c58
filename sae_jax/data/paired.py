"""The paired image-caption source `config.extract.dataset` names (COCO JSON, Karpathy, parquet, tfds)."""

from __future__ import annotations

from typing import Any

from sae_jax.data import coco
from sae_jax.errors import SaeJaxError


def open_source(ex: Any) -> coco.PairedCaptions:
  """`coco.open_paired` for the file sources; TensorFlow Datasets (the `tfds` extra) for "tfds"."""
  if ex.dataset != "tfds":
    return coco.open_paired(ex)
  try:
    from sae_jax.data import tfds_source  # TensorFlow: imported only for this source
  except ImportError as e:
    raise SaeJaxError(
      f'config.extract.dataset="tfds" needs tensorflow-datasets ({e}); pip install "sae-jax[tfds]"'
    ) from None
  return tfds_source.open_tfds(ex)
