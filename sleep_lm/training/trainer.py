"""The training loop: S models (seeds) at once, checkpoints, evaluation, metrics.

`train(run, workdir)` trains (or continues) the run in `workdir`. Everything a run needs to
continue is in the workdir (`sleep_lm.training.workdir`); repeating the command after a crash or a
kill
continues from the newest readable checkpoint and reproduces the uninterrupted run: every batch
is a pure function of the step (`sleep_lm.tasks.train_dataset`), and the train metrics pending
since the last log line travel in the checkpoint.

Guards: one training run per workdir (`sleep_lm.training.workdir.Lock`, taken by process 0 before
anything is written); a non-finite loss or gradient norm stops the run with a `TrainingDiverged`
naming the first bad step and seed, and that state is never saved (with `config.skip_nonfinite`
such steps are skipped instead: the state stays as it was); a checkpoint that cannot be written
stops the run at the next step (`CheckpointSaveError`; no evaluation runs before the step's
checkpoint is on disk) and its temporary folder is removed. SIGTERM (preemption, `timeout`)
stops between two steps, checkpoints and raises `Preempted` (the CLI's exit status 75).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from sleep_lm.common.errors import Preempted, UserError
from sleep_lm.model import sharding
from sleep_lm.model.sleep import static_schedule
from sleep_lm.tasks import train_dataset
from sleep_lm.training import evaluation, init_from, workdir
from sleep_lm.training.checkpointing import Checkpointer
from sleep_lm.training.run_config import RunConfig
from sleep_lm.training.step import create_train_states, make_optimizer, make_train_step
from sleep_lm.training.tensorboard import ScalarWriter


class TrainingDiverged(UserError):
  """The loss or gradient norm became NaN or infinite; nothing past the last good save is kept."""


def with_seed_axis(shardings):
  """Shardings of per-model arrays -> the same for arrays with a leading (replicated) seed axis."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)), shardings)


def seeded_batch_sharding(mesh, rules=sharding.DEFAULT_RULES) -> NamedSharding:
  """[S, B, T] batches: the batch axis split as the "batch" rule says, seeds and tokens not."""
  return NamedSharding(mesh, PartitionSpec(None, *sharding.batch_sharding(mesh, rules).spec))


def setup(run: RunConfig, devices=None):
  """The mesh and the abstract parameters, checked against each other; no side effects.

  `devices`: the mesh's devices (default: every device of every process)."""
  from sleep_lm.model.hybrid import init_params
  mesh = sharding.make_mesh(run.mesh, devices)
  boxed = jax.eval_shape(lambda: init_params(run.model, jax.random.key(0)))
  sharding.check_divisible(run.batch_size, mesh, boxed, run.sharding_rules)
  sharding.check_divisible(run.eval_batch_size, mesh, boxed, run.sharding_rules,
                           what="eval_batch_size")
  return mesh, boxed


def state_shardings(run: RunConfig, mesh, boxed, optimizer):
  """NamedShardings of the stacked train state: parameters by their logical names and the rules,
  optimizer state like the parameter it belongs to, the step replicated; seeds replicated."""
  from sleep_lm.training.step import TrainState
  param_sh = sharding.param_shardings(boxed, mesh, run.sharding_rules)
  params = nn.meta.unbox(boxed)
  opt_sh = sharding.opt_state_shardings(jax.eval_shape(optimizer.init, params), params,
                                        param_sh, mesh)
  return with_seed_axis(TrainState(sharding.replicated(mesh), param_sh, opt_sh))


def initial_state(run: RunConfig, mesh, boxed, *, abstract: bool = False):
  """Train states of every model seed (stacked), created in place by one jitted program whose
  output shardings are `state_shardings`: nothing is materialised whole on one device.
  `abstract`: their shapes, dtypes and shardings only (`jax.ShapeDtypeStruct`s, nothing run)."""
  optimizer = make_optimizer(run.optimizer)
  out_sh = state_shardings(run, mesh, boxed, optimizer)

  def init():
    with nn.logical_axis_rules(run.sharding_rules):
      return create_train_states(run.model, optimizer, run.model_seeds)

  with jax.set_mesh(mesh):
    fn = jax.jit(init, out_shardings=out_sh)
    return (jax.eval_shape(fn) if abstract else fn()), optimizer


