"""Starting a run from another workdir's parameters with a fresh optimizer (`config.init_from`).

  config.init_from = "runs/smollm2_gdn"       # a converted checkpoint (sleep_lm.pretrained.convert)
  config.init_from = "runs/gsm/stage1_N2"     # or the run of an earlier stage

The retrofit's two stages (docs/pretrained.md): stage 1 starts from the converted checkpoint and
trains only the inserted layers (`optimizer.train_layers`); stage 2 starts from stage 1's
parameters and trains everything. Their optimizer states have different structures (stage 1
keeps none for frozen parameters), so only the parameters are handed over: the source's newest
readable checkpoint is restored in its own structure (its config.json says which), its
parameters are placed in this run's shardings and a fresh optimizer state is made for them. The
learning-rate schedule starts at step 0.

Checked before the run's workdir is claimed (`check`): the source holds a run config and a
checkpoint, and its parameter tree (names, shapes, dtypes) equals the one this run's
`config.model` makes; otherwise a `UserError` naming config.init_from and the parameters that
are missing, left over or of another shape. Seeds: a source with one seed starts every seed of
the run from the same parameters (the seeds then differ by their data order only); a source with
as many seeds as the run starts each from its own; other counts are refused.

A run that already has checkpoints of its own resumes from them (init_from is then unused), so
repeating the command after a crash continues the run rather than restarting it.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax

from sleep_lm.common.errors import UserError
from sleep_lm.training import workdir
from sleep_lm.training.step import param_path

FIELD = "config.init_from"


def _shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))
  return {param_path(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def source_run(run):
  """The RunConfig the source workdir was written with."""
  from sleep_lm.training.run_config import RunConfig
  src = Path(run.init_from)
  try:
    config = workdir.load_config(src)
    source = RunConfig.checked(config)
  except UserError as e:
    raise UserError(f"{FIELD} = {run.init_from!r}: {e}") from e
  return source


def check(run, boxed) -> None:
  """Refuses (a `UserError` naming config.init_from) a source that cannot start this run."""
  from sleep_lm.model.hybrid import init_params
  if not run.init_from:
    return
  source = source_run(run)
  want = _shapes(boxed)
  have = _shapes(jax.eval_shape(lambda: init_params(source.model, jax.random.key(0))))
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  differ = [f"{k}: {have[k]} there, {want[k]} here" for k in sorted(set(want) & set(have))
            if have[k] != want[k]]
  if missing or extra or differ:
    parts = [f"missing there: {missing}" if missing else "",
             f"not in config.model: {extra}" if extra else "",
             f"shapes differ: {differ}" if differ else ""]
    raise UserError(f"{FIELD} = {run.init_from!r}: its parameters do not fit config.model ("
                    + "; ".join(p for p in parts if p) + ")")
  if source.seeds not in (1, run.seeds):
    raise UserError(f"{FIELD} = {run.init_from!r} holds {source.seeds} seeds; config.seeds = "
                    f"{run.seeds} needs 1 or {run.seeds} there")
  if not (Path(run.init_from) / "checkpoints").is_dir():
    raise UserError(f"{FIELD} = {run.init_from!r} holds no checkpoints/")


def start_state(run, mesh, boxed, optimizer, *, log=print):
  """This run's train state at step 0: the source's parameters and a fresh optimizer state for
  them (`check` first), made in place in the run's shardings (no random initialisation)."""
  from sleep_lm.model.hybrid import init_params
  from sleep_lm.training import trainer
  from sleep_lm.training.checkpointing import Checkpointer
  check(run, boxed)
  source = source_run(run)
  src_boxed = jax.eval_shape(lambda: init_params(source.model, jax.random.key(0)))
  abstract, _ = trainer.initial_state(source, mesh, src_boxed, abstract=True)
  ckpt = Checkpointer(Path(run.init_from) / "checkpoints", read_only=True)
  try:
    restored = ckpt.restore_latest(abstract, log=log)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"{FIELD} = {run.init_from!r} holds no checkpoint")
  src_state, meta = restored
  state = trainer.state_from_params(run, mesh, boxed, optimizer, src_state.params)
  log(f"parameters from {run.init_from} (step {meta['step']}), fresh optimizer state")
  return state
