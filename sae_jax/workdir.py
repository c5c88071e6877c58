"""The workdir contract: `config.json`, atomic writers, and loading a trained SAE.

Every stage reads and writes one directory:
  config.json          the resolved config (with `sae_spec`, the SAE preset's resolved fields)
  checkpoints/<step>/  orbax checkpoints (`sae_jax.training.checkpoint`)
  metrics.jsonl        one JSON object per logged training step
  activations/         extraction output; analysis/ and retrieval/: the later stages' outputs
Files are written under a temporary name and renamed, so a killed process never leaves a
half-written file under the real name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
import numpy as np

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
  "train.checkpoint_every",
  "train.max_to_keep",
  "train.async_checkpoint",
  "train.allow_config_change",
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
  "data.prefetch",
  "analysis",
  "retrieval",
  "extract",
  "sae.decoder",
  "sae_spec.decoder",
)


# ------------------------------------------------------------------------------ atomic writers


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename (fsynced)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any, indent: int = 1) -> None:
  atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_savez(path: str, **arrays: Any) -> None:
  """np.savez to `path` (which should end in .npz) via a temporary file and a rename."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def atomic_savefig(fig: Any, path: str, **kwargs: Any) -> None:
  """matplotlib `fig.savefig` via a temporary file (same extension, so the format is kept)."""
  root, ext = os.path.splitext(path)
  tmp = root + ".tmp" + ext
  fig.savefig(tmp, **kwargs)
  os.replace(tmp, path)


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
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  old_flat, new_flat = flatten(old), flatten(new)
  ignored = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
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


def write_config(workdir: str, resolved: dict) -> None:
  atomic_write_json(os.path.join(workdir, CONFIG_FILE), resolved)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise SaeJaxError(f"{path} is missing: {workdir} is not an sae-jax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


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
  state, _ = ckpt_lib.restore(manager, step, abstract)
  manager.close()
  params = {k: np.asarray(v) for k, v in state["params"].items()}
  params["D"] = np.asarray(sae_lib.normalize_rows(params["D"]))
  return LoadedSAE(params, spec, config, int(step))
