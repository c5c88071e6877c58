"""The workdir contract: `config.json`, atomic writers, and loading a trained SAE.

Every stage reads and writes one directory:
  config.json          the resolved config (with `sae_spec`, the SAE preset's resolved fields)
  checkpoints/<step>/  orbax checkpoints (`sae_jax.training.checkpoint`)
  metrics.jsonl        one JSON object per logged training step
  activations/         extraction output; analysis/ and retrieval/: the later stages' outputs
Files are written under a temporary name and renamed, so a killed process never leaves a
half-written file under the real name. Paths go through `etils.epath` (orbax's path layer), so a
workdir may be local or remote (`gs://bucket/run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Iterator, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from sae_jax import sae as sae_lib
from sae_jax.errors import SaeJaxError
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib

CONFIG_FILE = "config.json"

# Fields that may differ between a workdir's config.json and a resumed run's config: how long and
# where the run goes, not what it computes.
RESUMABLE_FIELDS = (
  "train.num_steps",
  "train.log_every",
  "train.log_every_s",
  "train.checkpoint_every",
  "train.max_to_keep",
  "train.async_checkpoint",
  "train.preempt_check_every",
  "train.allow_config_change",
  "train.restore_retries",
  "train.restore_backoff_s",
  "train.tensorboard",
  "train.wandb_project",
  "train.wandb_entity",
  "train.wandb_mode",
  "mesh.data",
  "mesh.model",
  "mesh.multihost",
  "mesh.coordinator_address",
  "mesh.num_processes",
  "mesh.process_id",
  "mesh.heartbeat_timeout_s",
  "mesh.init_timeout_s",
  "mesh.shutdown_timeout_s",
  "data.prefetch",
  "analysis",
  "retrieval",
  "extract",
  "sae.decoder",
  "sae_spec.decoder",
  "sae.backward",
  "sae_spec.backward",
  "sae.top_k",
  "sae_spec.top_k",
  "sae.approx_recall",
  "sae_spec.approx_recall",
  "mesh.shard_optimizer",
)


# ------------------------------------------------------------------------------ atomic writers


def is_remote(path: Any) -> bool:
  """`gs://...`-style paths (no local file descriptors, memory maps or appends there)."""
  return "://" in os.fspath(path)


def _atomic_write(path: Any, write: Any) -> None:
  """Calls `write(f)` on a binary file at a temporary name, then renames it to `path`."""
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  with tmp.open("wb") as f:
    write(f)  # streamed, not buffered: pooled arrays can be GBs
    if not is_remote(path):
      f.flush()
      os.fsync(f.fileno())
  tmp.replace(path)  # object stores publish an object whole, so the rename only matters locally


def atomic_write_text(path: Any, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename (fsynced when local)."""
  _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Any, obj: Any, indent: int = 1) -> None:
  atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_savez(path: Any, **arrays: Any) -> None:
  """np.savez to `path` (which should end in .npz) via a temporary file and a rename."""
  _atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_save_npy(path: Any, array: np.ndarray) -> None:
  _atomic_write(path, lambda f: np.save(f, array))


def atomic_savefig(fig: Any, path: Any, **kwargs: Any) -> None:
  """matplotlib `fig.savefig` via a temporary file (the format from the extension of `path`)."""
  kwargs.setdefault("format", os.path.splitext(os.fspath(path))[1].lstrip(".") or None)
  _atomic_write(path, lambda f: fig.savefig(f, **kwargs))


def append_text(path: Any, text: str) -> None:
  """Appends `text` to `path`; on object stores (no appends) rewrites the object with it added."""
  path = epath.Path(path)
  if not is_remote(path):
    with open(os.fspath(path), "a") as f:
      f.write(text)
    return
  old = path.read_text() if path.exists() else ""
  atomic_write_text(path, old + text)


def exists(path: Any) -> bool:
  """Whether `path` exists, local or remote (`gs://...`)."""
  return epath.Path(path).exists()


@contextlib.contextmanager
def open_npz(path: Any) -> Iterator[Any]:
  """`np.load(path, allow_pickle=False)` of an .npz, local or remote (read through etils.epath:
  members are fetched as they are accessed)."""
  if not is_remote(path):
    with np.load(os.fspath(path), allow_pickle=False) as z:
      yield z
    return
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
    yield z


def read_json(path: Any) -> Any:
  """A JSON file (local or remote); a truncated or garbled one is one line naming it."""
  try:
    return json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise SaeJaxError(f"{path}: not valid JSON ({e}); the file is truncated or damaged") from None


