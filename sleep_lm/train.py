r"""Train a hybrid model that sleeps, from an ml-collections config.

  python -m sleep_lm.train --config experiments/rule110.py:smoke --workdir /tmp/rule110_smoke

The workdir holds everything a run needs to continue: config.json (a different config is
refused), checkpoints/ (orbax: params, optimizer state, step, data position; atomic and
asynchronous), metrics.jsonl (one JSON object per log or eval point) and eval_data/ (the TFDS
held-out sets, unless config.data_dir names another place). Repeating the command after a crash
or a kill continues from the last checkpoint and reproduces the uninterrupted run's curve,
because every batch is a pure function of the step (`sleep_lm.data.rule110.train_dataset`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from sleep_lm import sharding
from sleep_lm.config import ModelConfig
from sleep_lm.data import rule110, tfds_rule110
from sleep_lm.training import (
  OptimizerConfig,
  create_train_state,
  make_eval_step,
  make_optimizer,
  make_train_step,
)

TASKS = ("rule110",)


# ----------------------------------------------------------------------------- configuration

def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  if config.task.name not in TASKS:
    raise ValueError(f"config.task.name must be one of {TASKS}, got {config.task.name!r}")
  return ModelConfig.from_mapping({**config.model.to_dict(), "vocab_size": rule110.VOCAB_SIZE})


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
  return OptimizerConfig.from_mapping({**config.optimizer.to_dict(), "total_steps": config.steps})


def task(config: ml_collections.ConfigDict, split: str = "train") -> rule110.Rule110Task:
  return rule110.Rule110Task(seed=config.task.seed, t=config.task.t, split=split)


def check_run_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on values the loop itself depends on."""
  for field in ("steps", "batch_size", "log_every", "eval_every", "eval_size",
                "eval_batch_size", "checkpoint_every"):
    value = config[field]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field} must be an integer >= 1, got {value!r}")
  model_config(config)
  optimizer_config(config)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json(sort_keys=True))


