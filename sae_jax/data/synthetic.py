"""A planted source of paired image/text activations with a known ground-truth dictionary.

Each matched pair (image row, text row) is a sparse non-negative combination of unit atoms:
- `shared` ("bridge") concepts: the content of the pair, active in both rows with correlated
  magnitudes; they are what makes retrieval possible;
- `image`-only and `text`-only concepts, with more text concepts active per sample than image ones
  (the text-heavier mix the paper reports for MLLMs);
- a few `distractor` concepts with large magnitudes, active in most samples of both modalities and
  drawn independently per row: they carry most of the energy and of the image-text dot product but
  say nothing about which image goes with which text (the paper's Section 3.4);
- isotropic Gaussian noise.

Every draw is a pure function of (config.seed, the caller's seed or batch index), so a training
stream can be resumed from any batch index.

`open_planted(cfg, n, seed)` is how the stages open it for evaluation: matched pairs plus the
ground truth (`PlantedTruth`: atoms, kinds, the distractor ids and atoms); the training stream is
`PlantedSource.training_batch`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import ml_collections
import numpy as np

from sae_jax.errors import SaeJaxError

KINDS = ("image", "text", "shared", "distractor")
IMAGE, TEXT, SHARED, DISTRACTOR = range(4)


def default_synthetic_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.d = 64  # activation width
  c.n_image = 24  # image-only concepts
  c.n_text = 48  # text-only concepts
  c.n_shared = 48  # concepts active in both rows of a pair
  c.n_distractor = 4  # high-energy, pair-independent concepts
  c.active_image = 2  # image-only concepts per image row
  c.active_text = 4  # text-only concepts per text row
  c.active_shared = 3  # shared concepts per pair
  c.distractor_prob = 0.9  # probability a distractor fires in a row
  c.distractor_scale = 3.0  # distractor magnitude relative to content concepts
  c.noise_std = 0.02
  c.seed = 0
  return c


class PairedSample(NamedTuple):
  image: np.ndarray  # [n, d]
  text: np.ndarray  # [n, d]
  image_codes: np.ndarray  # [n, n_concepts] ground-truth coefficients
  text_codes: np.ndarray  # [n, n_concepts]


class PlantedSource:
  """Ground truth: `dictionary` [n_concepts, d] (unit rows), `kinds` [n_concepts] indexing KINDS."""

  def __init__(self, cfg):
    self.cfg = cfg
    for field in ("d", "n_image", "n_text", "n_shared", "n_distractor"):
      if int(getattr(cfg, field)) < (1 if field == "d" else 0):
        raise SaeJaxError(f"config.data.synthetic.{field}={getattr(cfg, field)}: must be positive")
    for active, pool in (
      ("active_image", "n_image"),
      ("active_text", "n_text"),
      ("active_shared", "n_shared"),
    ):
      if int(getattr(cfg, active)) > int(getattr(cfg, pool)):
        raise SaeJaxError(
          f"config.data.synthetic.{active}={getattr(cfg, active)} exceeds {pool}={getattr(cfg, pool)}"
        )
    counts = [int(cfg.n_image), int(cfg.n_text), int(cfg.n_shared), int(cfg.n_distractor)]
    self.kinds = np.repeat(np.arange(4, dtype=np.int8), counts)
    self.n_concepts = int(sum(counts))
    rng = np.random.default_rng([int(cfg.seed), 0])
    atoms = rng.standard_normal((self.n_concepts, int(cfg.d)))
    self.dictionary = (atoms / np.linalg.norm(atoms, axis=1, keepdims=True)).astype(np.float32)
    self._offsets = np.concatenate([[0], np.cumsum(counts)])

  @property
  def d(self) -> int:
    return int(self.cfg.d)

  def _choose(self, rng, n, kind, active):
    """(rows, concepts) of `active` distinct concepts of `kind` per row, or None."""
    lo, hi = self._offsets[kind], self._offsets[kind + 1]
    if active == 0 or hi == lo:
      return None
    picks = np.argsort(rng.random((n, hi - lo)), axis=1)[:, :active] + lo
    return np.repeat(np.arange(n), active), picks.reshape(-1)

  def _draw(self, rng: np.random.Generator, n: int) -> PairedSample:
    cfg = self.cfg
    img_codes = np.zeros((n, self.n_concepts), np.float32)
    txt_codes = np.zeros((n, self.n_concepts), np.float32)
    # Shared content: one base magnitude per pair and concept, a small jitter per modality.
    sel = self._choose(rng, n, SHARED, int(cfg.active_shared))
    if sel is not None:
      r, c = sel
      base = rng.uniform(0.5, 1.5, r.shape[0]).astype(np.float32)
      img_codes[r, c] = base * rng.uniform(0.8, 1.2, r.shape[0])
      txt_codes[r, c] = base * rng.uniform(0.8, 1.2, r.shape[0])
    for codes, kind, active in (
      (img_codes, IMAGE, int(cfg.active_image)),
      (txt_codes, TEXT, int(cfg.active_text)),
    ):
      sel = self._choose(rng, n, kind, active)
      if sel is not None:
        codes[sel] = rng.uniform(0.5, 1.5, sel[0].shape[0])
    lo, hi = self._offsets[DISTRACTOR], self._offsets[DISTRACTOR + 1]
    for codes in (img_codes, txt_codes):
      fires = rng.random((n, hi - lo)) < float(cfg.distractor_prob)
      mags = float(cfg.distractor_scale) * rng.uniform(0.5, 1.5, (n, hi - lo))
      codes[:, lo:hi] = np.where(fires, mags, 0.0)
    noise = float(cfg.noise_std)
    image = img_codes @ self.dictionary + noise * rng.standard_normal((n, self.d))
    text = txt_codes @ self.dictionary + noise * rng.standard_normal((n, self.d))
    return PairedSample(image.astype(np.float32), text.astype(np.float32), img_codes, txt_codes)

  def paired(self, n: int, seed: int = 0) -> PairedSample:
    """`n` matched pairs; row i of `image` and row i of `text` describe the same sample."""
    if n <= 0:
      raise SaeJaxError(f"PlantedSource.paired: n={n}, expected a positive number of pairs")
    return self._draw(np.random.default_rng([int(self.cfg.seed), int(seed), 1]), n)

  def training_batch(self, index: int, batch_size: int) -> np.ndarray:
    """Batch `index` of the training stream: image and text rows of (batch_size+1)//2 pairs."""
    rng = np.random.default_rng([int(self.cfg.seed), int(index), 2])
    pairs = self._draw(rng, (batch_size + 1) // 2)
    return np.concatenate([pairs.image, pairs.text])[:batch_size]


class PlantedTruth(NamedTuple):
  """The planted ground truth: `dictionary` [n_concepts, d] (unit rows), `kinds` [n_concepts]."""

  dictionary: np.ndarray
  kinds: np.ndarray  # int8, indexing KINDS

  @property
  def distractor_ids(self) -> np.ndarray:
    """Ids of the distractor concepts (rows of `dictionary`)."""
    return np.flatnonzero(self.kinds == DISTRACTOR)

  @property
  def distractors(self) -> np.ndarray:
    """The distractor atoms [n_distractor, d]: the span an oracle removal takes out."""
    return self.dictionary[self.kinds == DISTRACTOR]


class PlantedPairs(NamedTuple):
  """Matched pairs of the planted source: row i of `image` and of `text` describe sample i."""

  image: np.ndarray  # [n, d] float32
  text: np.ndarray  # [n, d] float32
  sample_ids: np.ndarray  # [n]: 0 .. n-1
  truth: Optional[PlantedTruth]  # None unless asked for


def open_planted(cfg: ml_collections.ConfigDict, n: int, seed: int, with_truth: bool = True) -> PlantedPairs:
  """`n` matched pairs of the planted source `cfg` (a `config.data.synthetic`) drawn with `seed`,
  and (`with_truth`) its ground truth. The same pairs as `PlantedSource(cfg).paired(n, seed)`."""
  source = PlantedSource(cfg)
  sample = source.paired(n, seed=seed)
  truth = PlantedTruth(source.dictionary, source.kinds) if with_truth else None
  return PlantedPairs(sample.image, sample.text, np.arange(n), truth)
