"""Where the tests find the repository and the data they need.

The COCO-layout data the extraction tests read is generated here, once per test session, from the
shapes world (`sae_jax.study.shapes.write_coco_mini`: 11 JPEGs with COCO val2017 ids, 5 captions
each, one grayscale and one with EXIF), so a clone runs the whole suite with nothing beside it.
`$COCO_MINI` points the `:tiny` model presets (and test subprocesses) at it. A separately installed
reference package that is missing skips its test on a user's machine and fails it under CI
(`CI=true`); the packages of the `[test]` extra (setup.py) are imported plainly at the top of the
test files: a missing one fails everywhere.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types
from typing import Any

import pytest

from sae_jax.study import shapes_files

ROOT = pathlib.Path(__file__).resolve().parents[2]
_SESSION_VAR = "SAE_JAX_TEST_COCO_MINI"  # inherited by the subprocesses a test starts


def _generated_coco_mini() -> pathlib.Path:
  """The session's generated COCO mini set: made by the first process, reused by its subprocesses."""
  inherited = os.environ.get(_SESSION_VAR, "")
  if inherited and (pathlib.Path(inherited) / "captions.json").is_file():
    path = pathlib.Path(inherited)
  else:
    path = pathlib.Path(tempfile.mkdtemp(prefix="sae-jax-coco-mini-"))
    shapes_files.write_coco_mini(str(path))
    atexit.register(shutil.rmtree, path, True)
    os.environ[_SESSION_VAR] = str(path)
  os.environ["COCO_MINI"] = str(path)  # read by configs/coco_common.py when a tiny preset loads
  return path


COCO_MINI = _generated_coco_mini()


def in_ci() -> bool:
  """True under CI (`CI=true`, as set by .ci/run and by common CI services)."""
  return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def run_main(module: str, *args: str, extra_env=None) -> subprocess.CompletedProcess:
  """`python -m experiments.<module> <args>` from the repository root, on the CPU; output captured."""
  env_vars = {**os.environ, "JAX_PLATFORMS": "cpu", **(extra_env or {})}
  return subprocess.run(
    [sys.executable, "-m", f"experiments.{module}", *args],
    cwd=str(ROOT),
    env=env_vars,
    capture_output=True,
    text=True,
    timeout=600,
  )


def missing(reason: str) -> None:
  """Fails under CI, skips elsewhere; `reason` says what is missing and how to get it."""
  if in_ci():
    pytest.fail(f"CI=true and {reason}", pytrace=False)
  pytest.skip(reason)


def overcomplete_topk_sae() -> Any:
  """overcomplete==0.3.0's TopKSAE class (the reference implementation of the paper's SAE).

  The package is installed with `pip install --no-deps overcomplete==0.3.0` (its dependencies would
  replace the CPU torch), so it is not in the `[test]` extra. Its `__init__` imports torchvision,
  which does not import beside the CPU torch: a bare package module stands in for `overcomplete`.
  """
  if "overcomplete" not in sys.modules:
    spec = importlib.util.find_spec("overcomplete")
    if spec is None or not spec.submodule_search_locations:
      missing("overcomplete is not installed (pip install --no-deps overcomplete==0.3.0)")
    package = types.ModuleType("overcomplete")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["overcomplete"] = package
  from overcomplete.sae.topk_sae import TopKSAE

  return TopKSAE
