"""The task interface: everything the trainer, the evaluator and the benchmarks know of a task.

A task is a frozen dataclass (its fields are `config.task` minus `name`) that gives:
  - `vocab_size`, `seq_len`: the token space and the (fixed) example length (class attributes,
    or properties where the task's fields set them);
  - `token_chars` (optional): one character per token, for reading and printing text;
  - `train_examples(data_seed, indices)`: training examples, a pure function of its arguments;
  - `eval_set_names()`, `eval_examples(name, indices)`: the held-out sets (a disjoint stream),
    written once as TFDS array_record files by `sleep_lm.tasks.eval_sets`;
  - `chance(name)`: chance levels of the metrics on an eval set (the majority-answer floor is
    measured from the set itself by the evaluator, see `sleep_lm.training.evaluation`);
  - `set_floors(name, batch)` (optional): more reference levels of the task's own, measured on
    the whole eval set by the evaluator.
Examples are dicts of NumPy arrays with a leading example axis and the keys `BATCH_KEYS`:
  inputs, targets int32 [n,T]: tokens and the next token to predict at each position;
  loss_mask float32 [n,T]: 1 where the loss is taken (answer tokens), else 0;
  answer_group int32 [n,T]: which answer (query) a supervised token belongs to, -1 elsewhere;
    an answer is right when all its tokens are.

`train_dataset` turns a task into the training stream: a grain MapDataset indexed by step, with
one batch per model seed (stacked on a leading seed axis) and per process (a slice of the batch).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from sleep_lm.common import validation
from sleep_lm.common.validation import check_int, expect

BATCH_KEYS = ("inputs", "targets", "loss_mask", "answer_group")


# ----------------------------------------------------------------- counter-based example hashing

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MASK64 = (1 << 64) - 1
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def mix64(z: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser: a bijection on uint64 (wrapping multiplies are intended)."""
  with np.errstate(over="ignore"):  # numpy scalars warn on wrap-around; arrays do not
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
  return z ^ (z >> np.uint64(31))


