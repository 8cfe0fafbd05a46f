"""The training loop: S models (seeds) at once, checkpoints, evaluation, metrics.

`train(run, workdir)` trains (or continues) the run in `workdir`. Everything a run needs to
continue is in the workdir (`sleep_lm.training.workdir`); repeating the command after a crash or a
kill continues from the newest readable checkpoint and reproduces the uninterrupted run: every batch
is a pure function of the step (`sleep_lm.tasks.train_dataset`), and the train metrics pending since
the last log line travel in the checkpoint.

Guards: one training run per workdir (`sleep_lm.training.workdir.Lock`, taken by process 0 before
anything is written); a non-finite loss or gradient norm stops the run with a `TrainingDiverged`
naming the first bad step and seed, and that state is never saved (with `config.skip_nonfinite`
such steps are skipped instead: the state stays as it was); a checkpoint that cannot be written
stops the run at the next step (`CheckpointSaveError`; no evaluation runs before the step's
checkpoint is on disk) and its temporary folder is removed. SIGTERM (preemption, `timeout`)
stops between two steps, checkpoints and raises `Preempted` (the CLI's exit status 75).
"""

from __future__ import annotations

import contextlib
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


def _write_scalars(writers, step: int, values: dict) -> None:
  """{tag: one value per seed} -> one TensorBoard point per seed, each in its seed's writer."""
  for i, w in enumerate(writers):
    w.scalars(step, {k: v[i] for k, v in values.items()})


