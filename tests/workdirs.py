"""Reading a training workdir back in tests."""

from __future__ import annotations

import jax
import numpy as np

from sleep_lm.generate import load_run, restore_params


def latest_params(path):
  """The newest checkpoint's parameters of a workdir, [seeds, ...] NumPy: each seed's as
  `sleep_lm.generate` restores it, stacked."""
  run = load_run(path)
  per_seed = [restore_params(path, run, seed_index=s)[0] for s in range(run.seeds)]
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *per_seed)
