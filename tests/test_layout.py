"""The package's import direction: every module imports only its own layer and the layers below.

Layers, bottom up (docs/architecture.md): `kernels` (the top-level op package), `common`,
`model`, `tasks` and `pretrained` (readers, importer), `training`, `inference`, and the command
lines (`sleep_lm.train`, `evaluate`, `generate`, `cli`, `pretrained.convert`). Imports inside
functions count too: a lazy import upward is still an upward dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANK = {"kernels": 0, "sleep_lm.common": 1, "sleep_lm.model": 2, "sleep_lm.tasks": 3,
        "sleep_lm.pretrained": 3, "sleep_lm.training": 4, "sleep_lm.inference": 4}
COMMANDS = {"sleep_lm.train", "sleep_lm.evaluate", "sleep_lm.generate", "sleep_lm.cli",
            "sleep_lm.pretrained.convert"}
TOP = 5  # the command lines


def rank(module: str) -> int:
  """The layer of a dotted module name (a command line, or its longest matching prefix)."""
  if module in COMMANDS:
    return TOP
  for prefix in sorted(RANK, key=len, reverse=True):
    if module == prefix or module.startswith(prefix + "."):
      return RANK[prefix]
  if module == "sleep_lm":
    return TOP
  raise AssertionError(f"{module}: not in any layer; add its package to RANK")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import of this project's code, absolute names only."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}:{node.lineno}: relative import"
      base = node.module or ""
      if base.split(".")[0] in ("sleep_lm", "kernels"):
        # `from sleep_lm.x import y`: y may be a module of x (then its own layer) or a name.
        for alias in node.names:
          sub = f"{base}.{alias.name}"
          found.append((node.lineno, sub if _is_module(sub) else base))
    elif isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names
                if a.name.split(".")[0] in ("sleep_lm", "kernels")]
  return found


def _is_module(name: str) -> bool:
  path = ROOT.joinpath(*name.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


LIBRARY = sorted(p for p in [*(ROOT / "sleep_lm").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
  here = module_name(path)
  upward = [f"line {line}: {module} (layer {rank(module)})" for line, module in imports(path)
            if rank(module) > rank(here)]
  assert not upward, f"{here} (layer {rank(here)}) imports upward: {upward}"


def test_the_rule_sees_an_upward_import(tmp_path, monkeypatch):
  """The check is not vacuous: a model module importing the trainer is caught."""
  fake = ROOT / "sleep_lm" / "model" / "config.py"
  source = fake.read_text() + "\nfrom sleep_lm.training import trainer\n"
  path = tmp_path / "config.py"
  path.write_text(source)
  found = imports(path)
  assert (found[-1][1], rank(found[-1][1])) == ("sleep_lm.training.trainer", 4)
  assert rank(module_name(fake)) == 2


def test_the_tree_shows_the_layers():
  packages = {p.name for p in (ROOT / "sleep_lm").iterdir() if (p / "__init__.py").exists()}
  assert {"common", "model", "training", "inference", "tasks", "pretrained"} <= packages
  flat = {p.stem for p in (ROOT / "sleep_lm").glob("*.py")} - {"__init__"}
  assert flat == {c.split(".")[-1] for c in COMMANDS if c.count(".") == 1}, flat
