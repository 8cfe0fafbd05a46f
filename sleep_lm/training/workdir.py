"""A run's directory: its one writer, the config it was claimed with, and its metrics log.

  <workdir>/train.lock      held (flock) by the training run writing the workdir: its pid, host
  <workdir>/config.json     the config of the run; a different config is refused
  <workdir>/metrics.jsonl   one strict-JSON object per line (non-finite numbers as null)
  <workdir>/tensorboard/    event files (`sleep_lm.training.tensorboard`), one folder per seed
  <workdir>/checkpoints/    orbax (`sleep_lm.training.checkpointing`)

Every file is read back through `sleep_lm.common.files`: a damaged one is a one-line error naming
it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import ml_collections

from sleep_lm.common import files
from sleep_lm.common.errors import UserError
from sleep_lm.common.files import write_atomic
from sleep_lm.model.sharding import DEFAULT_RULES

LOCK_NAME = "train.lock"
# Top-level fields every config.json holds (older ones may lack sharding_rules: _upgrade_legacy).
CONFIG_FIELDS = ("task", "model", "optimizer", "seed", "seeds", "steps", "mesh")


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json(sort_keys=True))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def make(workdir: Path) -> None:
  """Creates the workdir (and its parents), or says why it cannot be one."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir} exists and is not a directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir}: {e.strerror}") from e


class WorkdirBusy(UserError):
  """Another training run holds the workdir's lock."""


class Lock:
  """The workdir's writer lock: an exclusive `flock` on <workdir>/train.lock, held from before
  config.json is claimed until the run ends (`release`, or the process's death: the kernel
  drops the lock with the last open descriptor, so a killed run never leaves it behind).

  The holder writes its pid, host and start time into the file after locking, for the message
  that refuses a second writer. The file itself stays (unlinking it would let two processes lock
  two different files of that name). Only writers lock: evaluation and generation read a workdir
  beside its training run. Where the file system has no flock (ENOLCK, EOPNOTSUPP), the run
  goes on unlocked after a warning.
  """

  def __init__(self, workdir: Path, *, warn=print):
    make(workdir)
    self.path = workdir / LOCK_NAME
    self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.release()
      raise WorkdirBusy(f"workdir {workdir} is in use by another training run "
                        f"({describe_holder(self.path)}); one run writes a workdir at a time: "
                        f"wait for it to end or stop it, or use another --workdir") from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        self.release()
        raise UserError(f"cannot lock {self.path}: {e.strerror}") from e
      warn(f"warning: cannot lock {self.path} ({e.strerror}): this file system has no flock, "
           f"so nothing keeps a second training run out of {workdir}")
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)                    # closing the last descriptor drops the flock
      self._fd = None

  def __enter__(self) -> Lock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def describe_holder(path: Path) -> str:
  """'pid P on host H, since T' from a lock file, or why that is unknown."""
  try:
    holder = files.read_json(path, fields=("pid", "host"))
  except (FileNotFoundError, files.DamagedFile) as e:
    # The holder writes the file just after locking: empty only in that instant.
    problem = e.problem if isinstance(e, files.DamagedFile) else "missing"
    return f"its pid and host are unknown: {path} is {problem}"
  since = f", since {holder['since']}" if "since" in holder else ""
  return f"pid {holder['pid']} on host {holder['host']}{since}"


def claim(workdir: Path, config: ml_collections.ConfigDict, *, write: bool = True) -> None:
  """Writes config.json, or refuses a workdir that holds a different config.

  Call it only once the config has been validated against the machine (mesh, batch sizes): a
  failed launch must not leave a config behind that blocks the corrected command; a writer calls
  it holding the workdir's `Lock`. Multi-host: every process checks a config.json that exists
  (so all refuse alike), only the one with `write` (process 0) writes it (atomically: another
  process reads the old state or the whole file).
  """
  make(workdir)
  path = workdir / "config.json"
  wanted = config_to_dict(config)
  if path.exists():
    held = files.read_json(path, fix="restore it, or use a new --workdir")
    if held != wanted:
      a, b = _flatten(held), _flatten(wanted)
      diff = [f"{k}: {a.get(k, '<absent>')!r} in the workdir, {b.get(k, '<absent>')!r} now"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
      raise UserError(f"workdir {workdir} holds a run with a different config; use a new "
                      f"--workdir or the same config. Differences:\n  " + "\n  ".join(diff))
  elif write:
    try:
      write_atomic(path, json.dumps(wanted, indent=2, sort_keys=True))
    except OSError as e:
      raise UserError(f"cannot write {path}: {e.strerror}") from e


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run was claimed with (configs of older versions read as today's)."""
  path = Path(workdir) / "config.json"
  try:
    held = files.read_json(path, fields=CONFIG_FIELDS, fix="restore it from a copy of the run")
  except FileNotFoundError:
    raise UserError(f"{path} not found: is {workdir} a sleep_lm.train workdir?") from None
  return _upgrade_legacy(ml_collections.ConfigDict(held))


def _upgrade_legacy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config.json written before the (data, fsdp, tensor) mesh, read as today's: mesh.model
  becomes mesh.tensor and the default rules are filled in (with heads on "tensor" they shard
  as "model" did). For reading old workdirs (evaluate, generate, plots); training compares the
  raw file and refuses a workdir whose config differs, so an old run continues only with its old
  code."""
  config = ml_collections.ConfigDict(config.to_dict())
  if "model" in config.mesh:
    mesh = config.mesh.to_dict()
    mesh["tensor"] = mesh.pop("model")
    config.mesh = mesh
  if "sharding_rules" not in config:
    config.sharding_rules = DEFAULT_RULES
  return config



def _finite(value):
  """JSON-safe copy: NaN and infinities become None (strict JSON has no NaN)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def read_records(path: Path, *, warn=print) -> list[dict]:
  """The records of a metrics.jsonl. Each line is a JSON object with an integer "step" and a
  "kind"; a last line that is not (a crash mid-write tears it) is dropped with a warning, any
  other bad line is an error naming the file, the line and what is wrong with it."""
  if not path.exists():
    return []
  lines = files.read_text(path).splitlines()
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = files.parse_object(line, fields=("step", "kind"))
      if isinstance(record["step"], bool) or not isinstance(record["step"], int):
        raise ValueError(f"its step is not an integer ({record['step']!r})")
    except ValueError as e:
      if i == len(lines) - 1:
        warn(f"warning: {path}: ignoring a torn last line ({e}; {len(line)} characters)")
        continue
      raise files.DamagedFile(path, f"line {i + 1}: {e}", "fix or remove the line") from e
    records.append(record)
  return records


class MetricsLog:
  """metrics.jsonl; on resume, records past the restored step are dropped (and a torn last line
  with them)."""

  def __init__(self, path: Path, resume_step: int, *, write: bool = True, warn=print):
    self.path, self.enabled = path, write
    self.eval_steps: set[int] = set()       # steps whose evaluation the log already holds
    if write and path.exists():
      kept = [r for r in read_records(path, warn=warn) if r["step"] <= resume_step]
      write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
      self.eval_steps = {r["step"] for r in kept if r["kind"] == "eval"}

  def write(self, record: dict) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(_finite(record), allow_nan=False) + "\n")
