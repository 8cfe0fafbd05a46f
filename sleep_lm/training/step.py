"""Loss, metrics, optimizer and the jitted train step (no I/O: see `sleep_lm.training.trainer`).

Several independent models (seeds) train in one program: the train state and the batch carry a
leading seed axis [S, ...], and the step is `jax.vmap`ped over it (own init, own data, own
optimizer state; nothing is shared but the compiled program).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from sleep_lm.common import validation
from sleep_lm.common.validation import check_bool, check_int, expect, is_finite_number, is_int
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.sleep import sleep_forward
from sleep_lm.training import muon as muon_lib

Array = jax.Array
# Muon updates the hidden layers' projection matrices and nothing else (paper: "Muon for 2-D
# weight matrices", i.e. the projections; embeddings, head, norms, biases, the depthwise conv
# taps, A_log and dt_bias get AdamW). Path: (layer module, projection module, "kernel").
_MUON_PATH = re.compile(
    r"layer_\d+_(attn/(q|k|v|out)|gdn/(q|k|v|a|b|gate|out)_proj|mlp/(gate|up|down))/kernel")
# The GDN decay gates (g = -exp(A_log) softplus(a + dt_bias)) get AdamW at their own rate,
# `gate_lr` (default adamw_lr): they set how long the fast-weight memory keeps what it stored.
_GATE_PATH = re.compile(r"(.*/)?(A_log|dt_bias)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Muon on 2-D weight matrices, AdamW on the rest (the GDN gates at their own rate, gate_lr,
  None: adamw_lr); warmup-stable-decay schedule; clipping."""
  total_steps: int
  muon_lr: float = 2e-3
  adamw_lr: float = 5e-5
  gate_lr: float | None = None     # AdamW rate of A_log and dt_bias; None: adamw_lr
  warmup_steps: int = 100
  decay_fraction: float = 0.2      # the last 20% of steps decay linearly to zero
  weight_decay: float = 0.0        # decoupled, for both optimizers
  clip_norm: float = 1.0
  b1: float = 0.9                  # AdamW
  b2: float = 0.95                 # AdamW
  muon_momentum: float = 0.95
  muon_nesterov: bool = True
  # Layers whose parameters train (indices into ModelConfig.layers); every other parameter
  # (other layers, embedding, head, final norm) is frozen. None: all train. The retrofit's
  # stage 1 trains only the inserted layers (sleep_lm.model.retrofit).
  train_layers: tuple[int, ...] | None = None

  def __post_init__(self):
    total = check_int("OptimizerConfig.total_steps", self.total_steps, 1)
    warmup = check_int("OptimizerConfig.warmup_steps", self.warmup_steps)
    expect(0 <= warmup <= total, "OptimizerConfig.warmup_steps",
           f"must be in [0, total_steps={total}], got {warmup}")
    for field in ("muon_lr", "adamw_lr", "clip_norm"):
      value = getattr(self, field)
      expect(is_finite_number(value) and value > 0, f"OptimizerConfig.{field}",
             f"must be a finite number > 0, got {value!r}")
    expect(self.gate_lr is None or (is_finite_number(self.gate_lr) and self.gate_lr > 0),
           "OptimizerConfig.gate_lr",
           f"must be None (= adamw_lr) or a finite number > 0, got {self.gate_lr!r}")
    expect(is_finite_number(self.decay_fraction) and 0.0 <= self.decay_fraction <= 1.0,
           "OptimizerConfig.decay_fraction", f"must be in [0, 1], got {self.decay_fraction!r}")
    expect(is_finite_number(self.weight_decay) and self.weight_decay >= 0,
           "OptimizerConfig.weight_decay",
           f"must be a finite number >= 0, got {self.weight_decay!r}")
    for field in ("b1", "b2", "muon_momentum"):
      value = getattr(self, field)
      expect(is_finite_number(value) and 0 <= value < 1, f"OptimizerConfig.{field}",
             f"must be in [0, 1), got {value!r}")
    check_bool("OptimizerConfig.muon_nesterov", self.muon_nesterov)
    if isinstance(self.train_layers, list):
      object.__setattr__(self, "train_layers", tuple(self.train_layers))
    expect(self.train_layers is None or (
        isinstance(self.train_layers, tuple) and len(self.train_layers) >= 1
        and all(is_int(i) and i >= 0 for i in self.train_layers)), "OptimizerConfig.train_layers",
        f"must be None (every parameter trains) or a non-empty tuple of layer indices >= 0, got "
        f"{self.train_layers!r}")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any],
                   path: str = "OptimizerConfig") -> OptimizerConfig:
    """Builds a config from a dict or ConfigDict at config path `path` (e.g.
    "config.optimizer"), rejecting unknown keys by name; its errors name the field there."""
    return validation.from_mapping(cls, values, path, owner="OptimizerConfig")


