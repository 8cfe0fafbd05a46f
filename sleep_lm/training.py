"""Loss, metrics, optimizer and the jitted train/eval steps (no I/O: see `sleep_lm.train`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from sleep_lm.config import ModelConfig
from sleep_lm.sleep import sleep_forward

Array = jax.Array
# Parameters that the paper trains with AdamW although they are 2-D.
_ADAMW_2D = ("embedding", "head")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Muon on 2-D weight matrices, AdamW on the rest; warmup-stable-decay schedule; clipping."""
  total_steps: int
  muon_lr: float = 2e-3
  adamw_lr: float = 5e-5
  warmup_steps: int = 100
  decay_fraction: float = 0.2      # the last 20% of steps decay linearly to zero
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95

  def __post_init__(self):
    def expect(cond, field, message):
      if not cond:
        raise ValueError(f"OptimizerConfig.{field}: {message}")
    expect(self.total_steps >= 1, "total_steps", f"must be >= 1, got {self.total_steps}")
    expect(0 <= self.warmup_steps <= self.total_steps, "warmup_steps",
           f"must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
    expect(0.0 <= self.decay_fraction <= 1.0, "decay_fraction",
           f"must be in [0, 1], got {self.decay_fraction}")
    expect(self.muon_lr > 0 and self.adamw_lr > 0, "muon_lr/adamw_lr", "must be > 0")
    expect(self.clip_norm > 0, "clip_norm", f"must be > 0, got {self.clip_norm}")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> OptimizerConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"OptimizerConfig: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**dict(values))


def wsd_schedule(peak: float, cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to `peak`, constant, then linear decay to 0 over the last decay_fraction."""
  decay_steps = int(round(cfg.decay_fraction * cfg.total_steps))
  stable_steps = max(cfg.total_steps - cfg.warmup_steps - decay_steps, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0 if cfg.warmup_steps else peak, peak, max(cfg.warmup_steps, 1)),
       optax.constant_schedule(peak),
       optax.linear_schedule(peak, 0.0, max(decay_steps, 1))],
      boundaries=[cfg.warmup_steps, cfg.warmup_steps + stable_steps])


def param_labels(params) -> Any:
  """'muon' for 2-D weight matrices (not embedding/head), 'adamw' for everything else."""
  def label(path, leaf):
    names = [getattr(p, "key", str(p)) for p in path]
    if leaf.ndim == 2 and not any(n in _ADAMW_2D for n in names):
      return "muon"
    return "adamw"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  muon = optax.contrib.muon(wsd_schedule(cfg.muon_lr, cfg), beta=cfg.b1,
                            weight_decay=cfg.weight_decay)
  adamw = optax.adamw(wsd_schedule(cfg.adamw_lr, cfg), b1=cfg.b1, b2=cfg.b2,
                      weight_decay=cfg.weight_decay)
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.multi_transform({"muon": muon, "adamw": adamw}, param_labels))


class TrainState(flax.struct.PyTreeNode):
  step: Array
  params: Any
  opt_state: Any


def create_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                       rng: Array) -> TrainState:
  from sleep_lm.model import init_params  # local: keeps this module light for tools
  params = nn.meta.unbox(init_params(model_cfg, rng))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def masked_loss_and_metrics(logits: Array, targets: Array, loss_mask: Array):
  """Mean cross-entropy over supervised tokens, token accuracy and exact (all-correct) accuracy."""
  mask = loss_mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n_tokens = jnp.maximum(mask.sum(), 1.0)
  loss = (ce * mask).sum() / n_tokens
  correct = (jnp.argmax(logits, -1) == targets) | (mask == 0)
  token_acc = ((jnp.argmax(logits, -1) == targets) * mask).sum() / n_tokens
  exact = jnp.all(correct, axis=-1).astype(jnp.float32).mean()
  return loss, {"loss": loss, "token_accuracy": token_acc, "exact_accuracy": exact}


def loss_fn(params, model_cfg: ModelConfig, batch: Mapping[str, Array]):
  out = sleep_forward(model_cfg, params, batch["inputs"], batch["loss_mask"])
  return masked_loss_and_metrics(out.logits, batch["targets"], batch["loss_mask"])


def train_step(state: TrainState, batch, *, model_cfg: ModelConfig,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One optimizer step; jit it with model_cfg and optimizer bound (see `make_train_step`)."""
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, model_cfg, batch)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return TrainState(state.step + 1, params, opt_state), metrics


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, **jit_kw):
  def step(state, batch):
    return train_step(state, batch, model_cfg=model_cfg, optimizer=optimizer)
  return jax.jit(step, donate_argnums=(0,), **jit_kw)


@functools.cache
def make_eval_step(model_cfg: ModelConfig):
  """Returns jitted (params, batch) -> (per-example exact-correct [B], per-answer correct [B,T])."""
  def step(params, batch):
    out = sleep_forward(model_cfg, params, batch["inputs"], batch["loss_mask"])
    mask = batch["loss_mask"].astype(bool)
    hit = jnp.argmax(out.logits, -1) == batch["targets"]
    return jnp.all(hit | ~mask, axis=-1), hit & mask
  return jax.jit(step)
