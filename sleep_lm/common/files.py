"""The files a command reads back from a workdir or a data_dir, read through one path.

config.json, metrics.jsonl, the workdir's lock file and the metadata of the eval sets are all
read here, so that a damaged file (empty, cut short, not JSON, not an object, missing a field the
reader needs, unreadable) ends in one line that names the file, says what is wrong with it and,
where there is one, how to fix it: a `DamagedFile`, a `UserError`. Checkpoints are orbax's
(`sleep_lm.training.checkpointing` falls back past a damaged one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sleep_lm.common.errors import UserError


class DamagedFile(UserError):
  """A file a command needs is there but cannot be used; the message names it."""

  def __init__(self, path: str | Path, problem: str, fix: str = ""):
    self.path, self.problem = Path(path), problem
    super().__init__(f"{path}: {problem}" + (f"; {fix}" if fix else ""))


def write_atomic(path: Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: a reader (or a crash) sees
  the old file or the whole new one."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def read_text(path: str | Path, *, fix: str = "") -> str:
  """The text of `path` (UTF-8). A missing file is the caller's to explain (FileNotFoundError);
  an unreadable or non-text one is a `DamagedFile`."""
  path = Path(path)
  try:
    return path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise
  except UnicodeDecodeError as e:
    raise DamagedFile(path, f"not text (byte {e.start} is not UTF-8)", fix) from e
  except OSError as e:
    raise DamagedFile(path, f"cannot be read ({e.strerror or type(e).__name__})", fix) from e


def parse_object(text: str, *, fields: Sequence[str] = ()) -> dict[str, Any]:
  """`text` as a JSON object holding `fields`, or a ValueError saying what is wrong (for
  `read_json` and for one line of a JSON-lines file)."""
  if not text.strip():
    raise ValueError("empty")
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"not JSON ({e.msg}: line {e.lineno} column {e.colno})") from e
  if not isinstance(value, dict):
    raise ValueError(f"not a JSON object (a {type(value).__name__})")
  missing = sorted(f for f in fields if f not in value)
  if missing:
    raise ValueError(f"missing field(s) {missing}")
  return value


def read_json(path: str | Path, *, fields: Sequence[str] = (), fix: str = "") -> dict[str, Any]:
  """The JSON object in `path`, which must hold `fields`; a `DamagedFile` otherwise."""
  text = read_text(path, fix=fix)
  try:
    return parse_object(text, fields=fields)
  except ValueError as e:
    raise DamagedFile(path, str(e), fix) from e
