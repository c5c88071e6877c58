"""`export_sae(workdir, format, out)`: a trained SAE out of its workdir, for other SAE tools.

- "saelens": `cfg.json` + `sae_weights.safetensors`, a sae-lens TopKSAE (`SAE.load_from_disk(out)`),
  with the model and layer the activations came from in its metadata.
- "overcomplete": `sae.pt`, an Overcomplete TopKSAE state dict in the layout of the paper authors'
  released files; `import_overcomplete` reads it back to the same parameters, bit for bit.

The output directory must not exist; it is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np

from sae_jax import workdir as workdir_lib
from sae_jax.data import shards as shards_lib
from sae_jax.errors import SaeJaxError
from sae_jax.interop import overcomplete as overcomplete_lib
from sae_jax.interop import saelens as saelens_lib
from sae_jax.training import checkpoint as ckpt_lib
from sae_jax.training import state as state_lib

FORMATS = ("saelens", "overcomplete")
OVERCOMPLETE_FILE = "sae.pt"


def activation_source(config: Any) -> dict[str, Any]:
  """Where a workdir's training activations came from: the extraction that wrote its shards (their
  index.json), else its config's `extract` section (online extraction); "synthetic" for the planted
  source. `hook_name` is "hidden_states.<layer>": the HuggingFace `output_hidden_states` index."""
  source = str(config.data.source)
  if source == "synthetic":
    return {"model_name": "synthetic", "hook_name": "synthetic", "data_source": source}
  extract = dict(config.extract.to_dict())
  origin = "config.extract"
  if source == "shards" and config.data.shard_dir:
    index_path = os.path.join(str(config.data.shard_dir), shards_lib.INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        recorded = json.load(f).get("metadata", {}).get("extract")
      if recorded:
        extract, origin = recorded, index_path
  model_name = str(extract.get("model_name", "")) or None
  layer = int(extract.get("layer", -1))
  return {
    "model_name": model_name,
    "hook_name": f"hidden_states.{layer}",
    "hook_head_index": None,
    "data_source": source,
    "model_family": str(extract.get("family", "")) or None,
    "layer": layer,
    "token_types": list(extract.get("shard_token_types", ())),
    "activations_from": origin,
  }


def _raw_params(workdir: str, sae: workdir_lib.LoadedSAE) -> dict[str, np.ndarray]:
  """The checkpoint's parameters as stored (`load_sae` renormalises D; Overcomplete renormalises
  its `_weights` itself, so the stored D is what makes the round trip exact)."""
  manager = ckpt_lib.make_manager(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    state_lib.abstract_state(sae.spec, sae.config),
  )
  state, _ = ckpt_lib.restore(manager, sae.step, abstract)
  manager.close()
  return {k: np.asarray(v) for k, v in state["params"].items()}


def export_sae(workdir: str, fmt: str, out: str, step: Optional[int] = None) -> str:
  """Writes the SAE of `workdir` (newest checkpoint unless `step`) to the new directory `out` in
  format `fmt` ("saelens" | "overcomplete"); returns `out`."""
  if fmt not in FORMATS:
    raise SaeJaxError(f"--format={fmt!r}: expected one of {FORMATS}")
  if os.path.lexists(out):
    raise SaeJaxError(f"--out={out} already exists; give a new directory (an export never overwrites)")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise SaeJaxError(f"--out={out}: parent directory {parent} does not exist")
  sae = workdir_lib.load_sae(workdir, step)
  metadata = {
    **activation_source(sae.config),
    "sae_jax_workdir": os.path.abspath(workdir),
    "sae_jax_step": sae.step,
    "sae_jax_preset": sae.spec.preset,
  }
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    if fmt == "saelens":
      saelens_lib.write_saelens(tmp, sae.params, sae.spec, metadata)
    else:
      overcomplete_lib.write_overcomplete(
        os.path.join(tmp, OVERCOMPLETE_FILE), _raw_params(workdir, sae), sae.spec, metadata
      )
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