def state_from_params(run: RunConfig, mesh, boxed, optimizer, params):
  """Train states of every model seed from given parameters (a leading seed axis of 1, shared by
  every seed, or of run.seeds) with a fresh optimizer state, made in place in the run's
  shardings by one jitted program: no random initialisation, whose compilation for an imported
  34-layer stack took 8 minutes on an H200 (2026-12-04)."""
  from sleep_lm.training.step import TrainState
  shardings = state_shardings(run, mesh, boxed, optimizer)

  def fresh(params):
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (run.seeds, *x.shape[1:])), params)
    return TrainState(jnp.zeros((run.seeds,), jnp.int32), params,
                      jax.vmap(optimizer.init)(params))

  with jax.set_mesh(mesh):
    return jax.jit(fresh, out_shardings=shardings)(params)


def sharded_train_step(run: RunConfig, mesh, boxed, optimizer, model=None):
  """(jitted step, batch sharding): the train step with the state's and the batch's shardings
  pinned (the state keeps its layout and its donated buffers are reused). Call the step under
  `jax.set_mesh(mesh)`. The trainer and the benchmarks run this same step. `model`: another
  ModelConfig with the same parameters (the hard-eviction warm-up's), default run.model."""
  batch_sh = seeded_batch_sharding(mesh, run.sharding_rules)
  state_sh = state_shardings(run, mesh, boxed, optimizer)
  step = make_train_step(model or run.model, optimizer, schedule=task_schedule(run),
                         skip_nonfinite=run.skip_nonfinite, rules=run.sharding_rules,
                         in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, sharding.replicated(mesh)))
  return step, batch_sh


def task_schedule(run: RunConfig) -> tuple[bool, ...]:
  """Which windows sleep: the task's layout is fixed, so this is known before tracing."""
  return static_schedule(run.model, run.task.layout_mask())


def _first_nonfinite(history: list[tuple[int, dict]], seeds) -> tuple[int, int, str] | None:
  for step, m in history:
    for key in ("loss", "grad_norm"):
      values = np.asarray(m[key])
      bad = ~np.isfinite(values)
      if bad.any():
        return step, seeds[int(np.argmax(bad))], key
  return None


def _progress_line(step, total, start, loss, exact, tok_s, elapsed):
  done = int(20 * step / total)
  eta = (total - step) * elapsed / max(step - start, 1)
  return (f"[{'#' * done}{'.' * (20 - done)}] step {step:>6}/{total} | loss {loss:.4f} | "
          f"exact {exact:.3f} | {tok_s / 1e3:7.1f}k tok/s | eta {eta / 60:5.1f} min")


