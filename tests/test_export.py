"""Export to SAELens and Overcomplete, checked against the real packages; optional W&B logging.

SAELens (sae-lens 6.x `TopKSAE`) takes the top k pre-activations and then applies ReLU; our encoder
rectifies first. The exported SAE must give the same codes and reconstruction on inputs where some
rows have fewer than k positive pre-activations (where the two orders could differ) and others more.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from configs import base, synthetic
from sae_jax import sae as sae_lib
from sae_jax import workdir as workdir_lib
from sae_jax.data import shards as shards_lib
from sae_jax.errors import SaeJaxError
from sae_jax.interop import export as export_lib
from sae_jax.interop import overcomplete as overcomplete_lib
from sae_jax.interop import saelens as saelens_lib
from sae_jax.training import trainer
from tests.helpers.logs import read_wandb_records

D, C, K = 24, 80, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shard_dir(path: str) -> str:
  """A real (tiny) shard directory whose index records the extraction, as experiments.extract writes."""
  writer = shards_lib.ShardWriter(
    path,
    d=D,
    dtype="float32",
    rows_per_shard=8,
    metadata={
      "extract": {"model_name": "tiny:clip", "family": "clip", "layer": 3, "shard_token_types": ["text"]}
    },
  )
  writer.add(np.zeros((8, D), np.float32), np.full(8, 2, np.uint8), np.arange(8))
  writer.close()
  return path


def _paper_workdir(tmp_path) -> str:
  """A paper-preset workdir (an imported Overcomplete checkpoint: raw, unnormalised dictionary)
  whose encoder biases leave some rows with fewer than K positive pre-activations."""
  g = torch.Generator().manual_seed(0)
  state = {
    "encoder.final_block.0.weight": torch.randn(C, D, generator=g) * 0.3,
    "encoder.final_block.0.bias": torch.randn(C, generator=g) * 0.2 - 1.5,
    "dictionary._weights": torch.randn(C, D, generator=g) * 3.0,
    "dictionary.multiplier": torch.tensor(0.0),
  }
  torch.save({"model_state": state}, tmp_path / "authors.pt")
  config = base.get_config()
  config.data.source = "shards"
  config.data.shard_dir = _shard_dir(str(tmp_path / "shards"))
  workdir = str(tmp_path / "paper")
  overcomplete_lib.import_overcomplete(str(tmp_path / "authors.pt"), workdir, K, config)
  return workdir


def _inputs(n: int = 64, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.1, 3.0, (n, 1))  # small rows: few positive pre-activations; large: many
  return (rng.standard_normal((n, D)) * scale).astype(np.float32)


def _ours(sae: workdir_lib.LoadedSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  code = sae_lib.encode(sae.params, x, sae.k, sae.spec)
  z = np.asarray(sae_lib.dense_codes(code, sae.spec.c))
  return z, np.asarray(sae_lib.decode(sae.params, code, with_bias=sae.spec.pre_bias))


def _saelens(out: str, x: np.ndarray) -> tuple[object, np.ndarray, np.ndarray]:
  from sae_lens import SAE

  model = SAE.load_from_disk(out)
  with torch.no_grad():
    z = model.encode(torch.from_numpy(x))
    return model, z.numpy(), model.decode(z).numpy()


def test_saelens_export_paper_preset_matches_ours(tmp_path):
  workdir = _paper_workdir(tmp_path)
  out = export_lib.export_sae(workdir, "saelens", str(tmp_path / "saelens"))
  assert sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors"]
  sae = workdir_lib.load_sae(workdir)
  x = _inputs()
  pre = np.asarray(sae_lib.pre_activations(sae.params, x, sae.spec))
  positives = (pre > 0).sum(1)
  assert (positives < K).sum() >= 5 and (positives > K).sum() >= 5  # both orders' cases occur
  model, z_lens, x_hat_lens = _saelens(out, x)
  z, x_hat = _ours(sae, x)
  np.testing.assert_allclose(z_lens, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat_lens, x_hat, rtol=1e-5, atol=1e-5)
  assert ((z > 0).sum(1) == np.minimum(positives, K)).all()
  # The layout SAELens loaded, and the activation source taken from the shards' index.
  assert type(model).__name__ == "TopKSAE" and model.cfg.k == K and model.cfg.d_sae == C
  assert model.cfg.apply_b_dec_to_input is False and model.cfg.rescale_acts_by_decoder_norm is False
  np.testing.assert_array_equal(model.b_dec.detach().numpy(), np.zeros(D, np.float32))
  assert model.cfg.metadata.model_name == "tiny:clip" and model.cfg.metadata.hook_name == "hidden_states.3"
  assert model.cfg.metadata.sae_jax_step == 0 and model.cfg.metadata.token_types == ["text"]


def test_overcomplete_round_trip_is_bit_exact_and_loads_in_overcomplete(tmp_path):
  workdir = _paper_workdir(tmp_path)
  out = export_lib.export_sae(workdir, "overcomplete", str(tmp_path / "oc"))
  pt = os.path.join(out, export_lib.OVERCOMPLETE_FILE)
  obj = torch.load(pt, map_location="cpu", weights_only=True)
  assert obj["top_k"] == K and obj["sae_jax"]["model_name"] == "tiny:clip"
  back = overcomplete_lib.import_overcomplete(pt, str(tmp_path / "back"), obj["top_k"], base.get_config())
  original = workdir_lib.load_sae(workdir)
  for name in ("W_enc", "b_enc", "D", "b_dec"):
    np.testing.assert_array_equal(back.params[name], original.params[name])
  raw = export_lib._raw_params(workdir, original)  # the stored checkpoints are identical too
  raw_back = export_lib._raw_params(str(tmp_path / "back"), back)
  for name in raw:
    assert raw[name].tobytes() == raw_back[name].tobytes(), name

  # The real Overcomplete TopKSAE loads the state dict (strict) and computes what we compute.
  TopKSAE = _overcomplete_topk_sae()
  model = TopKSAE(D, C, top_k=K)
  model.load_state_dict(obj["model_state"], strict=True)
  model.eval()
  x = _inputs()
  with torch.no_grad():
    _, z_oc, x_hat_oc = model(torch.from_numpy(x))
  z, x_hat = _ours(original, x)
  np.testing.assert_allclose(z_oc.numpy(), z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat_oc.numpy(), x_hat, rtol=1e-5, atol=1e-5)


def _overcomplete_topk_sae():
  # overcomplete/__init__.py imports torchvision (absent beside the CPU torch): load the submodule alone.
  if "overcomplete" not in sys.modules:
    spec = importlib.util.find_spec("overcomplete")
    assert spec is not None, "overcomplete is not installed (pip install --no-deps overcomplete==0.3.0)"
    package = types.ModuleType("overcomplete")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["overcomplete"] = package
  from overcomplete.sae.topk_sae import TopKSAE

  return TopKSAE


# ------------------------------------------------------------------- modern preset + W&B offline


def test_modern_run_logs_to_wandb_offline_and_exports_to_saelens(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's stdout capture alone
  config = synthetic.get_config("tiny,modern")
  config.train.num_steps = 20
  config.train.log_every = 10
  config.train.checkpoint_every = 20
  config.train.async_checkpoint = False
  config.train.wandb_project = "sae-jax-test"
  workdir = str(tmp_path / "modern")
  trainer.train_and_evaluate(config, workdir)

  # W&B got the resolved config (config.json) and, at the same steps, the scalars of metrics.jsonl.
  (run_file,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  records = read_wandb_records(run_file)
  history, logged_config = {}, {}
  for r in records:
    kind = r.WhichOneof("record_type")
    if kind == "history":
      row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      history[r.history.step.num] = {k[len("train/") :]: v for k, v in row.items() if k.startswith("train/")}
    elif kind in ("run", "config"):
      items = r.run.config.update if kind == "run" else r.config.update
      logged_config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    jsonl = [json.loads(line) for line in f]
  assert sorted(history) == [m["step"] for m in jsonl] == [10, 20]
  for m in jsonl:
    assert history[m["step"]] == {k: v for k, v in m.items() if k != "step"}
  with open(os.path.join(workdir, "config.json")) as f:
    resolved = json.load(f)
  assert {k: v for k, v in logged_config.items() if k != "_wandb"} == resolved
  with open(os.path.join(workdir, trainer.WANDB_ID_FILE)) as f:
    assert f.read().strip() in run_file

  # The modern preset has a pre-bias: SAELens subtracts b_dec from the input and adds it back.
  sae = workdir_lib.load_sae(workdir)
  assert sae.spec.pre_bias and np.abs(sae.params["b_dec"]).max() > 0.1
  out = export_lib.export_sae(workdir, "saelens", str(tmp_path / "saelens"))
  x = np.random.default_rng(2).standard_normal((64, sae.spec.d)).astype(np.float32) + sae.params["b_dec"]
  model, z_lens, x_hat_lens = _saelens(out, x)
  assert model.cfg.apply_b_dec_to_input is True and model.cfg.metadata.model_name == "synthetic"
  z, x_hat = _ours(sae, x)
  np.testing.assert_allclose(z_lens, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat_lens, x_hat, rtol=1e-5, atol=1e-5)
  with pytest.raises(SaeJaxError, match=r"has a decoder bias b_dec .* export it with --format=saelens$"):
    export_lib.export_sae(workdir, "overcomplete", str(tmp_path / "oc"))
  assert not os.path.exists(tmp_path / "oc") and not glob.glob(str(tmp_path / "oc.tmp-*"))

  # Resuming the training run continues the same W&B run (same id) from the restored step.
  config.train.num_steps = 30
  trainer.train_and_evaluate(config, workdir)
  run_files = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")))
  assert len(run_files) == 2 and {os.path.basename(f) for f in run_files} == {os.path.basename(run_file)}
  resumed = [
    r.history.step.num for r in read_wandb_records(run_files[1]) if r.WhichOneof("record_type") == "history"
  ]
  assert resumed == [30]


# ------------------------------------------------------------------------------------ bad input


def _one_line_error(fn, match: str) -> str:
  with pytest.raises(SaeJaxError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_export_bad_input_is_one_line(tmp_path):
  workdir = _paper_workdir(tmp_path)
  _one_line_error(
    lambda: export_lib.export_sae(workdir, "neuronpedia", str(tmp_path / "x")),
    r"--format='neuronpedia': expected one of \('saelens', 'overcomplete'\)",
  )
  (tmp_path / "exists").mkdir()
  _one_line_error(
    lambda: export_lib.export_sae(workdir, "saelens", str(tmp_path / "exists")), r"exists already exists"
  )
  empty = tmp_path / "untrained"
  empty.mkdir()
  _one_line_error(
    lambda: export_lib.export_sae(str(empty), "saelens", str(tmp_path / "y")), "config.json is missing"
  )
  workdir_lib.write_config(str(empty), json.loads(open(os.path.join(workdir, "config.json")).read()))
  _one_line_error(
    lambda: export_lib.export_sae(str(empty), "saelens", str(tmp_path / "y")), "no checkpoint found"
  )
  assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
  with pytest.raises(SaeJaxError, match=r"^SAELens export: parameter W_enc holds NaN or Inf"):
    spec = sae_lib.SAESpec(d=2, c=3, k=1)
    params = {"W_enc": np.full((2, 3), np.nan), "b_enc": np.zeros(3), "D": np.eye(3, 2), "b_dec": np.zeros(2)}
    saelens_lib.write_saelens(str(tmp_path), params, spec)


def test_export_main_prints_one_line(tmp_path):
  workdir = _paper_workdir(tmp_path)
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "experiments.export_sae", f"--workdir={workdir}", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  ok = run("--format=saelens", f"--out={tmp_path / 'out'}")
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip() == f"exported {workdir} (saelens) -> {tmp_path / 'out'}"
  bad = run("--format=onnx", f"--out={tmp_path / 'out2'}")
  assert bad.returncode == 1
  assert bad.stderr.strip() == "error: --format='onnx': expected one of ('saelens', 'overcomplete')"


def test_wandb_settings_errors_are_one_line(tmp_path, monkeypatch):
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
  train_cfg = base.get_config().train
  assert train_cfg.wandb_project == ""  # off by default: no W&B run, no files
  trainer.MetricsLogger(str(tmp_path), False, train_cfg, {}).close()
  assert not os.path.exists(tmp_path / "wandb") and not os.path.exists(tmp_path / trainer.WANDB_ID_FILE)
  train_cfg.wandb_project = "p"
  train_cfg.wandb_mode = "sometimes"
  _one_line_error(
    lambda: trainer.MetricsLogger(str(tmp_path), False, train_cfg, {}),
    r"^config.train.wandb_mode='sometimes': expected '' \(\$WANDB_MODE\), 'online' or 'offline'$",
  )
  train_cfg.wandb_mode = "online"  # no credentials: W&B refuses before any network access
  _one_line_error(
    lambda: trainer.MetricsLogger(str(tmp_path), False, train_cfg, {}),
    r"^config.train.wandb_project='p': W&B did not start \(.*API key.*\); log in \(wandb login\) or set config.train.wandb_mode=offline$",
  )
