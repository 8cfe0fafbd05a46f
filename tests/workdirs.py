"""Reading a training workdir back in tests."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from sleep_lm.training import trainer, workdir
from sleep_lm.training.checkpointing import Checkpointer
from sleep_lm.training.run_config import RunConfig


def latest_params(path):
  """The newest checkpoint's parameters of a workdir, [seeds, ...] NumPy."""
  run = RunConfig.checked(workdir.load_config(path))
  mesh, boxed = trainer.setup(run)
  state, _ = trainer.initial_state(run, mesh, boxed)
  ckpt = Checkpointer(Path(path) / "checkpoints", read_only=True)
  try:
    state, _ = ckpt.restore_latest(state, log=lambda _: None)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, state.params)