# ------------------------------------------------------------------------------- config.json


def flatten(d: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def resolved_config_dict(config: ml_collections.ConfigDict, spec: sae_lib.SAESpec) -> dict:
  """The config as JSON plus the SAE spec it resolves to (what config.json stores)."""
  d = json.loads(config.to_json())
  d["sae_spec"] = dataclasses.asdict(spec)
  return d


def check_workdir_config(workdir: str, new: dict, allow_change: bool) -> None:
  """Refuses a workdir whose config.json describes a different run (one line, first difference)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  old = read_json(path)
  old_flat, new_flat = flatten(old), flatten(new)
  # A section only one side holds configures no stage of the other run: a workdir written when
  # configs/base.py declared every preset's sections (the study's too) resumes under a preset without them.
  one_sided = {s for s in set(old) ^ set(new) if isinstance(old.get(s, new.get(s)), dict)}
  ignored = lambda k: (
    k.split(".")[0] in one_sided or any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
  )
  diff = sorted(
    k for k in set(old_flat) | set(new_flat) if not ignored(k) and old_flat.get(k) != new_flat.get(k)
  )
  if diff and not allow_change:
    k = diff[0]
    raise SaeJaxError(
      f"{path} holds a run with a different config ({len(diff)} field(s) differ, first "
      f"{k}: {old_flat.get(k)!r} there vs {new_flat.get(k)!r} now); use another --workdir or "
      "pass --config.train.allow_config_change=True"
    )


def overrides_in_conflict(saved: dict, overrides: dict, prefixes: tuple = ("sae.",)) -> list:
  """[(field, command-line value, saved value)] for each override under `prefixes` that differs from
  the workdir's config.json (`saved`). A field saved as "auto" / -1 is compared with the value it
  resolved to (`sae_spec`), so `--config.sae.aux_k=32` matches a run that resolved aux_k to 32."""
  flat = flatten(saved)
  spec = saved.get("sae_spec", {})
  out = []
  for field, value in sorted(overrides.items()):
    if not field.startswith(prefixes) or field not in flat:
      continue
    old = flat[field]
    if old in ("auto", -1) and field.startswith("sae.") and field[4:] in spec:
      old = spec[field[4:]]
    as_json = lambda v: json.loads(json.dumps(v.to_dict() if hasattr(v, "to_dict") else v))
    if as_json(value) != as_json(old) and not (
      isinstance(value, (list, tuple)) and isinstance(old, (list, tuple)) and list(value) == list(old)
    ):
      out.append((field, value, old))
  return out


def write_config(workdir: str, resolved: dict) -> None:
  atomic_write_json(epath.Path(workdir) / CONFIG_FILE, resolved)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise SaeJaxError(f"{path} is missing: {workdir} is not an sae-jax training workdir")
  return ml_collections.ConfigDict(read_json(path))


def spec_of_config(config: ml_collections.ConfigDict) -> sae_lib.SAESpec:
  """The SAE spec a workdir's config.json records (its `sae_spec`, else resolved from `sae`)."""
  if "sae_spec" in config:
    return sae_lib.SAESpec(**config.sae_spec.to_dict())
  return sae_lib.spec_from_config(config.sae)


# --------------------------------------------------------------------------------- load_sae


class LoadedSAE(NamedTuple):
  params: dict  # numpy arrays; D has unit-norm rows
  spec: sae_lib.SAESpec
  config: ml_collections.ConfigDict
  step: int

  @property
  def k(self) -> int:
    return self.spec.k


def load_sae(workdir: str, step: Optional[int] = None) -> LoadedSAE:
  """The SAE parameters of a training workdir (newest checkpoint unless `step`), on the host."""
  config = read_config(workdir)
  manager = ckpt_lib.make_manager(workdir)
  steps = manager.all_steps()
  if not steps:
    raise SaeJaxError(
      f"{os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)}: no checkpoint found "
      "(train first with experiments.train)"
    )
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise SaeJaxError(f"{workdir}: no checkpoint at step {step}; available: {sorted(steps)}")
  spec = spec_of_config(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state_lib.abstract_state(spec, config)
  )
  state, _ = ckpt_lib.restore_retrying(manager, step, abstract)  # storage errors retried
  manager.close()
  params = {k: np.asarray(v) for k, v in state["params"].items()}
  params["D"] = np.asarray(sae_lib.normalize_rows(params["D"]))
  return LoadedSAE(params, spec, config, int(step))