class MetricBuffer:
  """The train metrics since the last log line, and their log line.

  Each step `add`s its metrics, which stay on the device until `fetch` brings them to the host
  (the loop's only host syncs: at log lines and saves) and stops the run at the first
  non-finite loss or gradient norm (unless `run.skip_nonfinite`). `flush` writes their means: a
  metrics.jsonl record and a TensorBoard point per seed, and the progress line. The fetched
  metrics (`pending`) travel in the checkpoint, so a run resumed between two log lines logs the
  same means as the uninterrupted run.
  """

  def __init__(self, run: RunConfig, start: int, pending: list[tuple[int, dict]],
               metrics_log: workdir.MetricsLog, writers: list, log):
    self.pending = pending                  # (step, {name: [value per seed]}) on the host
    self.diverged: tuple[int, int, str] | None = None   # (step, seed, name): first non-finite
    self._run, self._start = run, start
    self._metrics_log, self._writers, self._log = metrics_log, writers, log
    self._on_device: list = []
    self._started = self._interval_start = time.time()
    self._interval_steps = 0                # steps this process trained since the last flush

  def add(self, step: int, metrics: dict) -> None:
    self._on_device.append((step, metrics))
    self._interval_steps += 1

  def fetch(self, last_checkpoint: int) -> None:
    """Brings the added metrics to the host; raises `TrainingDiverged` at the first non-finite
    one (naming `last_checkpoint`, the step a rerun would continue from)."""
    self.pending.extend((s, {k: np.asarray(v).tolist() for k, v in m.items()})
                        for s, m in jax.device_get(self._on_device))
    self._on_device = []
    if not self._run.skip_nonfinite and self.diverged is None:
      self.diverged = _first_nonfinite(self.pending, self._run.model_seeds)
      if self.diverged:
        bad_step, bad_seed, key = self.diverged
        raise TrainingDiverged(
            f"{key} is not finite at step {bad_step} (seed {bad_seed}); stopping without saving "
            f"that state (last checkpoint: step {last_checkpoint}). Lower the learning rate, or "
            f"set config.skip_nonfinite=True to skip such steps")

  def flush(self, step: int, last_checkpoint: int) -> None:
    """Fetches, then writes the means since the last flush (with tokens/s and the elapsed time)
    to metrics.jsonl and TensorBoard and logs the progress line; the next interval starts."""
    self.fetch(last_checkpoint)
    means = {k: np.mean([m[k] for _, m in self.pending], axis=0) for k in self.pending[0][1]}
    now = time.time()
    tokens_per_s = self._interval_steps * self._run.tokens_per_step / (now - self._interval_start)
    for i, seed in enumerate(self._run.model_seeds):
      self._metrics_log.write({"step": step, "kind": "train", "seed": seed,
                               **{k: float(v[i]) for k, v in means.items()},
                               "tokens_per_s": tokens_per_s, "elapsed_s": now - self._started})
    _write_scalars(self._writers, step, {f"train/{k}": v for k, v in means.items()})
    self._log(_progress_line(step, self._run.steps, self._start, float(np.mean(means["loss"])),
                             float(np.mean(means["exact_accuracy"])), tokens_per_s,
                             now - self._started))
    self.pending, self._interval_steps = [], 0
    self.restart_clock()

  def restart_clock(self) -> None:
    """The time until now was not training (an evaluation): tokens/s leaves it out."""
    self._interval_start = time.time()


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
  # Setup: the starting state, the outputs, the eval sets, the step and its batches.
  workdir.claim(path, run.config, write=lead)
  ckpt = Checkpointer(path / "checkpoints", keep=run.keep_checkpoints, clean=lead)
  state, optimizer, start, pending = _starting_state(run, path, mesh, boxed, ckpt, log)
  metrics_log = workdir.MetricsLog(path / "metrics.jsonl", start, write=lead, warn=log)
  writers = _tensorboard_writers(run, path, start) if lead else []
  eval_sets = _eval_sets(run, path, lead)
  schedule = task_schedule(run)
  train_step, batch_sh = _step_function(run, mesh, boxed, optimizer)
  batches = _device_batches(run, batch_sh, start, schedule)
  metrics = MetricBuffer(run, start, pending, metrics_log, writers, log)

  def evaluate(step: int, record: bool = True) -> dict:
    ckpt.wait()                    # a step is evaluated only once its checkpoint is on disk
    results = evaluation.evaluate(run.model, state.params, mesh, eval_sets,
                                  batch_size=run.eval_batch_size, schedule=schedule,
                                  rules=run.sharding_rules)
    if record:
      for seed_record in evaluation.per_seed_records(results, run.model_seeds):
        metrics_log.write({"step": step, "kind": "eval", **seed_record})
      for name, r in results.items():
        _write_scalars(writers, step, {f"eval/{name}/{k}": r[k]
                                       for k in ("loss", "exact_accuracy", "query_accuracy")})
    log(f"eval step {step}\n" + evaluation.format_results(results, run.model_seeds))
    return results

  def save(step: int) -> None:
    metrics.fetch(last_checkpoint=saved)   # a non-finite state is never saved
    # a copy: the next fetch extends the buffer's list while the save may still be writing it
    ckpt.save(state, step, {"step": step, "data_position": step,
                            "pending": list(metrics.pending)})

  # The loop. A SIGTERM asks it to stop between two steps, so that the state it checkpoints is
  # whole (a step in flight has already consumed its donated input).
  last_eval: dict = {}
  step = saved = start
  with _sigterm_requests() as stop_requested:
    try:
      for step in range(start + 1, run.steps + 1):
        if step == run.hard_warmup_steps + 1 and step > 1:
          log(f"step {step}: hard-eviction warm-up over; training with eviction "
              f"{run.model.eviction!r}")
        state, step_metrics = train_step(state, next(batches), step)
        metrics.add(step, step_metrics)
        ckpt.check()                 # a background save that failed stops the run here
        if step % run.log_every == 0 or step == run.steps:
          metrics.flush(step, last_checkpoint=saved)
        if step % run.checkpoint_every == 0 or step == run.steps:
          save(step)
          saved = step
        if step % run.eval_every == 0 or step == run.steps:
          last_eval = evaluate(step)
          metrics.restart_clock()    # keep eval time out of tokens/s
        if stop_requested:
          log(f"SIGTERM: stopping at step {step}")
          break
      if not last_eval and not stop_requested:   # already complete: report its accuracy again,
        # recorded only if the run stopped between its last checkpoint and its evaluation
        last_eval = evaluate(step, record=step not in metrics_log.eval_steps)
    except KeyboardInterrupt:
      log(f"interrupted at step {step}")
      raise
    finally:
      # The end, however it came: the step stopped at is saved if its state is whole and finite
      # and saving still works; the checkpointer and the event files are closed.
      whole = not any(x.is_deleted() for x in jax.tree.leaves(state))
      if (saved != step and step > start and whole and metrics.diverged is None
          and not ckpt.failed):
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
  if metrics.diverged:
    raise TrainingDiverged(f"stopped at step {metrics.diverged[0]}: {metrics.diverged[2]} is not "
                           f"finite")
  if stop_requested and step < run.steps:
    raise Preempted(f"SIGTERM: stopped at step {step} of {run.steps} with its checkpoint "
                    f"saved; the same command continues the run")
  return last_eval


