"""The child processes of the experiment launchers (experiments/sweep.py,
experiments/long_context_chain.py): start, reap, stop, and say how each ended.

- `child_env`: the environment of a JAX child sharing the device: no preallocation, and a
  memory fraction of 0.9 / share, unless the user set them (a fraction given is forced).
- `Pool`: children by key, each with its log file (appended to, stdout and stderr), its
  environment and its start time; `reap()` returns the ones that have ended, with their return
  codes and wall seconds; `terminate()` sends SIGTERM to those still running (a trainer saves
  its checkpoint and exits PREEMPTED_STATUS).
- `on_sigterm`: while inside, a SIGTERM to this process calls the launcher's stop (which
  usually calls `terminate()`); the previous handler is restored on leaving.
- `outcome`: "done", "stopped" or "FAILED (rc)".

What to run, in what order, on which device, and what to print stays in each launcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sleep_lm.common.errors import PREEMPTED_STATUS


def child_env(share: int = 1, fraction: float | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
  """`base` (default os.environ) with XLA_PYTHON_CLIENT_PREALLOCATE=false and
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 / share where unset; `fraction` replaces a set one."""
  env = dict(os.environ if base is None else base)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.3f}"
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / max(share, 1):.3f}")
  return env


def outcome(rc: int, *, done: bool | None = None, stopping: bool = False) -> str:
  """How a child that returned `rc` ended.

  "done": its results are there (`done`, where the launcher can tell: then they decide, whatever
  rc, since a stop may come after them), or else rc 0. "stopped": rc PREEMPTED_STATUS (it saved
  and left on SIGTERM; rerun to continue), or, once the launcher is `stopping`, rc 0 or killed by
  SIGTERM. Otherwise "FAILED (rc)" (rc 0 with its results missing included).
  """
  if done if done is not None else rc == 0:
    return "done"
  if rc == PREEMPTED_STATUS or (stopping and rc in (0, -signal.SIGTERM)):
    return "stopped"
  return f"FAILED ({rc}{', its results missing' if rc == 0 else ''})"


@dataclasses.dataclass
class Child:
  key: str
  proc: subprocess.Popen
  log: Path
  env: dict[str, str]
  started: float
  data: Any = None                    # the launcher's own (e.g. its job)
  handle: IO | None = None
  seconds: float | None = None        # wall seconds, once reaped

  @property
  def rc(self) -> int | None:
    return self.proc.returncode


class Pool:
  """Running children by key. `t0` is the pool's start: `stamp()` is "[   12s]" since then."""

  def __init__(self):
    self.children: dict[str, Child] = {}
    self.t0 = time.time()

  def __contains__(self, key: str) -> bool:
    return key in self.children

  def __iter__(self) -> Iterator[str]:
    return iter(self.children)

  def __len__(self) -> int:
    return len(self.children)

  def elapsed(self) -> float:
    return time.time() - self.t0

  def stamp(self) -> str:
    return f"[{self.elapsed():6.0f}s]"

  def start(self, key: str, cmd: Sequence[str], log: Path, env: Mapping[str, str],
            cwd: Path | None = None, data: Any = None) -> Child:
    """Starts `cmd` with stdout and stderr appended to `log` (its folder made)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "a")
    proc = subprocess.Popen(list(cmd), stdout=handle, stderr=subprocess.STDOUT, cwd=cwd,
                            env=dict(env))
    child = Child(key, proc, log, dict(env), time.time(), data, handle)
    self.children[key] = child
    return child

  def reap(self) -> list[Child]:
    """The children that have ended since the last call, in start order (log closed, `rc` and
    `seconds` set), no longer in the pool."""
    ended = []
    for key, child in list(self.children.items()):
      if child.proc.poll() is None:
        continue
      child.seconds = time.time() - child.started
      if child.handle is not None:
        child.handle.close()
      del self.children[key]
      ended.append(child)
    return ended

  def terminate(self, wait: bool = False) -> int:
    """SIGTERM to every child still running (then, with `wait`, waits for them); returns how
    many children the pool holds (ended but not reaped ones included)."""
    for child in self.children.values():
      if child.proc.poll() is None:
        child.proc.send_signal(signal.SIGTERM)
        if wait:
          child.proc.wait()
    return len(self.children)


@contextlib.contextmanager
def on_sigterm(stop: Callable[[], object]) -> Iterator[None]:
  """Inside: a SIGTERM to this process calls `stop()`; the previous handler is restored after."""
  previous = signal.signal(signal.SIGTERM, lambda *_: stop())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
