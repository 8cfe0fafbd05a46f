"""Checks of config values whose errors name the field by its path and say what is allowed.

Every message reads `<path>: <problem>`, e.g.
  config.steps: must be an integer >= 1, got 0
  config.model: unknown field(s) ['windw']; allowed: ['d_model', ...]
  config.task.t: must be >= 0, got -1

The config classes check their own fields where they are built (`ModelConfig` as
"ModelConfig.<field>", the tasks as "<field> must ..."), so that they can be used on their own;
`relocate` turns such an error into one that names the field by its full config path
("config.model.<field>"), which is what `RunConfig` reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any


class FieldError(ValueError):
  """A config value that is wrong: `path` names the field, `problem` says what is wrong."""

  def __init__(self, path: str, problem: str):
    self.path, self.problem = path, problem
    super().__init__(f"{path}: {problem}")


def unknown_fields(path: str, given: Iterable[str], allowed: Iterable[str]) -> None:
  """A FieldError naming the keys of `given` that are not `allowed`, and the allowed ones."""
  allowed = sorted(allowed)
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    raise FieldError(path, f"unknown field(s) {unknown}; allowed: {allowed}")


def missing_fields(path: str, given: Iterable[str], required: Iterable[str]) -> None:
  missing = sorted(set(required) - set(given))
  if missing:
    raise FieldError(path, f"missing field(s) {missing}")


def check_int(path: str, value: Any, minimum: int | None = None,
              maximum: int | None = None) -> int:
  """`value` if it is an integer (not a bool) in [minimum, maximum]."""
  ok = isinstance(value, int) and not isinstance(value, bool)
  if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
    return value
  if minimum is not None and maximum is not None:
    bound = f" in [{minimum}, {maximum}]"
  elif minimum is not None:
    bound = f" >= {minimum}"
  else:
    bound = "" if maximum is None else f" <= {maximum}"
  raise FieldError(path, f"must be an integer{bound}, got {value!r}")


def check_bool(path: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise FieldError(path, f"must be True or False, got {value!r}")
  return value


def check_str(path: str, value: Any) -> str:
  if not isinstance(value, str):
    raise FieldError(path, f"must be a string, got {value!r}")
  return value


def check_choice(path: str, value: Any, choices: Sequence[Any]) -> Any:
  if value not in choices:
    raise FieldError(path, f"must be one of {tuple(choices)}, got {value!r}")
  return value


def relocate(error: ValueError, path: str, *, owner: str = "",
             fields: Iterable[str] = ()) -> ValueError:
  """`error`, raised while building a part of the config, as a FieldError at its full config
  path: "<owner>.<field>: problem" or "<owner>: problem" becomes "<path>.<field>: problem" or
  "<path>: problem"; without an owner, "<field> problem" (a task's checks) becomes
  "<path>.<field>: problem" for a field of `fields`. Other messages keep their text."""
  text = str(error)
  if owner:
    match = re.fullmatch(rf"{re.escape(owner)}((?:\.\w+)*):\s*(.*)", text, re.S)
    if match:
      return FieldError(path + match.group(1), match.group(2))
  else:
    field, _, problem = text.partition(" ")
    if field in set(fields) and problem:
      return FieldError(f"{path}.{field}", problem)
  return error