def _starting_state(run: RunConfig, path: Path, mesh, boxed, ckpt: Checkpointer, log):
  """(state, optimizer, the first step, the pending train metrics): from the newest readable
  checkpoint, else from `run.init_from`, else a random initialisation."""
  # The random initialisation runs only when nothing else gives the parameters: for an
  # imported 34-layer stack its compilation tripped XLA's slow-compile alarm on an H200, time
  # wasted on a resumed run or one that starts from init_from.
  abstract, optimizer = initial_state(run, mesh, boxed, abstract=True)
  restored = ckpt.restore_latest(abstract, log=log)
  if restored is not None:
    state, meta = restored
    start = int(meta["data_position"])
    log(f"resuming {path} from step {start}")
    return state, optimizer, start, [(int(s), m) for s, m in meta.get("pending", [])]
  if run.init_from:
    return init_from.start_state(run, mesh, boxed, optimizer, log=log), optimizer, 0, []
  return initial_state(run, mesh, boxed)[0], optimizer, 0, []


def _tensorboard_writers(run: RunConfig, path: Path, start: int) -> list:
  """One event-file writer per seed, in <workdir>/tensorboard/seed_<s>, if the run asks for
  them; `start`: the step the run starts or resumes from."""
  if not run.tensorboard:
    return []
  # Imported only here: tensorboardX imports torch wherever torch is installed.
  from sleep_lm.training.tensorboard import ScalarWriter
  return [ScalarWriter(path / "tensorboard" / f"seed_{s}", start_step=start)
          for s in run.model_seeds]


def _eval_sets(run: RunConfig, path: Path, lead: bool):
  data_dir = Path(run.data_dir) if run.data_dir else path / "eval_data"
  if lead:                                   # TFDS files: built once, by one process
    evaluation.prepare_eval_sets(run.task, size=run.eval_size, data_dir=data_dir)
  _barrier("eval_sets_built")
  return evaluation.prepare_eval_sets(run.task, size=run.eval_size, data_dir=data_dir)


def _step_function(run: RunConfig, mesh, boxed, optimizer):
  """(step(state, batch, step number) -> (state, metrics), batch sharding). A sliding-window
  run's hard-eviction warm-up: steps 1..hard_warmup_steps train the same parameters with
  eviction="hard" (the same windows, so the same schedule), then sliding."""
  sharded_step, batch_sh = sharded_train_step(run, mesh, boxed, optimizer)
  warmup_step = None
  if run.hard_warmup_steps:
    hard = dataclasses.replace(run.model, eviction="hard")
    warmup_step, _ = sharded_train_step(run, mesh, boxed, optimizer, model=hard)

  def train_step(state, batch, step):
    fn = warmup_step if step <= run.hard_warmup_steps else sharded_step
    with jax.set_mesh(mesh):
      return fn(state, batch)

  return train_step, batch_sh


def _device_batches(run: RunConfig, batch_sh, start: int, schedule):
  """An iterator over the batches of steps start + 1, ..., each a global array made of this
  process's part (`sharding.process_batch_slice`)."""
  shard_index, shard_count = sharding.process_batch_slice(batch_sh, run.batch_size, axis=1)
  dataset = train_dataset(run.task, run.batch_size, data_seeds=run.model_seeds,
                          shard_index=shard_index, shard_count=shard_count, num_steps=run.steps)

  def to_device(batch):
    if static_schedule(run.model, batch["loss_mask"].reshape(-1, run.task.seq_len)) != schedule:
      raise ValueError(f"task {run.task.name}: a batch supervises other windows than the task's "
                       f"fixed layout ({schedule}); the static schedule would be wrong")
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sh, x), batch)

  return map(to_device, dataset[start:].to_iter_dataset())


@contextlib.contextmanager
def _sigterm_requests():
  """A list that each SIGTERM appends to while the block runs. Python delivers signals to the
  main thread only: elsewhere nothing is caught and the list stays empty."""
  requests: list[bool] = []
  if threading.current_thread() is not threading.main_thread():
    yield requests
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: requests.append(True))
  try:
    yield requests
  finally:
    signal.signal(signal.SIGTERM, previous)