def _barrier(name: str) -> None:
  """Every process waits here for the others (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _lock_workdir(path: Path, lead: bool, log) -> workdir.Lock | None:
  """Process 0 takes the workdir's lock; with several processes all learn whether it did, so
  that all refuse alike."""
  lock, refusal = None, None
  if lead:
    try:
      lock = workdir.Lock(path, warn=log)
    except UserError as e:
      refusal = e
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
    if not held and refusal is None:
      refusal = UserError(f"process 0 could not lock --workdir {path}; see its error")
  if refusal is not None:
    raise refusal
  return lock


def train(run: RunConfig, path: str | Path, *, log=print) -> dict:
  """Trains (or continues) the run in `path`; returns the last evaluation's results. Raises
  `Preempted` when SIGTERM stopped it before the end (after its checkpoint).

  Multi-host (`jax.distributed.initialize` called first, see `sleep_lm.train`): every process
  runs this with the same config and workdir (a shared file system). Each feeds its own part of
  the global batch (`sharding.process_batch_slice`); only process 0 locks the workdir, writes
  config.json, metrics.jsonl, TensorBoard files and log lines and builds the eval sets (the
  others wait, then read them); orbax checkpoints are written by every process, as orbax
  requires.
  """
  path = Path(path)
  try:
    mesh, boxed = setup(run)                   # everything checked before the workdir is claimed
  except ValueError as e:
    raise UserError(str(e)) from e
  init_from.check(run, boxed)
  lead = jax.process_index() == 0
  if not lead:
    log = lambda *_: None                      # one log: process 0's
  lock = _lock_workdir(path, lead, log)
  try:
    return _train(run, path, mesh, boxed, lead=lead, log=log)
  finally:
    if lock is not None:
      lock.release()


def _train(run: RunConfig, path: Path, mesh, boxed, *, lead: bool, log) -> dict:
  workdir.claim(path, run.config, write=lead)
  data_dir = Path(run.data_dir) if run.data_dir else path / "eval_data"
  seeds = run.model_seeds
  schedule = task_schedule(run)

  # The random initialisation runs only when nothing else gives the parameters: for an
  # imported 34-layer stack its compilation tripped XLA's slow-compile alarm on an H200, time
  # wasted on a resumed run or one that starts from init_from.
  abstract, optimizer = initial_state(run, mesh, boxed, abstract=True)
  ckpt = Checkpointer(path / "checkpoints", keep=run.keep_checkpoints, clean=lead)
  start, pending_host = 0, []
  restored = ckpt.restore_latest(abstract, log=log)
  if restored is not None:
    state, meta = restored
    start = int(meta["data_position"])
    pending_host = [(int(s), m) for s, m in meta.get("pending", [])]
    log(f"resuming {path} from step {start}")
  elif run.init_from:
    state = init_from.start_state(run, mesh, boxed, optimizer, log=log)
  else:
    state, _ = initial_state(run, mesh, boxed)
  metrics_log = workdir.MetricsLog(path / "metrics.jsonl", start, write=lead, warn=log)
  writers = ([ScalarWriter(path / "tensorboard" / f"seed_{s}") for s in seeds]
             if run.tensorboard and lead else [])
  if lead:                                   # TFDS files: built once, by one process
    evaluation.prepare_eval_sets(run.task, size=run.eval_size, data_dir=data_dir)
  _barrier("eval_sets_built")
  eval_sets = evaluation.prepare_eval_sets(run.task, size=run.eval_size, data_dir=data_dir)

  jitted_step, batch_sh = sharded_train_step(run, mesh, boxed, optimizer)
  # Hard-eviction warm-up of a sliding-window run: steps 1..hard_warmup_steps train the same
  # parameters with eviction="hard" (the same windows, so the same schedule), then sliding.
  warmup_step = None
  if run.hard_warmup_steps:
    hard = dataclasses.replace(run.model, eviction="hard")
    warmup_step, _ = sharded_train_step(run, mesh, boxed, optimizer, model=hard)

  def step_fn(state, batch, step):
    fn = warmup_step if step <= run.hard_warmup_steps else jitted_step
    with jax.set_mesh(mesh):
      return fn(state, batch)

  shard_index, shard_count = sharding.process_batch_slice(batch_sh, run.batch_size, axis=1)
  dataset = train_dataset(run.task, run.batch_size, data_seeds=seeds, shard_index=shard_index,
                          shard_count=shard_count, num_steps=run.steps)
  batches = iter(dataset[start:].to_iter_dataset())

  def to_device(batch):
    if static_schedule(run.model, batch["loss_mask"].reshape(-1, run.task.seq_len)) != schedule:
      raise ValueError(f"task {run.task.name}: a batch supervises other windows than the task's "
                       f"fixed layout ({schedule}); the static schedule would be wrong")
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sh, x), batch)

  def scalars(step, values):
    for i, w in enumerate(writers):
      w.scalars(step, {k: v[i] for k, v in values.items()})

  def run_eval(step):
    ckpt.wait()                    # a step is evaluated only once its checkpoint is on disk
    results = evaluation.evaluate(run.model, state.params, mesh, eval_sets,
                                  batch_size=run.eval_batch_size, schedule=schedule,
                                  rules=run.sharding_rules)
    for record in evaluation.per_seed_records(results, seeds):
      metrics_log.write({"step": step, "kind": "eval", **record})
    for name, r in results.items():
      scalars(step, {f"eval/{name}/{k}": r[k] for k in ("loss", "exact_accuracy",
                                                         "query_accuracy")})
    log(f"eval step {step}\n" + evaluation.format_results(results, seeds))
    return results

  # A SIGTERM asks the loop to stop between two steps, so that the state it checkpoints is whole
  # (a step in flight has already consumed its donated input).
  stop_requested = []
  on_main_thread = threading.current_thread() is threading.main_thread()  # signal needs it
  if on_main_thread:
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
  last_eval: dict = {}
  step, saved = start, start
  pending_device = []                      # (step, metrics on the device) since the last sync
  t0 = interval_start = time.time()
  interval_steps, diverged = 0, None

  def sync():
    """Fetches the pending metrics (the loop's only host syncs) and checks they are finite."""
    nonlocal pending_device, diverged
    pending_host.extend((s, {k: np.asarray(v).tolist() for k, v in m.items()})
                        for s, m in jax.device_get(pending_device))
    pending_device = []
    if not run.skip_nonfinite and diverged is None:
      diverged = _first_nonfinite(pending_host, seeds)
      if diverged:
        bad_step, bad_seed, key = diverged
        raise TrainingDiverged(
            f"{key} is not finite at step {bad_step} (seed {bad_seed}); stopping without saving "
            f"that state (last checkpoint: step {saved}). Lower the learning rate, or set "
            f"config.skip_nonfinite=True to skip such steps")

  def save(step):
    nonlocal saved
    sync()
    ckpt.save(state, step, {"step": step, "data_position": step, "pending": pending_host})
    saved = step

  try:
    for step in range(start + 1, run.steps + 1):
      if step == run.hard_warmup_steps + 1 and step > 1:
        log(f"step {step}: hard-eviction warm-up over; training with eviction "
            f"{run.model.eviction!r}")
      state, metrics = step_fn(state, to_device(next(batches)), step)
      pending_device.append((step, metrics))
      ckpt.check()                 # a background save that failed stops the run here
      interval_steps += 1
      if step % run.log_every == 0 or step == run.steps:
        sync()
        means = {k: np.mean([m[k] for _, m in pending_host], axis=0) for k in pending_host[0][1]}
        now = time.time()
        tok_s = interval_steps * run.tokens_per_step / (now - interval_start)
        for i, seed in enumerate(seeds):
          metrics_log.write({"step": step, "kind": "train", "seed": seed,
                             **{k: float(v[i]) for k, v in means.items()},
                             "tokens_per_s": tok_s, "elapsed_s": now - t0})
        scalars(step, {f"train/{k}": v for k, v in means.items()})
        log(_progress_line(step, run.steps, start, float(np.mean(means["loss"])),
                           float(np.mean(means["exact_accuracy"])), tok_s, now - t0))
        pending_host, interval_start, interval_steps = [], time.time(), 0
      if step % run.checkpoint_every == 0 or step == run.steps:
        save(step)
      if step % run.eval_every == 0 or step == run.steps:
        last_eval = run_eval(step)
        interval_start = time.time()   # keep eval time out of tokens/s
      if stop_requested:
        log(f"SIGTERM: stopping at step {step}")
        break
    if not last_eval and not stop_requested:   # already complete: report its accuracy again
      last_eval = run_eval(step)
  except KeyboardInterrupt:
    log(f"interrupted at step {step}")
    raise
  finally:
    whole = not any(x.is_deleted() for x in jax.tree.leaves(state))
    if saved != step and step > start and whole and diverged is None and not ckpt.failed:
      try:
        save(step)
      except TrainingDiverged:
        pass                                  # found only now: the state is not saved
    try:
      ckpt.close()
    finally:
      if ckpt.failed and lead:
        ckpt.remove_temporary()               # the failed save's folder: it only fills the disk
      for w in writers:
        w.close()
      if on_main_thread:
        signal.signal(signal.SIGTERM, previous)
  if diverged:
    raise TrainingDiverged(f"stopped at step {diverged[0]}: {diverged[2]} is not finite")
  if stop_requested and step < run.steps:
    raise Preempted(f"SIGTERM: stopped at step {step} of {run.steps} with its checkpoint "
                    f"saved; the same command continues the run")
  return last_eval

