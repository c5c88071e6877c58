"""A long stage's log shows it is alive: with stderr a file, progress lines at the configured period."""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def _run(args, log_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
  with open(log_path, "w") as log:  # stderr is a file, as on a cluster: lines, not a tqdm bar
    r = subprocess.run(
      [sys.executable, "-m", *args],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=log,
      text=True,
      timeout=600,
    )
  return r, log_path.read_text()


def test_extraction_prints_progress_lines_to_a_log_file(coco_mini, tmp_path):
  args = [
    "experiments.extract",
    "--config=configs/clip_coco.py:tiny",
    f"--workdir={tmp_path / 'w'}",
    "--config.extract.max_images=4",
    "--config.extract.chunk_size=2",
    "--config.extract.batch_size=1",
  ]
  # Period 0: a line after every forward batch; the absl log stays at WARNING (no orbax chatter).
  r, err = _run([*args, "--config.extract.log_every_s=0"], tmp_path / "every.log")
  assert r.returncode == 0, err[-2000:]
  images = re.findall(r"^extract image: (\d+)/4 items, [\d.]+ items/s, ETA \S+$", err, re.M)
  texts = re.findall(r"^extract text: (\d+)/(\d+) items, [\d.]+ items/s, ETA \S+$", err, re.M)
  assert [int(n) for n in images] == [1, 2, 3, 4]
  total = int(texts[0][1])
  assert total == 20 and [int(n) for n, _ in texts] == list(range(1, total + 1))
  assert "\r" not in err  # no terminal bar in a file
  # A period longer than the run: only each phase's closing line.
  r, err = _run(
    [*args, f"--workdir={tmp_path / 'w2'}", "--config.extract.log_every_s=1e9"], tmp_path / "once.log"
  )
  assert r.returncode == 0, err[-2000:]
  lines = [ln for ln in err.splitlines() if ln.startswith("extract ")]
  assert [ln.split(":")[0] for ln in lines] == ["extract image", "extract text"], lines
  assert lines[0].startswith("extract image: 4/4 items") and lines[1].startswith("extract text: 20/20 items")


def test_sae_training_prints_progress_lines_between_its_log_lines(tmp_path):
  args = [
    "experiments.train",
    "--config=configs/synthetic.py:tiny",
    f"--workdir={tmp_path / 'w'}",
    "--config.train.tensorboard=False",
    "--config.train.log_every_s=0",
  ]
  r, err = _run(args, tmp_path / "train.log")
  assert r.returncode == 0, err[-2000:]
  steps = [int(m) for m in re.findall(r"^train: step (\d+)/60, [\d.]+ steps/s, ETA \S+", err, re.M)]
  # Every step that prints no metrics line (those are at 20, 40, 60, on stdout) prints one.
  assert steps == [s for s in range(1, 61) if s % 20], steps
  assert [int(s) for s in re.findall(r"^step\s+(\d+) \|", r.stdout, re.M)] == [20, 40, 60]
