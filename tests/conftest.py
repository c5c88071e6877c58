"""Shared fixtures; under CI (`CI=true`) a skipped test is reported as a failure."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup takes ~26 s to fail offline
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.helpers` and `configs` import from the repository root
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tests.helpers import env  # noqa: E402
from tests.helpers.trained import TrainedSAE, synthetic_sae_config  # noqa: E402


@pytest.fixture
def coco_mini():
  """The session's generated COCO-layout fixture (11 images, 5 captions each; tests/helpers/env.py)."""
  return env.COCO_MINI


@pytest.fixture(scope="session")
def trained_sae(tmp_path_factory) -> TrainedSAE:
  """The synthetic SAE of tests/helpers/trained.py, trained once for the whole session."""
  from sae_jax.training import trainer

  workdir = str(tmp_path_factory.mktemp("trained_sae"))
  trainer.train_and_evaluate(synthetic_sae_config(), workdir)
  return TrainedSAE(workdir)


def _fail_skips_under_ci(report) -> None:
  if env.in_ci() and report.skipped and not hasattr(report, "wasxfail"):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true (CI must not pass by skipping): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  _fail_skips_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  _fail_skips_under_ci(outcome.get_result())
