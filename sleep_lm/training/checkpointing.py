"""Checkpoints of a run: orbax, atomic and asynchronous, with fallback past a broken one.

A checkpoint holds the train state (every seed's parameters and optimizer state, stacked) and a
JSON `meta`: the step, the data position (the index of the next training batch) and the train
metrics logged since the last log line (so that averages after a resume equal the uninterrupted
run's). orbax writes each step to a temporary folder and renames it when complete, so a crash
never leaves a half-written step behind under its final name. A step that cannot be read (a
truncated file, missing metadata) is reported and skipped: `restore_latest` falls back to the
next older one.

A save that fails, in the caller's thread or in orbax's background threads and whatever the
exception (a full disk is a `ValueError` RESOURCE_EXHAUSTED from tensorstore, not an OSError),
is a `CheckpointSaveError` naming the step, the folder and the cause, raised at the next
`check`, `wait`, `save` or `close`. orbax then keeps the older steps (it removes the ones past
`keep` only after a save completes). Its temporary folder is removed by `remove_temporary`,
which the writer also runs when it opens the folder: a killed or failed save leaves nothing
behind for long.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sleep_lm.common.errors import UserError

# orbax writes step S into "S.orbax-checkpoint-tmp" (older versions: "...-tmp-<time>") and
# renames it to "S" when complete (orbax/checkpoint/_src/path/atomicity_types.py).
TMP_MARKER = ".orbax-checkpoint-tmp"


def _describe(e: Exception) -> str:
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  text = lines[0] if lines else type(e).__name__
  return f"{type(e).__name__}: {text[:200]}"


def _cause(e: BaseException) -> str:
  """The cause of a failed write in a few words: the OS error where tensorstore reports one
  ("[os_error_code='28']": No space left on device), else the exception's first line."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  code = re.search(r"os_error_code='?(\d+)", str(e))
  if code:
    return os.strerror(int(code.group(1)))
  return _describe(e) if isinstance(e, Exception) else type(e).__name__


class CheckpointSaveError(UserError):
  """A checkpoint could not be written; the steps saved before it are kept."""


class Checkpointer:
  """An orbax CheckpointManager over <workdir>/checkpoints keeping the newest `keep` steps.

  `clean`: remove the temporary folders of unfinished saves now (only the workdir's one writer,
  holding its lock, may: see `sleep_lm.training.workdir.Lock`)."""

  def __init__(self, directory: str | Path, *, keep: int = 2, read_only: bool = False,
               clean: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           read_only=read_only)
    self.directory = Path(directory).absolute()
    self.in_flight: int | None = None       # the step whose save may still be running
    self.failed: CheckpointSaveError | None = None
    try:
      if clean:
        self.remove_temporary()
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise UserError(f"cannot use checkpoint folder {self.directory}: {_describe(e)}") from e

  def temporary(self) -> list[Path]:
    """Folders of saves that did not complete (a crash, a full disk)."""
    if not self.directory.is_dir():
      return []
    return sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name)

  def remove_temporary(self) -> list[Path]:
    """Removes the folders of unfinished saves; returns them. Writer only, no save running."""
    removed = self.temporary()
    for p in removed:
      shutil.rmtree(p, ignore_errors=True)
    return removed

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, state, step: int, meta: dict) -> None:
    """Starts saving `step` in the background (after the previous save has completed)."""
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # noqa: BLE001 - any failure to write is a failed save
      raise self._failure(step, e) from e
    self.in_flight = step

  def check(self) -> None:
    """Raises the `CheckpointSaveError` of a background save that has failed; never blocks."""
    if self.in_flight is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is complete; a `CheckpointSaveError` if it failed."""
    if self.failed:
      raise self.failed
    if self.in_flight is None:
      return
    step, self.in_flight = self.in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - whatever orbax's threads raised
      raise self._failure(step, e) from e
    if jax.process_index() == 0 and step not in self.finished_steps():
      # orbax logs some failures (a commit that did not finalise) instead of raising them.
      raise self._failure(step, RuntimeError(f"orbax did not finalise step {step}"))

  def finished_steps(self) -> list[int]:
    """The steps whose folders are on disk under their final name (complete saves)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.name.isdigit() and p.is_dir())

  def _failure(self, step: int, e: BaseException) -> CheckpointSaveError:
    kept = [s for s in self.finished_steps() if s != step]
    self.failed = CheckpointSaveError(
        f"cannot save checkpoint step {step} in {self.directory}: {_cause(e)}; the run stops "
        f"here (steps kept: {kept or 'none'})")
    return self.failed

  def restore(self, state, step: int):
    """(state, meta) at `step`, into the shapes and shardings of `state`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    if restored.meta is None or "step" not in restored.meta:
      raise ValueError("meta.json is missing or holds no step")
    return restored.state, restored.meta

  def restore_latest(self, state, *, log=print):
    """(state, meta) of the newest readable step, or None if there is no checkpoint.

    Tries the steps newest first and says which failed and why; raises a UserError naming
    every failure when none can be read."""
    failures = []
    for step in reversed(self.steps()):
      try:
        restored = self.restore(state, step)
      except Exception as e:  # noqa: BLE001 - any read failure means: try the older step
        failures.append(f"step {step}: {_describe(e)}")
        log(f"checkpoint step {step} cannot be restored ({_describe(e)}); trying an older one")
        continue
      if failures:
        log(f"resumed from step {step}, the newest readable checkpoint")
      return restored
    if failures:
      raise UserError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures))
    return None

  def close(self) -> None:
    """Waits for the save in flight (a `CheckpointSaveError` if it failed, unless one was
    raised already) and closes orbax."""
    try:
      if not self.failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001
        if not self.failed:            # a failure already reported is not raised twice
          raise
