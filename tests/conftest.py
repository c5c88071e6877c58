import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-val2017-mini"


@pytest.fixture
def coco_mini():
  if not COCO_MINI.exists():
    pytest.skip("../shared/data/coco-val2017-mini is absent (it is not part of the project)")
  return COCO_MINI
