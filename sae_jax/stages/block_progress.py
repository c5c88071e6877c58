"""Block progress of the analysis and retrieval stages: stop cleanly on a signal, resume from it.

At paper scale (N = 1M pairs, c = 131072) analysis encodes the pairs for hours and retrieval scores
tens of task x variant settings. Each finished block is saved under `<workdir>/.progress/<stage>/`
(arrays as .npz, records as .json, through the atomic writers) before the next starts; inside
`preemption.watch()` a SIGTERM / SIGINT then stops the stage after that block with exit status 75
(`preemption.check`), before any output under analysis/ or retrieval/ is written. A re-run of the
same command finds the saved blocks, computes only the others and ends with the outputs of an
uninterrupted run; a successful stage removes its progress directory. (A stage that fails otherwise
keeps the blocks it finished, so a re-run after a crash resumes too.)

The directory holds `fingerprint.json`, what the blocks were computed from (config section, inputs,
a digest of the arrays): progress of other inputs or settings is discarded with one warning.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Callable, Optional

import numpy as np
from etils import epath

from sae_jax import preemption
from sae_jax import workdir as workdir_lib

PROGRESS_DIR = ".progress"
FINGERPRINT_FILE = "fingerprint.json"


def digest(*arrays: Any, rows: int = 256) -> str:
  """A short digest of arrays (shape, dtype and `rows` rows spread over each), cheap at any N."""
  h = hashlib.sha1()
  for a in arrays:
    a = np.asarray(a)
    h.update(f"{a.shape}{a.dtype}".encode())
    if a.ndim and a.shape[0]:
      h.update(np.ascontiguousarray(a[:: max(1, a.shape[0] // rows)]).tobytes())
    elif a.size:
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def _plain(x: Any) -> Any:
  """NumPy scalars and arrays in a record, as JSON values."""
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


class BlockProgress:
  """The saved blocks of one stage run in `<workdir>/.progress/<stage>/`."""

  def __init__(self, workdir: str, stage: str, fingerprint: dict):
    self.dir = epath.Path(workdir) / PROGRESS_DIR / stage
    self.stage = stage
    self.fingerprint = json.loads(json.dumps(fingerprint))  # as stored (tuples -> lists)
    self.reused = 0  # blocks read back instead of computed
    path = self.dir / FINGERPRINT_FILE
    if self.dir.exists():
      try:
        old = json.loads(path.read_text()) if path.exists() else None
      except json.JSONDecodeError:
        old = None
      if old != self.fingerprint:
        print(
          f"warning: {self.dir} holds the progress of other inputs or settings; starting over",
          file=sys.stderr,
          flush=True,
        )
        self.dir.rmtree()

  def _ready(self) -> None:
    """Creates the directory and its fingerprint on the first save (a stage that fails before
    finishing a block leaves nothing)."""
    path = self.dir / FINGERPRINT_FILE
    if not path.exists():
      self.dir.mkdir(parents=True, exist_ok=True)
      workdir_lib.atomic_write_json(path, self.fingerprint)

  def _arrays(self, name: str) -> Optional[dict]:
    path = self.dir / f"{name}.npz"
    if not path.exists():
      return None
    try:
      with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 -- a damaged block file only means: compute the block again
      print(f"warning: {path} does not load ({type(e).__name__}); computing it again", file=sys.stderr)
      return None

  def arrays(self, name: str, compute: Callable[[], dict], where: str) -> dict:
    """The arrays of block `name`: saved ones, else `compute()` saved; then a preemption check."""
    out = self._arrays(name)
    if out is None:
      out = {k: np.asarray(v) for k, v in compute().items()}
      self._ready()
      workdir_lib.atomic_savez(self.dir / f"{name}.npz", **out)
    else:
      self.reused += 1
    preemption.check(f"after {self.stage} {where} (saved in {self.dir}, resumed from there)")
    return out

  def record(self, name: str, compute: Callable[[], dict], where: str) -> dict:
    """The JSON record of block `name`: the saved one, else `compute()` saved; then a preemption check."""
    path = self.dir / f"{name}.json"
    out = None
    if path.exists():
      try:
        out = json.loads(path.read_text())
        self.reused += 1
      except json.JSONDecodeError:
        out = None
    if out is None:  # through JSON, so a computed record is the same objects as a read-back one
      out = json.loads(json.dumps(compute(), default=_plain))
      self._ready()
      workdir_lib.atomic_write_json(path, out)
    preemption.check(f"after {self.stage} {where} (saved in {self.dir}, resumed from there)")
    return out

  def clear(self) -> None:
    """Removes the progress directory (the stage's outputs are written)."""
    if self.dir.exists():
      self.dir.rmtree()
    top = self.dir.parent
    if top.exists() and not any(top.iterdir()):
      top.rmdir()


def recorded(progress: Optional[BlockProgress], name: str, compute: Callable[[], dict]) -> dict:
  """`compute()`, or with `progress` its saved record (computed and saved when missing, then a
  preemption check)."""
  return compute() if progress is None else progress.record(name, compute, name)


def retrieval_fingerprint(rcfg: Any, inputs: Any, attribution: Optional[tuple]) -> dict:
  """What retrieval's scored settings depend on: config.retrieval, the inputs (`retrieval_inputs.Inputs`:
  description, arrays per variant) and the attribution (`retrieval_inputs.Attribution`: scores per
  rule, D, where from)."""
  arrays = [a for v in inputs.variants.values() for _, a in sorted(v.items()) if isinstance(a, np.ndarray)]
  fp = {"retrieval": rcfg.to_dict(), "inputs": [inputs.description, digest(*arrays)]}
  if attribution is not None:
    scores, D = attribution.scores, attribution.D
    fp["attribution"] = [attribution.source, digest(D, *(scores[k] for k in sorted(scores)))]
  return fp
