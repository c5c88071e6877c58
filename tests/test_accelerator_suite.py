"""benchmarks/accelerator_suite.py --dry: the accelerator suite's own code, at tiny sizes on CPU, so it
cannot rot between lent devices (~45 s on 2 loaded cores)."""

import json
import subprocess
import sys

from benchmarks import accelerator_suite as suite
from tests.helpers.env import ROOT


def test_dry_run_measures_every_figure(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "benchmarks.accelerator_suite", "--dry", f"--results_dir={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  saved = json.loads((tmp_path / "cpu-dry.json").read_text())
  assert saved["figures"] == lines and saved["dry"] and saved["device"] == "cpu"
  assert not [r for r in lines if "error" in r or "skipped" in r], lines
  size = suite.DRY
  (c, batch), d, k = size["train_shapes"][0], size["d"], size["k"]

  ours = {r["impl"]: r for r in lines if r["figure"] == "train_step" and r["impl"].startswith("sae_jax")}
  assert set(ours) == {f"sae_jax/{p}/bfloat16/backward={b}" for p, b in size["variants"]}
  for r in ours.values():
    assert (r["d"], r["c"], r["batch"], r["k"], r["dtype"]) == (d, c, batch, k, "bfloat16")
    assert r["backward"] == r["impl"].rsplit("=", 1)[1] and r["loss_finite"]
    assert r["flops_per_step"] == 4 * batch * d * c + 6 * batch * k * d
    assert abs(r["tokens_per_s"] * r["median_step_s"] / batch - 1) < 0.01  # of 5-digit rounded times
    # W_enc + D + their two Adam moments alone are 6 c d float32 values.
    assert r["program_memory_gib"] >= 6 * c * d * 4 / 2**30
  peers = {r["impl"]: r for r in lines if r["figure"] == "train_step" and not r["impl"].startswith("sae_jax")}
  assert set(peers) == {"sparsify", "overcomplete"}
  for name, r in peers.items():  # measured where installed, else a line saying why not
    if "not_run" in r:
      assert "not installed" in r["not_run"] or "does not import" in r["not_run"]
    else:
      for mine in ours.values():
        assert mine[f"ratio_to_{name}"] == round(mine["tokens_per_s"] / r["tokens_per_s"], 3)

  (metrics,) = [r for r in lines if r["figure"] == "metrics"]
  m = size["metrics"]
  assert (metrics["n"], metrics["c"], metrics["d"], metrics["k"]) == (m["n"], m["c"], m["d"], m["k"])
  assert metrics["table1"]["c"] == m["c"] and metrics["table1"]["set_size"] == 11  # ceil(1% of 1024)
  (search,) = [r for r in lines if r["figure"] == "retrieval"]
  assert search["ids_equal_frac"] == 1.0  # exact search: the same neighbours as the peer's
  assert search["n_candidates"] == size["retrieval"]["n"] and search["queries_per_s"] > 0

  ext = sorted((r for r in lines if r["figure"] == "extraction"), key=lambda r: r["batch"])
  assert [r["batch"] for r in ext] == list(size["extraction"]["batches"])
  n_img = size["extraction"]["images"]
  for r in ext:
    assert (r["images"], r["captions"], r["d"]) == (n_img, n_img, 64)
    # 224 px -> 16 x 16 patches of 14 px, merged 2 x 2: 64 image tokens per image, plus the prompt's.
    assert r["token_rows"] > n_img * 64 + n_img
  assert ext[0]["token_rows"] == ext[1]["token_rows"]  # the batch size changes the speed, not the rows

  table = (tmp_path / "cpu-dry.md").read_text()
  measured = [r for r in lines if r["figure"] == "train_step" and "tokens_per_s" in r]
  assert (
    table.count("| train step |") == len(measured)
    and "| retrieval |" in table
    and table.count("| extraction |") == 2
  )