def example_keys(seed: int, split_key: int, indices) -> np.ndarray:
  """One 64-bit key per example index, uint64 [n]: a pure function of (seed, split, index),
  injective in the index for a fixed (seed, split). Every task draws its examples from these,
  so any worker, shard or resumed run can make any example without carrying RNG state."""
  idx = np.asarray(indices)
  if idx.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
  if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0):
    raise ValueError(f"indices must be non-negative integers, got {idx!r}")
  key = mix64(np.array([seed], np.uint64) + GOLDEN)
  key = mix64(key ^ np.uint64(split_key))
  return mix64(key ^ idx.astype(np.uint64))


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
  """Base class of the tasks in `sleep_lm.tasks.TASKS` (see the module docstring)."""

  name: ClassVar[str]
  vocab_size: ClassVar[int]
  seq_len: ClassVar[int]
  # One character per token id (token i is token_chars[i]) for tasks whose tokens read as
  # text; `sleep_lm.generate` reads and prints prompts through it. None: ids only.
  token_chars: ClassVar[str | None] = None

  @abc.abstractmethod
  def train_examples(self, data_seed: int, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Training examples `indices` of the stream keyed by `data_seed`."""

  @abc.abstractmethod
  def eval_set_names(self) -> tuple[str, ...]:
    """Names of the held-out sets, e.g. ("t12",) or ("k1", "k2", ...)."""

  @abc.abstractmethod
  def eval_examples(self, name: str, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `indices` of the held-out set `name` (disjoint from every training stream)."""

  @abc.abstractmethod
  def chance(self, name: str) -> dict[str, float]:
    """Chance levels on eval set `name`: {"exact_accuracy": ..., "answer_accuracy": ...}."""

  def set_floors(self, name: str, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Task-specific reference levels ("floor_..." keys) measured on eval set `name`, given
    whole as `batch` (the keys of BATCH_KEYS); none by default."""
    del name, batch
    return {}

  def eval_set_id(self, name: str) -> str:
    """A unique, filesystem-safe id of eval set `name` (its content depends on nothing else)."""
    self._check_eval_name(name)
    fields = "_".join(f"{f.name}{getattr(self, f.name)}" for f in dataclasses.fields(self))
    return f"{self.name}_{name}_{fields}"

  def fields(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def _check_eval_name(self, name: str) -> None:
    if name not in self.eval_set_names():
      raise ValueError(f"{self.name}: unknown eval set {name!r}; allowed: {self.eval_set_names()}")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], path: str = "config.task") -> Task:
    """Builds the task from `config.task` (without its `name`), rejecting unknown keys; its
    errors name the field at `path`."""
    return validation.from_mapping(cls, values, path, subject=f"task {cls.name!r}")

  def layout_mask(self) -> np.ndarray:
    """The loss mask [T] shared by every example: these tasks have a fixed layout, so which
    windows sleep is known before tracing (`sleep_lm.model.sleep.static_schedule`)."""
    return self.train_examples(0, np.zeros(1, np.uint64))["loss_mask"][0]


# ------------------------------------------------------------------------------- training stream

def check_sharding(batch_size, shard_index, shard_count) -> tuple[int, int, int]:
  batch_size = check_int("batch_size", batch_size, 1)
  shard_count = check_int("shard_count", shard_count, 1)
  shard_index = check_int("shard_index", shard_index, 0, shard_count - 1)
  expect(batch_size % shard_count == 0, "batch_size",
         f"must be divisible by shard_count = {shard_count}, got {batch_size}")
  return batch_size, shard_index, shard_count


def step_indices(step: int, batch_size: int, *, shard_index: int = 0,
                 shard_count: int = 1) -> np.ndarray:
  """Train example indices of one shard at `step`, uint64 [batch_size // shard_count].

  Global batch `step` is examples [step * batch_size, (step + 1) * batch_size); shard k of K
  takes the k-th contiguous slice.
  """
  batch_size, shard_index, shard_count = check_sharding(batch_size, shard_index, shard_count)
  step = check_int("step", step, 0)
  per_shard = batch_size // shard_count
  start = step * batch_size + shard_index * per_shard
  if start + per_shard > 2**63:
    raise ValueError(f"step too large for batch_size {batch_size}: {step}")
  return np.arange(start, start + per_shard, dtype=np.uint64)


class _StepBatch:
  """grain map fn: step -> this shard's slice of every seed's global batch (picklable)."""

  def __init__(self, task: Task, batch_size: int, data_seeds: tuple[int, ...], shard_index: int,
               shard_count: int, stack_seeds: bool):
    self.task, self.batch_size, self.data_seeds = task, batch_size, data_seeds
    self.shard_index, self.shard_count, self.stack_seeds = shard_index, shard_count, stack_seeds

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = step_indices(step, self.batch_size, shard_index=self.shard_index,
                       shard_count=self.shard_count)
    batches = [self.task.train_examples(seed, idx) for seed in self.data_seeds]
    if not self.stack_seeds:
      return batches[0]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def train_dataset(task: Task, batch_size: int, *, data_seeds: Sequence[int] | None = None,
                  shard_index: int = 0, shard_count: int = 1, num_steps: int | None = None):
  """grain.MapDataset whose item `step` is this shard's part of the global batch of `step`.

  With `data_seeds` (one per model seed), items have a leading seed axis: [S, batch/K, T]; without
  it, [batch/K, T] from data seed 0. Global batch `step` of a seed's stream holds its examples
  [step * batch_size, (step + 1) * batch_size); shard k of K gets the k-th contiguous slice.
  Random access by step, so resuming at step s is `ds[s:]`: no iterator state to checkpoint.
  num_steps defaults to the largest count whose indices fit in int64; grain wraps indices past
  the length, so keep step < num_steps.
  """
  import grain  # local: the generators themselves need only numpy

  if not isinstance(task, Task):
    raise ValueError(f"task must be a sleep_lm Task, got {type(task).__name__}")
  batch_size, shard_index, shard_count = check_sharding(batch_size, shard_index, shard_count)
  seeds = (0,) if data_seeds is None else tuple(check_int("data_seed", s, 0) for s in data_seeds)
  if not seeds:
    raise ValueError("data_seeds must hold at least one seed")
  max_steps = 2**63 // batch_size
  num_steps = max_steps if num_steps is None else check_int("num_steps", num_steps, 1, max_steps)
  return grain.MapDataset.range(num_steps).map(
      _StepBatch(task, batch_size, seeds, shard_index, shard_count, data_seeds is not None))
