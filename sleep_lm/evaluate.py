r"""Evaluate a trained run on its held-out sets (every seed, then the mean).

  python -m sleep_lm.evaluate --workdir runs/rule110_N4_t12 [--step 750] [--task t=16]

Prints, per eval set and seed, the masked loss, exact accuracy (all answers right) and the
accuracy of each answer, with the set's majority-answer floor and chance level, and writes
<workdir>/eval_step<STEP>[_<task override>].json. `--task KEY=VALUE,...` evaluates on a variant
of the trained task (e.g. another Rule 110 depth t).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
from absl import flags, logging

from sleep_lm import cli
from sleep_lm.common import validation
from sleep_lm.common.errors import UserError
from sleep_lm.tasks import TASKS
from sleep_lm.training import evaluation, trainer, workdir
from sleep_lm.training.checkpointing import Checkpointer
from sleep_lm.training.run_config import RunConfig


def _parse_overrides(text: str) -> dict[str, str]:
  overrides = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise UserError(f"--task: expected KEY=VALUE items, got {item!r}")
    overrides[key] = value
  return overrides


_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def _typed(path: str, value, like):
  """`value` (a --task string, or a value from the API) as the type of the field's current value
  `like` (None, a field the config leaves at its default: an integer if it reads as one, else
  the text)."""
  kind = type(like)
  if like is None:
    return int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value
  if not isinstance(value, str):
    if type(value) is kind or kind is float and type(value) is int:
      return value
    raise validation.FieldError(path, f"must be {_KINDS.get(kind, kind.__name__)}, got {value!r}")
  try:
    if kind is bool:
      if value.lower() not in ("true", "false"):
        raise ValueError(value)
      return value.lower() == "true"
    return kind(value)
  except ValueError:
    raise validation.FieldError(path, f"must be {_KINDS.get(kind, kind.__name__)}, got "
                                      f"{value!r}") from None


def apply_task_overrides(config, overrides: dict) -> None:
  """Sets `config.task` fields to `overrides` (--task), each as its field's type; a UserError
  names config.task.<key> and what it takes (the task's fields, or the field's type)."""
  cls = TASKS.get(config.task.get("name"))
  try:
    if cls is not None:
      validation.unknown_fields("config.task", overrides,
                                [f.name for f in dataclasses.fields(cls)])
    for key, value in overrides.items():
      config.task[key] = _typed(f"config.task.{key}", value, config.task.get(key))
  except ValueError as e:
    raise UserError(f"--task: {e}") from e


# Task fields that shape only the training stream (eval sets ignore them).
TRAINING_ONLY_FIELDS = {"curriculum": ()}


def drop_training_only_fields(config, overrides: dict) -> None:
  """Resets training-only task fields that --task does not set: a GSM run's curriculum stages
  are checked against the task's max_len, so a run trained with one could not be evaluated at
  a shorter max_len otherwise, and the eval sets never read them."""
  for key, default in TRAINING_ONLY_FIELDS.items():
    if key in config.task and key not in overrides:
      config.task[key] = default


def evaluate_workdir(path: str | Path, *, step: int | None = None,
                     task_overrides: dict | None = None) -> dict:
  """Restores the run in `path` (newest readable step, or `step`) and evaluates every seed."""
  path = Path(path)
  config = workdir.load_config(path)
  if task_overrides:
    apply_task_overrides(config, task_overrides)
    drop_training_only_fields(config, task_overrides)
  run = RunConfig.checked(config)
  mesh, boxed = trainer.setup(run)
  state, _ = trainer.initial_state(run, mesh, boxed, abstract=True)   # restored below
  ckpt = Checkpointer(path / "checkpoints", keep=run.keep_checkpoints, read_only=True)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f"no checkpoint in {path / 'checkpoints'}")
    if step is None:
      state, meta = ckpt.restore_latest(state)
    elif step not in steps:
      raise UserError(f"--step {step} has no checkpoint; available steps: {steps}")
    else:
      state, meta = ckpt.restore(state, step)
  finally:
    ckpt.close()
  data_dir = Path(run.data_dir) if run.data_dir else path / "eval_data"
  sets = evaluation.prepare_eval_sets(run.task, size=run.eval_size, data_dir=data_dir)
  results = evaluation.evaluate(run.model, state.params, mesh, sets,
                                batch_size=run.eval_batch_size,
                                schedule=trainer.task_schedule(run), rules=run.sharding_rules)
  out = {"step": int(meta["step"]), "seeds": list(run.model_seeds), "task": run.task.fields(),
         "sets": results}
  suffix = "".join(f"_{k}{config.task[k]}" for k in sorted(task_overrides or {}))
  (path / f"eval_step{out['step']}{suffix}.json").write_text(json.dumps(out, indent=2))
  return out


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)

  r = evaluate_workdir(flags.FLAGS.workdir, step=flags.FLAGS.step,
                       task_overrides=_parse_overrides(flags.FLAGS.task))
  print(f"workdir {flags.FLAGS.workdir}  step {r['step']}  task {r['task']}  "
        f"(devices: {jax.device_count()})")
  print(evaluation.format_results(r["sets"], r["seeds"]))
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A sleep_lm.train workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
  flags.DEFINE_string("task", "", "Task field overrides, KEY=VALUE[,...], e.g. t=16.")
  cli.define_debug_flag()
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
