"""The package layout, checked statically by tests/helpers/layout.py: every check passes on this
repository, and each one fails on a small planted source tree holding one violation of it."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import layout
from tests.helpers.env import ROOT

CLEAN = {
  "configs/base.py": """
    import ml_collections


    def get_config(arg=""):
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.extract = ml_collections.ConfigDict()
      config.extract.layer = -1
      config.extract.model_name = ""
      config.extract.templates = ml_collections.ConfigDict({"pair": "{image} {text}"})
      config.mesh = ml_collections.ConfigDict()
      config.mesh.data = 1
      return config
    """,
  # The study's sections over base (`from configs import base` must read this tree's base).
  "configs/study_common.py": """
    import ml_collections

    from configs import base


    def get_config(arg=""):
      config = base.get_config()
      config.study = ml_collections.ConfigDict()
      config.study.models = ("clip",)
      return config
    """,
  "sae_jax/__init__.py": '__version__ = "0"\n',
  "sae_jax/errors.py": "class SaeJaxError(ValueError):\n  pass\n",
  "sae_jax/a.py": """
    from sae_jax import errors


    def _helper():
      return errors.SaeJaxError


    class Stage:
      def __init__(self, config):
        self.ex = config.extract

      def layer(self):
        return self.ex.layer


    def run(config, workdir_config):
      ex, seed = config.extract, config.seed
      name = config.extract.model_name.startswith("tiny:")  # a str method on a field's value
      frozen = config.copy_and_resolve_references()  # a ConfigDict method
      return ex.layer, ex.templates.pair, seed, name, frozen, workdir_config.sae_spec, _helper()
    """,
  "sae_jax/wrapper.py": """
    import torch  # an optional dependency at module level: importing this module lazily is allowed
    """,
  "sae_jax/stages/__init__.py": "",
  "sae_jax/stages/s.py": """
    from sae_jax import a


    def go(mesh_cfg, config):
      import torch  # optional dependency

      from sae_jax import wrapper

      return a.run(config, config), mesh_cfg.data, config.mesh.data, torch, wrapper
    """,
  "sae_jax/study/__init__.py": "",
  "sae_jax/study/driver.py": """
    from sae_jax import a


    def run(config):
      return config.study.models, config.extract.layer, a.run(config, config)
    """,
  "experiments/__init__.py": "",
  "experiments/main.py": "from sae_jax.stages import s\nfrom sae_jax.study import driver\n\nRUN = s.go, driver.run\n",
  "benchmarks/study_speed.py": "import sae_jax.study.driver\n\nRUN = sae_jax.study.driver.run\n",
  "tests/test_driver.py": "from sae_jax import study\n",
}

# check -> (files replacing or adding to CLEAN, a word of the expected message)
PLANTED = {
  "module-level cycle through `from pkg import mod`": (
    "import_cycles",
    {"sae_jax/errors.py": "from sae_jax.stages import s\n\nclass SaeJaxError(ValueError):\n  pass\n"},
    "sae_jax.a <-> sae_jax.errors <-> sae_jax.stages.s",
  ),
  "function-level cycle": (
    "import_cycles",
    {"sae_jax/errors.py": "class SaeJaxError(ValueError):\n  pass\n\ndef f():\n  import sae_jax.a\n"},
    "sae_jax.a <-> sae_jax.errors",
  ),
  "private from-import in experiments": (
    "private_imports",
    {"experiments/main.py": "from sae_jax.a import _helper\n"},
    "imports sae_jax.a._helper",
  ),
  "private attribute of another module": (
    "private_imports",
    {"sae_jax/stages/s.py": "from sae_jax import a\n\nH = a._helper\n"},
    "uses sae_jax.a._helper",
  ),
  "private attribute through a dotted import": (
    "private_imports",
    {"experiments/main.py": "import sae_jax.a\n\nH = sae_jax.a._helper\n"},
    "uses sae_jax.a._helper",
  ),
  "library imports configs": (
    "layering",
    {"sae_jax/errors.py": "class SaeJaxError(ValueError):\n  pass\n\ndef f():\n  from configs import base\n"},
    "the library imports configs",
  ),
  "library imports experiments": (
    "layering",
    {"sae_jax/wrapper.py": "import experiments.main\n"},
    "the library imports experiments.main",
  ),
  "undeclared field": (
    "undeclared_config_fields",
    {"sae_jax/b.py": "def f(config):\n  return config.extract.online_window_items\n"},
    "config.extract.online_window_items",
  ),
  "undeclared field through a section alias": (
    "undeclared_config_fields",
    {"sae_jax/b.py": "def f(config):\n  ex = config.extract\n  return ex.online_window_items\n"},
    "config.extract.online_window_items",
  ),
  "undeclared field through a tuple alias": (
    "undeclared_config_fields",
    {"sae_jax/b.py": "def f(config):\n  m, ex = config.mesh, config.extract\n  return ex.window\n"},
    "config.extract.window",
  ),
  "undeclared field through self": (
    "undeclared_config_fields",
    {
      "sae_jax/b.py": "class B:\n  def __init__(self, config):\n    self.ex = config.extract\n\n"
      "  def n(self):\n    return self.ex.window\n"
    },
    "config.extract.window",
  ),
  "undeclared field of a section parameter": (
    "undeclared_config_fields",
    {"sae_jax/b.py": "def f(mesh_cfg):\n  return mesh_cfg.model\n"},
    "config.mesh.model",
  ),
  "undeclared field read with .get": (
    "undeclared_config_fields",
    {"sae_jax/b.py": "def f(config):\n  return config.extract.get('window', 3)\n"},
    "config.extract.window",
  ),
  "undeclared field of a nested section": (
    "undeclared_config_fields",
    {"sae_jax/b.py": "def f(config):\n  return config.extract.templates.caption\n"},
    "config.extract.templates.caption",
  ),
  "the core reads a section of the study": (
    "undeclared_config_fields",
    {"sae_jax/b.py": "def f(config):\n  return config.study.models\n"},
    "reads config.study, which configs/base.py does not declare",
  ),
  "undeclared field in the study": (
    "undeclared_config_fields",
    {"sae_jax/study/b.py": "def f(config):\n  return config.study.workers\n"},
    "reads config.study.workers, which configs/study_common.py does not declare",
  ),
  "undeclared base field in the study (the tree's own base, not the installed one)": (
    "undeclared_config_fields",
    {"sae_jax/study/b.py": "def f(config):\n  return config.mesh.model\n"},
    "reads config.mesh.model, which configs/study_common.py does not declare",
  ),
  "the core imports a study module": (
    "study_imports",
    {"sae_jax/b.py": "from sae_jax.study import driver\n"},
    "sae_jax/b.py:1: [study_imports] imports sae_jax.study.driver",
  ),
  "the core imports the study package": (
    "study_imports",
    {"sae_jax/b.py": "def f():\n  from sae_jax import study\n\n  return study\n"},
    "sae_jax/b.py:2: [study_imports] imports sae_jax.study ",
  ),
  "the core imports the study relatively": (
    "study_imports",
    {"sae_jax/stages/t.py": "from ..study import driver\n"},
    "sae_jax/stages/t.py:1: [study_imports] imports sae_jax.study.driver",
  ),
  "another top-level folder imports the study": (
    "study_imports",
    {"launch/submit.py": "import sae_jax.study.driver\n"},
    "launch/submit.py:1: [study_imports] imports sae_jax.study.driver",
  ),
  "function-level import of the standard library": (
    "lazy_imports",
    {"sae_jax/b.py": "def f():\n  import json\n\n  return json\n"},
    "function-level import of json",
  ),
  "function-level import of a core library module": (
    "lazy_imports",
    {"sae_jax/b.py": "def f():\n  from sae_jax import errors\n\n  return errors\n"},
    "function-level import of sae_jax.errors",
  ),
}


def _tree(root: pathlib.Path, overrides: dict) -> pathlib.Path:
  for rel, text in {**CLEAN, **overrides}.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return root


CHECK_BY_NAME = {check.__name__: check for check in layout.CHECKS}


@pytest.mark.parametrize("check", sorted(CHECK_BY_NAME))
def test_repository_passes(check):
  found = CHECK_BY_NAME[check](ROOT)
  assert not found, "\n".join(map(str, found))


def test_clean_planted_tree_passes(tmp_path):
  # The clean tree exercises what must NOT be flagged: a lazy torch import, a lazy import of a
  # module that imports torch, own private names, str and ConfigDict methods, config.json fields,
  # the study reading its own sections and base's, experiments/ benchmarks/ tests/ importing the study.
  assert layout.all_violations(_tree(tmp_path, {})) == []


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_planted_violation_is_found(tmp_path, case):
  check, files, needle = PLANTED[case]
  found = CHECK_BY_NAME[check](_tree(tmp_path, files))
  assert any(needle in str(v) for v in found), (case, [str(v) for v in found])


def test_script_exit_status(tmp_path):
  root = _tree(tmp_path, PLANTED["undeclared field"][1])
  out = subprocess.run(
    [sys.executable, "-m", "tests.helpers.layout", str(root)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1, out.stderr[-2000:]
  assert (
    out.stdout.strip()
    == "sae_jax/b.py:2: [undeclared_config_fields] reads config.extract.online_window_items, which configs/base.py does not declare"
  )
