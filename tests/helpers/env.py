"""Where the tests find the repository and the data they need, and what happens when it is absent.

On a user's machine a test whose data fixture (`../shared/data/...`, not part of the project) or
separately installed reference package is missing is skipped. Under CI (`CI=true`) it fails with the
reason: a CI run must not pass by skipping. The packages of the `[test]` extra (setup.py) are imported
plainly at the top of the test files: a missing one fails everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import types
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
COCO_MINI = SHARED_DATA / "coco-val2017-mini"


def in_ci() -> bool:
  """True under CI (`CI=true`, as set by .ci/run and by common CI services)."""
  return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
  """Fails under CI, skips elsewhere; `reason` says what is missing and how to get it."""
  if in_ci():
    pytest.fail(f"CI=true and {reason}", pytrace=False)
  pytest.skip(reason)


def require_fixture(path: pathlib.Path = COCO_MINI) -> pathlib.Path:
  """The data fixture directory at `path`, or skip (fail under CI) when it is absent."""
  path = pathlib.Path(path)
  if not path.is_dir():
    missing(f"the test data fixture {path} is absent (it lives beside the repository, in ../shared/data)")
  return path


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
