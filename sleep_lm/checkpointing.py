"""Checkpoints of a run: orbax, atomic and asynchronous, with fallback past a broken one.

A checkpoint holds the train state (every seed's parameters and optimizer state, stacked) and a
JSON `meta`: the step, the data position (the index of the next training batch) and the train
metrics logged since the last log line (so that averages after a resume equal the uninterrupted
run's). orbax writes each step to a temporary folder and renames it when complete, so a crash
never leaves a half-written step behind under its final name. A step that cannot be read (a
truncated file, missing metadata) is reported and skipped: `restore_latest` falls back to the
next older one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sleep_lm.errors import UserError


def _describe(e: Exception) -> str:
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  text = lines[0] if lines else type(e).__name__
  return f"{type(e).__name__}: {text[:200]}"


class Checkpointer:
  """An orbax CheckpointManager over <workdir>/checkpoints keeping the newest `keep` steps."""

  def __init__(self, directory: str | Path, *, keep: int = 2, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           read_only=read_only)
    self.directory = Path(directory).absolute()
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise UserError(f"cannot use checkpoint folder {self.directory}: {_describe(e)}") from e

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, state, step: int, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
