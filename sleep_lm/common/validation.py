"""Checks of config values whose errors name the field by its path and say what is allowed.

Every message reads `<path>: <problem>`, e.g.
  config.steps: must be an integer >= 1, got 0
  config.model: unknown field(s) ['windw']; allowed: ['d_model', ...]
  config.task.t: must be an integer >= 0, got -1

Every config class checks its own fields where it is built, so that it can be used on its own,
and names them as it knows them: `ModelConfig` as "ModelConfig.<field>", a task by the field's
name alone ("t"). `from_mapping` builds one from a section of the config and names its errors by
the section's path instead ("config.model.<field>", "config.task.<field>"; `relocate`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class FieldError(ValueError):
  """A config value that is wrong: `path` names the field, `problem` says what is wrong."""

  def __init__(self, path: str, problem: str):
    self.path, self.problem = path, problem
    super().__init__(f"{path}: {problem}")


def expect(cond: bool, path: str, problem: str) -> None:
  """A FieldError at `path` saying `problem`, unless `cond` holds."""
  if not cond:
    raise FieldError(path, problem)


def is_int(value: Any) -> bool:
  """A Python or NumPy integer; not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
  """A finite int or float; not a bool."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def unknown_fields(path: str, given: Iterable[str], allowed: Iterable[str], *,
                   subject: str = "") -> None:
  """A FieldError naming the keys of `given` that are not `allowed`, and the allowed ones;
  `subject` (e.g. "task 'rule110'") says whose fields they are when the path does not."""
  allowed = sorted(allowed)
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    whose = f" for {subject}" if subject else ""
    raise FieldError(path, f"unknown field(s) {unknown}{whose}; allowed: {allowed}")


def missing_fields(path: str, given: Iterable[str], required: Iterable[str]) -> None:
  missing = sorted(set(required) - set(given))
  if missing:
    raise FieldError(path, f"missing field(s) {missing}")


def check_int(path: str, value: Any, minimum: int | None = None,
              maximum: int | None = None) -> int:
  """`value` as an int if it is an integer (`is_int`) in [minimum, maximum]."""
  if is_int(value) and (minimum is None or value >= minimum) and (
      maximum is None or value <= maximum):
    return int(value)
  if minimum is not None and maximum is not None:
    bound = f" in [{minimum}, {maximum}]"
  elif minimum is not None:
    bound = f" >= {minimum}"
  else:
    bound = "" if maximum is None else f" <= {maximum}"
  raise FieldError(path, f"must be an integer{bound}, got {value!r}")


def check_bool(path: str, value: Any) -> bool:
  expect(isinstance(value, bool), path, f"must be True or False, got {value!r}")
  return value


def check_str(path: str, value: Any) -> str:
  expect(isinstance(value, str), path, f"must be a string, got {value!r}")
  return value


def check_choice(path: str, value: Any, choices: Sequence[Any]) -> Any:
  expect(value in choices, path, f"must be one of {tuple(choices)}, got {value!r}")
  return value


def relocate(error: FieldError, path: str, *, owner: str = "") -> FieldError:
  """`error` named from `path`: an error at "<owner>.<field>" (or at "<owner>") moves to
  "<path>.<field>" (or "<path>"); without an owner, the error's path is relative to `path`
  ("t" -> "<path>.t"). An error at another path than the owner's is returned as it is."""
  if not owner:
    return FieldError(f"{path}.{error.path}", error.problem)
  if error.path == owner or error.path.startswith(owner + "."):
    return FieldError(path + error.path[len(owner):], error.problem)
  return error


def from_mapping[T](cls: type[T], values: Mapping[str, Any], path: str, *, owner: str = "",
                    subject: str = "") -> T:
  """The dataclass `cls` built from `values`, a section of the config at `path`: unknown keys
  are refused by name, and the FieldErrors of its checks (at "<owner>.<field>", or at the bare
  field without an owner) name the field at `path`."""
  values = dict(values)
  unknown_fields(path, values, (f.name for f in dataclasses.fields(cls)), subject=subject)
  try:
    return cls(**values)
  except FieldError as e:
    raise relocate(e, path, owner=owner) from None