def wsd_schedule(peak: float, cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to `peak`, constant, then linear decay to 0 over the last decay_fraction."""
  decay_steps = int(round(cfg.decay_fraction * cfg.total_steps))
  stable_steps = max(cfg.total_steps - cfg.warmup_steps - decay_steps, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0 if cfg.warmup_steps else peak, peak, max(cfg.warmup_steps, 1)),
       optax.constant_schedule(peak),
       optax.linear_schedule(peak, 0.0, max(decay_steps, 1))],
      boundaries=[cfg.warmup_steps, cfg.warmup_steps + stable_steps])


def param_path(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


_LAYER_PATH = re.compile(r"layer_(\d+)_.*")


def param_labels(params, train_layers: tuple[int, ...] | None = None) -> Any:
  """'muon' for the hidden layers' projection matrices, 'gates' for the GDN decay gates (A_log,
  dt_bias), 'adamw' for everything else; with `train_layers`, 'frozen' for every parameter
  outside those layers (the embedding, head and final norm included)."""
  def label(path, leaf):
    name = param_path(path)
    if train_layers is not None:
      layer = _LAYER_PATH.match(name)
      if layer is None or int(layer.group(1)) not in train_layers:
        return "frozen"
    muon = _MUON_PATH.fullmatch(name) is not None
    if muon and leaf.ndim != 2:
      raise ValueError(f"Muon parameter {name} must be 2-D, got shape {leaf.shape}")
    if muon:
      return "muon"
    return "gates" if _GATE_PATH.fullmatch(name) else "adamw"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimizerConfig, *,
                   batched_muon: bool = True) -> optax.GradientTransformation:
  """Clipping, then Muon / AdamW / the gates' AdamW by `param_labels`. With `train_layers`,
  the frozen parameters' gradients are zeroed first (so that they count neither in the clipping
  norm nor anywhere else) and their updates are zero (`optax.set_to_zero`: no optimizer state
  either, and no weight decay); the optimizer state's structure then differs from the default's.

  Muon is `sleep_lm.training.muon.muon`: `optax.contrib.muon` with one Newton-Schulz chain per group
  of same-shape matrices instead of one per matrix (same values, same state tree; a smaller program
  that compiles faster). `batched_muon=False`: `optax.contrib.muon` itself (the tests' oracle)."""
  muon_fn = muon_lib.muon if batched_muon else optax.contrib.muon
  muon = muon_fn(wsd_schedule(cfg.muon_lr, cfg), beta=cfg.muon_momentum,
                 nesterov=cfg.muon_nesterov, weight_decay=cfg.weight_decay)
  def adamw(lr):
    return optax.adamw(wsd_schedule(lr, cfg), b1=cfg.b1, b2=cfg.b2,
                       weight_decay=cfg.weight_decay)
  gates = adamw(cfg.adamw_lr if cfg.gate_lr is None else cfg.gate_lr)
  transforms = {"muon": muon, "adamw": adamw(cfg.adamw_lr), "gates": gates}
  if cfg.train_layers is None:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.multi_transform(transforms, param_labels))
  labels = lambda params: param_labels(params, cfg.train_layers)
  frozen = lambda params: jax.tree.map(lambda x: "frozen" if x == "frozen" else "train",
                                       labels(params))
  return optax.chain(
      optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.identity()}, frozen),
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.multi_transform(transforms | {"frozen": optax.set_to_zero()}, labels))


