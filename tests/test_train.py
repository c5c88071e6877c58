"""Training end to end: recovery, exact resume, sharded == unsharded, and each bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sae_jax import workdir as workdir_lib
from sae_jax.data.shards import ShardWriter
from sae_jax.data.synthetic import PlantedSource
from sae_jax.errors import SaeJaxError
from sae_jax.training import trainer
from tests.helpers.env import ROOT
from tests.helpers.faults import start_two_trainers
from tests.helpers.run_training import final_state, tiny_config

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
FAKE8 = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _run(args, env=ENV, **kw):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw
  )


def _assert_states_equal(a, b, rtol=0.0, atol=0.0):
  assert set(a) - {"n_devices"} == set(b) - {"n_devices"}
  for k in a:
    if k == "n_devices":
      continue
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def test_modern_preset_recovers_planted_dictionary(tmp_path):
  config = tiny_config(num_steps=600)
  config.sae.c, config.sae.k = 256, 12
  config.data.batch_size = 1024
  config.train.checkpoint_every = 600
  config.train.log_every = 200
  config.train.tensorboard = True
  summary = trainer.train_and_evaluate(config, str(tmp_path))
  loaded = workdir_lib.load_sae(str(tmp_path))
  truth = PlantedSource(config.data.synthetic).dictionary
  mean_max_cos = (truth @ loaded.params["D"].T).max(axis=1).mean()
  assert mean_max_cos >= 0.9
  np.testing.assert_allclose(summary["planted_mean_max_cos"], mean_max_cos, rtol=1e-5)
  assert summary["eval_fvu"] < 0.1
  # The workdir contract.
  assert (tmp_path / "config.json").exists() and (tmp_path / "checkpoints" / "600").is_dir()
  lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [ln["step"] for ln in lines] == [200, 400, 600]
  assert {"loss", "fvu", "r2_overcomplete", "l0", "dead_fraction", "tokens_per_s"} <= set(lines[0])
  assert lines[-1]["l0"] == pytest.approx(12.0, abs=0.01)
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_sigkill_and_resume_gives_identical_parameters(tmp_path):
  steps = 120
  ref_dir, ref_out = tmp_path / "ref", tmp_path / "ref.npz"
  r = _run(["-m", "tests.helpers.run_training", str(ref_dir), str(ref_out), "1", "1", str(steps)])
  assert r.returncode == 0, r.stderr[-2000:]
  work = tmp_path / "killed"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "tests.helpers.run_training",
      str(work),
      str(tmp_path / "unused.npz"),
      "1",
      "1",
      str(steps),
    ],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not (work / "checkpoints" / "40").is_dir() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (work / "checkpoints" / "40").is_dir(), "the run never reached its step-40 checkpoint"
  steps_done = sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit())
  assert steps_done[-1] < steps, "killed too late to test resumption"
  r = _run(
    ["-m", "tests.helpers.run_training", str(work), str(tmp_path / "resumed.npz"), "1", "1", str(steps)]
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Resumed from" in r.stdout
  _assert_states_equal(dict(np.load(ref_out)), dict(np.load(tmp_path / "resumed.npz")))


def test_sharded_meshes_match_single_device(tmp_path):
  outs = {}
  for data, model, env in ((1, 1, ENV), (4, 2, FAKE8), (2, 4, FAKE8)):
    out = tmp_path / f"{data}x{model}.npz"
    r = _run(
      [
        "-m",
        "tests.helpers.run_training",
        str(tmp_path / f"w{data}{model}"),
        str(out),
        str(data),
        str(model),
        "10",
      ],
      env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    outs[(data, model)] = dict(np.load(out))
  assert int(outs[(4, 2)]["n_devices"]) == 8
  for mesh in ((4, 2), (2, 4)):
    _assert_states_equal(outs[(1, 1)], outs[mesh], rtol=2e-5, atol=2e-6)


def test_checkpoint_saved_on_8_devices_resumes_on_1(tmp_path):
  work, ref = tmp_path / "w", tmp_path / "ref"
  r = _run(
    ["-m", "tests.helpers.run_training", str(work), str(tmp_path / "a.npz"), "4", "2", "10"], env=FAKE8
  )
  assert r.returncode == 0, r.stderr[-2000:]
  r = _run(["-m", "tests.helpers.run_training", str(work), str(tmp_path / "b.npz"), "1", "1", "20"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Resumed from" in r.stdout
  r = _run(["-m", "tests.helpers.run_training", str(ref), str(tmp_path / "c.npz"), "1", "1", "20"])
  assert r.returncode == 0, r.stderr[-2000:]
  _assert_states_equal(
    dict(np.load(tmp_path / "b.npz")), dict(np.load(tmp_path / "c.npz")), rtol=2e-5, atol=2e-6
  )


def test_two_processes_match_one(tmp_path):
  """Two jax processes (2 CPU devices each, coordinator on 127.0.0.1) == one process."""
  work = tmp_path / "mp"
  procs = start_two_trainers(work, 10, ENV)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
  assert "SUMMARY" in outs[0] and "SUMMARY" not in outs[1]  # only process 0 logs
  r = _run(
    ["-m", "tests.helpers.run_training", str(tmp_path / "one"), str(tmp_path / "one.npz"), "1", "1", "10"]
  )
  assert r.returncode == 0, r.stderr[-2000:]
  _assert_states_equal(
    final_state(str(work), tiny_config(num_steps=10)),
    dict(np.load(tmp_path / "one.npz")),
    rtol=2e-5,
    atol=2e-6,
  )


# ------------------------------------------------------------------------------ bad input


def _bad_config(tmp_path, **overrides):
  config = tiny_config(num_steps=3)
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def test_nonfinite_rows_error_or_skip(tmp_path, monkeypatch):
  from sae_jax.data import pipeline

  source = PlantedSource(tiny_config().data.synthetic)

  def poisoned(i):
    b = source.training_batch(i, 64)
    b[3, 5] = np.nan
    b[10] = np.inf
    return b

  monkeypatch.setattr(pipeline, "batch_fn", lambda config, *process: poisoned)
  with pytest.raises(SaeJaxError, match=r"batch 0: 2 row\(s\) contain NaN/Inf \(first at row 3\)"):
    trainer.train_and_evaluate(_bad_config(tmp_path), str(tmp_path / "a"))
  assert not (tmp_path / "a" / "checkpoints" / "3").exists()
  summary = trainer.train_and_evaluate(_bad_config(tmp_path, data__nonfinite="skip"), str(tmp_path / "b"))
  assert summary["rows_skipped"] == 6  # 2 per batch x 3 steps
  assert np.isfinite(summary["loss"])


def test_width_mismatch(tmp_path):
  with pytest.raises(
    SaeJaxError, match=r"config.sae.d=32 but config.data.source='synthetic' yields rows of width 64"
  ):
    trainer.train_and_evaluate(_bad_config(tmp_path, sae__d=32), str(tmp_path))


def test_empty_and_truncated_shard_directories(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(SaeJaxError, match=r"index.json is missing"):
    trainer.train_and_evaluate(
      _bad_config(tmp_path, data__source="shards", data__shard_dir=str(empty)), str(tmp_path / "w1")
    )
  shards = tmp_path / "shards"
  w = ShardWriter(str(shards), d=64, rows_per_shard=100)
  w.add(np.random.default_rng(0).standard_normal((250, 64)).astype(np.float32))
  w.close()
  with open(shards / "shard-00001.npy", "r+b") as f:
    f.truncate(2000)
  with pytest.raises(SaeJaxError, match=r"shard-00001.npy is truncated"):
    trainer.train_and_evaluate(
      _bad_config(tmp_path, data__source="shards", data__shard_dir=str(shards)), str(tmp_path / "w2")
    )


def test_checkpoint_shapes_must_match_config(tmp_path):
  trainer.train_and_evaluate(_bad_config(tmp_path), str(tmp_path))
  config = _bad_config(tmp_path, sae__c=128, train__allow_config_change=True)
  with pytest.raises(SaeJaxError, match=r"params/D has shape \(64, 64\), the config implies \(128, 64\)"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_workdir_with_other_config_is_refused(tmp_path):
  trainer.train_and_evaluate(_bad_config(tmp_path), str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(SaeJaxError, match=r"holds a run with a different config .* first optim.lr"):
    trainer.train_and_evaluate(_bad_config(tmp_path, optim__lr=1e-2), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == before
  # Longer training of the same run is a resume, not a config change.
  summary = trainer.train_and_evaluate(_bad_config(tmp_path, train__num_steps=5), str(tmp_path))
  assert summary["step"] == 5


def test_workdir_with_sections_of_another_preset_resumes(tmp_path):
  # A plain run's config.json holds base's sections only, not the study's (configs/study_common.py).
  trainer.train_and_evaluate(_bad_config(tmp_path), str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  assert {"sae", "train", "extract"} <= set(saved)
  assert not {"study", "shapes", "encoder_training"} & set(saved)
  # A workdir written when configs/base.py declared the study's sections too resumes without them ...
  from configs import study_common

  study = json.loads(study_common.get_config().to_json())
  old = {**saved, **{s: study[s] for s in ("shapes", "encoder_training", "study")}}
  (tmp_path / "config.json").write_text(json.dumps(old))
  summary = trainer.train_and_evaluate(_bad_config(tmp_path, train__num_steps=5), str(tmp_path))
  assert summary["step"] == 5
  # ... while a field changed in a section both hold is still refused.
  with pytest.raises(SaeJaxError, match=r"holds a run with a different config .* first sae.k"):
    trainer.train_and_evaluate(_bad_config(tmp_path, sae__k=5, train__num_steps=6), str(tmp_path))


def test_cli_overrides_and_unknown_field(tmp_path):
  r = _run(
    [
      "-m",
      "experiments.train",
      "--config=configs/synthetic.py:tiny",
      f"--workdir={tmp_path}",
      "--config.train.num_steps=4",
      "--config.train.log_every=2",
      "--config.sae.c=128",
    ]
  )
  assert r.returncode == 0, r.stderr[-2000:]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["train"]["num_steps"] == 4 and saved["sae"]["c"] == 128
  assert saved["sae_spec"]["c"] == 128 and saved["sae_spec"]["aux_k"] == 32
  assert "SUMMARY" in r.stdout and "step       4" in r.stdout
  r = _run(
    [
      "-m",
      "experiments.train",
      "--config=configs/synthetic.py:tiny",
      f"--workdir={tmp_path}/x",
      "--config.sae.dictionary_size=10",
    ]
  )
  assert r.returncode != 0
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and "config.sae.dictionary_size" in err[0], r.stderr
  r = _run(
    [
      "-m",
      "experiments.train",
      "--config=configs/synthetic.py:tiny",
      f"--workdir={tmp_path}/y",
      "--config.sae.preset=fancy",
    ]
  )
  assert (
    r.returncode == 1
    and r.stderr.strip() == "error: config.sae.preset='fancy': expected one of ('paper', 'modern')"
  )


_RESUME_SCRIPT = """
import sys
import numpy as np
from tests.helpers.run_training import final_state, tiny_config
from sae_jax.training import trainer
workdir, out, data, model, steps, backward, top_k, zero = sys.argv[1:9]
config = tiny_config(int(data), int(model), int(steps))
config.sae.backward, config.sae.top_k = backward, top_k
config.mesh.shard_optimizer = zero == "1"
trainer.train_and_evaluate(config, workdir)
np.savez(out, **final_state(workdir, config))
"""


def test_resume_across_backward_top_k_and_mesh_changes(tmp_path):
  """10 steps on a 4x2 mesh (scatter backward, exact top-k, ZeRO-1 moments), resumed to 20 on one
  device with the dense backward and approx top-k, equals 20 uninterrupted steps on one device."""
  work, ref = tmp_path / "w", tmp_path / "ref"

  def run(workdir, out, mesh, steps, backward, top_k, zero, env):
    args = [str(workdir), str(tmp_path / out), str(mesh[0]), str(mesh[1]), str(steps), backward, top_k, zero]
    r = _run(["-c", _RESUME_SCRIPT, *args], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r

  run(work, "a.npz", (4, 2), 10, "scatter", "exact", "1", FAKE8)
  r = run(work, "b.npz", (1, 1), 20, "dense", "approx", "0", ENV)
  assert "Resumed from" in r.stdout
  run(ref, "c.npz", (1, 1), 20, "scatter", "exact", "0", ENV)
  _assert_states_equal(
    dict(np.load(tmp_path / "b.npz")), dict(np.load(tmp_path / "c.npz")), rtol=2e-5, atol=2e-6
  )
