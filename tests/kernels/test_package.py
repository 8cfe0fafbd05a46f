"""The kernel package imports one way: api -> implementations -> base (and _pallas_common).

Read from the source (ast), so that an import added inside a function counts too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import kernels
from kernels.gated_delta_rule import base

ROOT = pathlib.Path(kernels.__file__).parent
PACKAGE = "kernels.gated_delta_rule"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Absolute names of the modules `path` imports; `from P import m` counts as P.m when m is a
  module of this package."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        if candidate in MODULES:
          names.add(candidate)
  return names


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def test_nothing_in_kernels_imports_the_project_or_experiments():
  for name, imported in IMPORTS.items():
    bad = {m for m in imported if m.split(".")[0] in ("sleep_lm", "experiments", "tests")}
    assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(PACKAGE + ".")))
def test_only_the_package_front_imports_api(name):
  if name == f"{PACKAGE}.api":
    return
  assert f"{PACKAGE}.api" not in IMPORTS[name], f"{name} imports api: back ends import base"


def test_base_imports_nothing_of_the_package():
  assert not {m for m in IMPORTS[f"{PACKAGE}.base"] if m.startswith("kernels")}


def test_no_import_cycle_between_modules():
  """Edges between modules (a package's __init__, which only re-exports, left out)."""
  graph = {n: {m for m in IMPORTS[n] if m in MODULES and MODULES[m].name != "__init__.py"}
           for n in MODULES}
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in graph[node]:
      assert state.get(nxt) != "open", "import cycle: " + " -> ".join(path + [nxt])
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [node])


def test_limits_written_once():
  from kernels.gated_delta_rule import api
  from sleep_lm.model import config
  for module in (config, api):
    assert module.CHUNK_SIZES is base.CHUNK_SIZES, module
    assert module.MAX_HEAD_DIM is base.MAX_HEAD_DIM, module