def claim_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Writes config.json, or refuses a workdir that holds a different config."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.json"
  wanted = config_to_dict(config)
  if path.exists():
    held = json.loads(path.read_text())
    if held != wanted:
      a, b = _flatten(held), _flatten(wanted)
      diff = [f"{k}: {a.get(k, '<absent>')!r} in the workdir, {b.get(k, '<absent>')!r} now"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
      raise ValueError(f"workdir {workdir} holds a run with a different config; use a new "
                       f"--workdir or the same config. Differences:\n  " + "\n  ".join(diff))
  else:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic


def load_workdir_config(workdir: Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} a sleep_lm.train workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------- state & ckpt

def checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def initial_state(config, mesh):
  """Train state with params sharded by their logical names; returns (state, optimizer)."""
  from sleep_lm.model import init_params
  mcfg = model_config(config)
  optimizer = make_optimizer(optimizer_config(config))
  boxed = jax.eval_shape(lambda: init_params(mcfg, jax.random.key(config.seed)))
  sharding.check_divisible(config.batch_size, mesh, boxed)
  param_sh = sharding.param_shardings(boxed, mesh)

  def init():
    state = create_train_state(mcfg, optimizer, jax.random.key(config.seed))
    params = jax.lax.with_sharding_constraint(state.params, param_sh)
    return state.replace(params=params, opt_state=optimizer.init(params))

  state = jax.jit(init)()
  return state, optimizer


def restore(manager: ocp.CheckpointManager, state, step: int | None = None):
  """Restores (state, meta) at `step` (latest if None) into state's shapes and shardings."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def save(manager: ocp.CheckpointManager, state, step: int) -> None:
  # data_position: index of the next training batch; equal to the step for this data source.
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({"step": step, "data_position": step})))


# ----------------------------------------------------------------------------- evaluation

def evaluate(config, params, mesh, *, data_dir: Path, t: int | None = None) -> dict:
  """Exact accuracy (all answers right) and per-answer accuracy on the held-out TFDS set."""
  t = config.task.t if t is None else t
  source = tfds_rule110.eval_source(t, data_dir=str(data_dir), size=config.eval_size,
                                    seed=config.task.seed)
  step = make_eval_step(model_config(config))
  bsz = config.eval_batch_size
  batch_sh = sharding.batch_sharding(mesh)
  exact, answers = [], []
  queries = rule110.Rule110Task(t=t).query_positions
  for batch in tfds_rule110.eval_batches(source, bsz):
    n = len(batch["inputs"])
    padded = {k: np.pad(v, [(0, bsz - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
    e, a = step(params, jax.device_put(padded, batch_sh))
    exact.append(np.asarray(e)[:n])
    answers.append(np.asarray(a)[:n][:, queries])
  exact, answers = np.concatenate(exact), np.concatenate(answers)
  return {"t": t, "examples": int(len(exact)), "exact_accuracy": float(exact.mean()),
          "answer_accuracy": [float(x) for x in answers.mean(0)]}


# ----------------------------------------------------------------------------- metrics & progress

class MetricsLog:
  """metrics.jsonl in the workdir; on resume, records past the restored step are dropped."""

  def __init__(self, path: Path, resume_step: int):
    self.path = path
    if path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      tmp = path.with_suffix(".tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      os.replace(tmp, path)

  def write(self, record: dict) -> None:
    if jax.process_index() == 0:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _progress_line(step, total, start, m, tok_s, elapsed):
  done = int(20 * step / total)
  eta = (total - step) * elapsed / max(step - start, 1)
  return (f"[{'#' * done}{'.' * (20 - done)}] step {step:>6}/{total} | loss {m['loss']:.4f} | "
          f"exact {m['exact_accuracy']:.3f} | {tok_s / 1e3:7.1f}k tok/s | eta {eta / 60:5.1f} min")


# ----------------------------------------------------------------------------- the loop

def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (or continues) the run in `workdir`; returns the last eval record."""
  workdir = Path(workdir)
  check_run_config(config)
  claim_workdir(config, workdir)
  data_dir = Path(config.data_dir) if config.data_dir else workdir / "eval_data"
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  state, optimizer = initial_state(config, mesh)
  manager = checkpoint_manager(workdir, config)
  start = 0
  if manager.latest_step() is not None:
    state, meta = restore(manager, state)
    start = int(meta["data_position"])
    logging.info("resumed from checkpoint at step %d", start)
    print(f"resuming {workdir} from step {start}", flush=True)
  log = MetricsLog(workdir / "metrics.jsonl", start)

  mcfg = model_config(config)
  step_fn = make_train_step(mcfg, optimizer)
  batch_sh = sharding.batch_sharding(mesh)
  dataset = rule110.train_dataset(task(config), config.batch_size,
                                  shard_index=jax.process_index(),
                                  shard_count=jax.process_count(), num_steps=config.steps)
  batches = iter(dataset[start:].to_iter_dataset())
  tokens_per_step = config.batch_size * rule110.SEQ_LEN

  def to_device(batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sh, x), batch)

  # A SIGTERM (preemption, `timeout`) asks the loop to stop between two steps, so that the
  # state it checkpoints is whole (a step in flight has already consumed its donated input).
  stop_requested = []
  on_main_thread = threading.current_thread() is threading.main_thread()  # signal needs it
  if on_main_thread:
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
  last_eval: dict = {}
  step, saved = start, start
  pending, t0, interval_start = [], time.time(), time.time()
  interval_steps = 0
  try:
    for step in range(start + 1, config.steps + 1):
      state, metrics = step_fn(state, to_device(next(batches)))
      pending.append(metrics)
      interval_steps += 1
      if step % config.log_every == 0 or step == config.steps:
        fetched = jax.device_get(pending)    # the only host sync of the loop
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        now = time.time()
        tok_s = interval_steps * tokens_per_step / (now - interval_start)
        log.write({"step": step, "kind": "train", **mean, "tokens_per_s": tok_s,
                   "elapsed_s": now - t0})
        print(_progress_line(step, config.steps, start, mean, tok_s, now - t0), flush=True)
        pending, interval_start, interval_steps = [], time.time(), 0
      if step % config.checkpoint_every == 0 or step == config.steps:
        save(manager, state, step)
        saved = step
      if step % config.eval_every == 0 or step == config.steps:
        last_eval = evaluate(config, state.params, mesh, data_dir=data_dir)
        log.write({"step": step, "kind": "eval", **last_eval})
        print(f"eval  step {step:>6} | t={last_eval['t']} | exact accuracy "
              f"{last_eval['exact_accuracy']:.4f} | per answer "
              f"{[round(a, 3) for a in last_eval['answer_accuracy']]}", flush=True)
        interval_start = time.time()   # keep eval time out of tokens/s
      if stop_requested:
        print(f"SIGTERM: stopping at step {step}", flush=True)
        break
    if not last_eval and not stop_requested:   # already complete: report its accuracy again
      last_eval = evaluate(config, state.params, mesh, data_dir=data_dir)
  except KeyboardInterrupt:
    print(f"interrupted at step {step}", flush=True)
    raise
  finally:
    whole = not any(x.is_deleted() for x in jax.tree.leaves(state))
    if saved != step and step > start and whole:
      save(manager, state, step)
    manager.wait_until_finished()
    manager.close()
    if on_main_thread:
      signal.signal(signal.SIGTERM, previous)
  return last_eval


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint file at INFO
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  print(f"devices: {jax.devices()}", flush=True)
  result = train(config, workdir)
  if result:
    print(f"held-out exact accuracy (t={result['t']}): {result['exact_accuracy']:.4f}")
  return 0


if __name__ == "__main__":
  # Flags live here, not at import, so that tests and tools can import this module freely.
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created if absent).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
