"""The typed view of an experiment config, built and validated once by the CLIs.

`RunConfig.from_config(config)` checks every field a run depends on and raises a ValueError that
names the field by its full config path (config.model.passes, config.task.t) and the allowed keys
or values (`sleep_lm.common.validation`); `trainer.setup` then checks what depends on the machine
(mesh sizes against the devices, batch sizes and weights against the mesh). Both run before a
workdir is claimed, so a bad launch leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from sleep_lm.common import validation
from sleep_lm.common.errors import UserError
from sleep_lm.model import sharding
from sleep_lm.model.config import ModelConfig
from sleep_lm.tasks import Task, make_task
from sleep_lm.training.step import OptimizerConfig

# Top-level fields of an experiment config (`experiments/*.py`).
_RUN_FIELDS = ("name", "seed", "seeds", "task", "model", "optimizer", "batch_size", "steps",
               "log_every", "eval_every", "eval_size", "eval_batch_size", "checkpoint_every",
               "keep_checkpoints", "data_dir", "mesh", "sharding_rules", "skip_nonfinite",
               "tensorboard")
# Optional top-level fields and their defaults: absent from the configs of the experiments
# that do not use them (and from older workdirs), so their config.json files stay unchanged.
_OPTIONAL_FIELDS = {"hard_warmup_steps": 0, "init_from": ""}


def _product_or_free(mesh: Mapping) -> int:
  """A device count that the mesh's own sizes accept, to check names and values before the
  machine is known (-1 then stands for 1 device)."""
  count = 1
  for value in mesh.values():
    if validation.is_int(value) and value >= 1:
      count *= value
  return count


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a training run needs, typed. `config` is the ConfigDict it came from."""
  task: Task
  model: ModelConfig
  optimizer: OptimizerConfig
  seed: int                 # the first model seed; models seed .. seed + seeds - 1
  seeds: int                # S models trained at once (vmapped), each with its own data order
  batch_size: int           # per model
  steps: int
  log_every: int
  eval_every: int
  eval_size: int
  eval_batch_size: int
  checkpoint_every: int
  keep_checkpoints: int
  data_dir: str
  mesh: dict               # {"data", "fsdp", "tensor"}: sizes, one may be -1 (sharding.make_mesh)
  sharding_rules: tuple     # (logical axis, mesh axes) pairs, checked (sharding.check_rules)
  skip_nonfinite: bool
  tensorboard: bool
  config: ml_collections.ConfigDict = dataclasses.field(repr=False, compare=False)
  # Sliding-window runs: train the first steps with eviction="hard" (same parameters, same
  # window), then with model.eviction; 0: no warm-up (`sleep_lm.training.trainer`).
  hard_warmup_steps: int = 0
  # A workdir (a converted checkpoint, or a finished stage of a run) whose newest checkpoint's
  # parameters start this run, with a fresh optimizer state; "": a fresh init
  # (`sleep_lm.training.init_from`).
  init_from: str = ""

  @property
  def model_seeds(self) -> tuple[int, ...]:
    return tuple(range(self.seed, self.seed + self.seeds))

  @property
  def tokens_per_step(self) -> int:
    """Training tokens of one step, summed over the seeds."""
    return self.seeds * self.batch_size * self.task.seq_len

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> RunConfig:
    validation.unknown_fields("config", config.keys(), (*_RUN_FIELDS, *_OPTIONAL_FIELDS))
    validation.missing_fields("config", config.keys(), _RUN_FIELDS)
    ints = {f: validation.check_int(f"config.{f}", config[f], 1) for f in (
        "seeds", "batch_size", "steps", "log_every", "eval_every", "eval_size",
        "eval_batch_size", "checkpoint_every", "keep_checkpoints")}
    seed = validation.check_int("config.seed", config.seed, 0)
    for field in ("skip_nonfinite", "tensorboard"):
      validation.check_bool(f"config.{field}", config[field])
    validation.check_str("config.data_dir", config.data_dir)
    mesh = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else config.mesh
    validation.expect(isinstance(mesh, Mapping), "config.mesh",
                      f"must be a dict of mesh axis sizes, got {config.mesh!r}")
    mesh = dict(mesh)
    sharding.mesh_shape(mesh, _product_or_free(mesh))      # names and values; sizes at setup
    rules = sharding.check_rules(config.sharding_rules)
    task = make_task(config.task.to_dict())
    model = ModelConfig.from_mapping(
        {**config.model.to_dict(), "vocab_size": task.vocab_size}, path="config.model")
    optimizer = OptimizerConfig.from_mapping(
        {**config.optimizer.to_dict(), "total_steps": config.steps}, path="config.optimizer")
    layers = optimizer.train_layers or ()
    if any(i >= len(model.layers) for i in layers):
      raise validation.FieldError(
          "config.optimizer.train_layers", f"layer indices must be < the model's "
          f"{len(model.layers)} layers, got {optimizer.train_layers}")
    warmup = validation.check_int(
        "config.hard_warmup_steps",
        config.get("hard_warmup_steps", _OPTIONAL_FIELDS["hard_warmup_steps"]), 0, ints["steps"])
    if warmup and model.eviction != "sliding":
      raise validation.FieldError(
          "config.hard_warmup_steps", f"{warmup} warms a sliding-window run up with hard "
          f"eviction: it needs config.model.eviction='sliding', got {model.eviction!r}")
    init_from = config.get("init_from", _OPTIONAL_FIELDS["init_from"])
    validation.check_str("config.init_from", init_from)
    return cls(task=task, model=model, optimizer=optimizer, seed=seed,
               data_dir=config.data_dir, mesh=mesh, sharding_rules=rules,
               skip_nonfinite=config.skip_nonfinite, tensorboard=config.tensorboard,
               config=config, hard_warmup_steps=warmup, init_from=init_from, **ints)

  @classmethod
  def checked(cls, config: ml_collections.ConfigDict) -> RunConfig:
    """`from_config` for the CLIs: a bad value is the user's to fix (a UserError)."""
    try:
      return cls.from_config(config)
    except ValueError as e:
      raise UserError(str(e)) from e