class TrainState(flax.struct.PyTreeNode):
  step: Array
  params: Any
  opt_state: Any


def create_train_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                       rng: Array) -> TrainState:
  from sleep_lm.model.hybrid import init_params  # local: keeps this module light for tools
  params = nn.meta.unbox(init_params(model_cfg, rng))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def masked_loss_and_metrics(logits: Array, targets: Array, loss_mask: Array):
  """Mean cross-entropy over supervised tokens, token accuracy and exact (all-correct) accuracy."""
  mask = loss_mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n_tokens = jnp.maximum(mask.sum(), 1.0)
  loss = (ce * mask).sum() / n_tokens
  hit = jnp.argmax(logits, -1) == targets
  token_acc = (hit * mask).sum() / n_tokens
  exact = jnp.all(hit | (mask == 0), axis=-1).astype(jnp.float32).mean()
  return loss, {"loss": loss, "token_accuracy": token_acc, "exact_accuracy": exact}


def loss_fn(params, model_cfg: ModelConfig, batch: Mapping[str, Array],
            schedule: tuple[bool, ...] | None = None):
  out = sleep_forward(model_cfg, params, batch["inputs"], batch["loss_mask"], schedule=schedule)
  return masked_loss_and_metrics(out.logits, batch["targets"], batch["loss_mask"])


def train_step(state: TrainState, batch, *, model_cfg: ModelConfig,
               optimizer: optax.GradientTransformation,
               schedule: tuple[bool, ...] | None = None,
               skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
  """One optimizer step of one model. With `skip_nonfinite`, a step whose loss or gradient norm
  is not finite leaves the state as it was (counted in metrics["skipped"])."""
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, model_cfg, batch, schedule)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = TrainState(state.step + 1, params, opt_state)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda a, b: jnp.where(finite, a, b)
    new = new.replace(params=jax.tree.map(keep, params, state.params),
                      opt_state=jax.tree.map(keep, opt_state, state.opt_state))
  metrics = dict(metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
  return new, metrics


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, *,
                    schedule: Sequence[bool] | None = None, skip_nonfinite: bool = False,
                    rules=None, **jit_kw):
  """Jitted (state, batch) -> (state, metrics) over a leading seed axis [S, ...] of both.

  `rules` (`sleep_lm.model.sharding`) are entered while tracing, so the activation constraints and
  the sharded fast-weight op follow them; call the step under `jax.set_mesh(mesh)`. `jit_kw` goes to
  `jax.jit` (the trainer pins in_shardings and out_shardings: the state keeps its layout from step
  to step, and its donated buffers are reused).
  """
  schedule = None if schedule is None else tuple(bool(x) for x in schedule)

  def step(state, batch):
    return train_step(state, batch, model_cfg=model_cfg, optimizer=optimizer,
                      schedule=schedule, skip_nonfinite=skip_nonfinite)

  def seeded(state, batch):
    with contextlib.nullcontext() if rules is None else nn.logical_axis_rules(rules):
      return jax.vmap(step)(state, batch)
  return jax.jit(seeded, donate_argnums=(0,), **jit_kw)


def create_train_states(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                        seeds: Sequence[int]) -> TrainState:
  """Train states of `seeds`, stacked on a leading seed axis (init key = the seed)."""
  keys = jnp.stack([jax.random.key(s) for s in seeds])
  return jax.vmap(lambda k: create_train_state(model_cfg, optimizer, k))(keys)
