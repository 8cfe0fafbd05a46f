"""Sleep: the paper's Algorithm 1 as `jax.lax.scan`s over windows and replay passes.

    tokens [B,T] --embed--> h [B,T,D] --split--> windows [W,B,L,D]   (W = ceil(T/L), last padded)

    carry = (S_1..S_G fast-weight states, retained prefix K/V (sliding only))
    for each window c = 0..W-1:
        h, S <- window_pass(h, S)    N times if window c sleeps (no supervised token), else once
                                     (attention over the window's own recomputed K/V; each GDN
                                      layer rescans the window from the current S)
        emit h;  drop h and the KV cache;  keep S             # hard eviction
        (sliding: keep the final pass's last L-1 keys/values as the next window's prefix)
    logits = head(h of every window)                          # loss is masked to answers

Two ways to know which windows sleep, computing the same function (tested against each other):
- **static** (`schedule=` a tuple of W bools, known before tracing): tasks with a fixed layout
  (Rule 110, Depo) know it. Consecutive windows with the same pass count form one segment, a
  `lax.scan` over its windows of a `lax.scan` over exactly N (or 1) passes: no cond anywhere.
- **traced** (`schedule=None`): taken from the loss mask inside the program. Pass 1 (the wake pass)
  runs for every window and passes 2..N each run under a `lax.cond` on the window's flag. One cond
  per replay pass, not one between "1 pass" and "N passes": under autodiff a cond keeps the
  residuals of both branches, and the identity branch has none, so memory stays at N passes.

Looped block range (`ModelConfig.loop_layers` = (a, b); None: the whole stack): a window with
p passes (N or 1) runs layers [0, a) once, [a, b) p times (the replay passes above apply to the
range only), then [b, L) once on the range's final output; each segment is one `window_pass`
over a layer span, the GDN states chained through them. With the whole stack the prelude and
coda are empty and the program is the plain one.

Gradients reach an earlier window only through S (and, for the sliding variant, the retained
K/V). Each pass is wrapped in `jax.checkpoint` with the configured policy; `config.unroll`
unrolls the static scans (a straight-line program: no loop carries to copy, longer compiles).

Batch schedule: all examples of a batch share one window schedule. A window is a prediction
window if *any* example supervises a token in it; then every example gets one pass there (an
example that would have slept in that window does not). Tasks whose examples share a layout
(Rule 110, Depo) are unaffected; for mixed layouts, bucket batches by layout.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels.array_types import Arr, Bool, Float, Int, Shaped, typed
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import (
  HybridLM,
  loop_segments,
  pass_caches,
  split_caches,
  window_pass,
  zero_states,
)
from sleep_lm.model.layers import AttentionCache, Context
from sleep_lm.model.windows import retain, window_context

Array = jax.Array

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class SleepOutput(NamedTuple):
  logits: Float[Array, "b t vocab"]   # float32
  hidden: Float[Array, "b t d"]       # final-pass features of every window (float32 residual)
  states: tuple                       # GDN states after the last window, float32 [B,H,K,V] each
  sleeps: Bool[Array, " w"]           # True where the window was consolidated with N passes


def window_length(config: ModelConfig, seq_len: int) -> int:
  return seq_len if config.eviction == "none" else config.window


def sleep_schedule(loss_mask: Array, window: int) -> Array:
  """[B,T] loss mask -> [W] bool: True for consolidation windows (no supervised token)."""
  b, t = loss_mask.shape
  pad = (-t) % window
  supervised = jnp.pad(loss_mask.astype(bool), ((0, 0), (0, pad))).reshape(b, -1, window)
  return ~jnp.any(supervised, axis=(0, 2))


def static_schedule(config: ModelConfig, loss_mask) -> tuple[bool, ...]:
  """The window schedule of a concrete (NumPy) loss mask [B,T] or [T], as a static tuple."""
  mask = np.asarray(loss_mask)
  mask = mask[None] if mask.ndim == 1 else mask
  length = window_length(config, mask.shape[1])
  pad = (-mask.shape[1]) % length
  supervised = np.pad(mask.astype(bool), ((0, 0), (0, pad))).reshape(mask.shape[0], -1, length)
  return tuple(bool(x) for x in ~supervised.any(axis=(0, 2)))


def _remat(fn, policy: str):
  if policy in ("none", "blocks"):          # "blocks": each layer is checkpointed (HybridLM)
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


@typed
def sleep_forward(config: ModelConfig, params, tokens: Int[Arr, "b t"],
                  loss_mask: Shaped[Arr, "b t"], *,
                  initial_states: tuple | None = None,
                  schedule: Sequence[bool] | None = None) -> SleepOutput:
  """Runs Algorithm 1 over tokens [B,T]; windows sleep as `schedule` says (static tuple of W
  bools) or, if it is None, as the loss mask [B,T] says (traced)."""
  h = HybridLM(config).apply({"params": params}, tokens, method=HybridLM.embed)
  return sleep_forward_embedded(config, params, h, loss_mask, initial_states=initial_states,
                                schedule=schedule)


@typed
def sleep_forward_embedded(config: ModelConfig, params, h: Float[Arr, "b t d"],
                           loss_mask: Shaped[Arr, "b t"], *,
                           initial_states: tuple | None = None,
                           schedule: Sequence[bool] | None = None) -> SleepOutput:
  """`sleep_forward` from embedded inputs h [B,T,D] (lets tests differentiate w.r.t. them)."""
  model = HybridLM(config)
  b, t, d = h.shape
  length = window_length(config, t)
  n_windows = -(-t // length)
  if schedule is not None:
    schedule = tuple(bool(s) for s in schedule)
    if len(schedule) != n_windows:
      raise ValueError(f"schedule: needs one flag per window ({n_windows} windows of {length} "
                       f"tokens for T = {t}), got {len(schedule)}")
  pad = n_windows * length - t
  windows = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n_windows, length, d)
  windows = jnp.swapaxes(windows, 0, 1)                                  # [W,B,L,D]
  starts = jnp.arange(n_windows) * length
  states = zero_states(config, b) if initial_states is None else tuple(initial_states)
  sliding = config.eviction == "sliding"
  retained = length - 1 if sliding else 0

  prelude, looped, coda = loop_segments(config)     # the looped block range's spans

  def context(start):
    return window_context(start, length, retained=retained, sliding=sliding, total=t)

  def segment(ctx, prefix, span):
    """One pass of the layers of `span` over a window, wrapped in the remat policy:
    (h, states) -> (h, states, the span's attention layers' own keys/values)."""
    def one_pass(h, states):
      return window_pass(config, params, ctx, prefix if sliding else None, h, states, span=span)
    return _remat(one_pass, config.remat)

  def run_window(ctx, prefix, h, states, replay):
    """Prelude once, the range's wake pass, `replay(pass_fn, carry)` (its passes 2..N), coda
    once; (h, states, every attention layer's own keys/values from the pass that ran it last)."""
    kvs = ()
    if prelude is not None:
      h, states, kv = segment(ctx, prefix, prelude)(h, states)
      kvs += kv
    pass_fn = segment(ctx, prefix, looped)
    h, states, kv = replay(pass_fn, pass_fn(h, states))
    kvs += kv
    if coda is not None:
      h, states, kv = segment(ctx, prefix, coda)(h, states)
      kvs += kv
    return h, states, kvs

  def evict(prefix, kvs):
    return retain(prefix, kvs, retained) if sliding else prefix

  def traced_window(carry, xs):
    states, prefix = carry
    h, sleep, start = xs

    def replay(pass_fn, carry):
      if config.passes > 1:
        def one(carry, _):
          return jax.lax.cond(sleep, lambda c: pass_fn(c[0], c[1]), lambda c: c, carry), None
        carry, _ = jax.lax.scan(one, carry, None, length=config.passes - 1)
      return carry

    h, states, kvs = run_window(context(start), prefix, h, states, replay)
    return (states, evict(prefix, kvs)), h

  def static_window(passes, carry, xs):
    states, prefix = carry
    h, start = xs

    def replay(pass_fn, carry):
      if passes > 1:
        carry, _ = jax.lax.scan(lambda c, _: (pass_fn(c[0], c[1]), None), carry, None,
                                length=passes - 1, unroll=config.unroll)
      return carry

    h, states, kvs = run_window(context(start), prefix, h, states, replay)
    return (states, evict(prefix, kvs)), h

  prefix = ()
  if sliding:
    shape = (b, retained, config.num_kv_heads, config.attn_head_dim)
    prefix = tuple(AttentionCache(*(jnp.zeros(shape, config.activation_dtype),) * 2)
                   for _ in range(config.num_attn_layers))
  carry = (states, prefix)
  if schedule is None:
    sleeps = sleep_schedule(loss_mask, length)
    carry, hidden = jax.lax.scan(traced_window, carry, (windows, sleeps, starts))
  else:
    sleeps = jnp.asarray(schedule)
    segments, first = [], 0
    for sleeping, group in itertools.groupby(schedule):
      count = len(list(group))
      body = functools.partial(static_window, config.passes if sleeping else 1)
      xs = (windows[first:first + count], starts[first:first + count])
      carry, seg = jax.lax.scan(body, carry, xs, unroll=config.unroll)
      segments.append(seg)
      first += count
    hidden = jnp.concatenate(segments, axis=0) if len(segments) > 1 else segments[0]
  states = carry[0]
  hidden = jnp.swapaxes(hidden, 0, 1).reshape(b, n_windows * length, d)[:, :t]
  logits = model.apply({"params": params}, hidden, method=HybridLM.logits)
  return SleepOutput(logits, hidden, states, sleeps)


@typed
def parallel_forward(config: ModelConfig, params, tokens: Int[Arr, "b t"]) -> SleepOutput:
  """The plain hybrid (N = 1, hard eviction) as one pass over the whole sequence.

  Attention uses a block-diagonal causal mask (each window sees only itself), the conv restarts
  at window boundaries and each GDN layer scans the whole sequence in one call: no window loop.
  `sleep_forward` with N = 1 computes the same function window by window.
  """
  if config.eviction != "hard":
    raise ValueError(f"parallel_forward: needs eviction='hard', got {config.eviction!r}")
  model = HybridLM(config)
  b, t = tokens.shape
  pos = jnp.arange(t)
  window_id = pos // config.window
  mask = (window_id[None, :] == window_id[:, None]) & (pos[None, :] <= pos[:, None])
  ctx = Context(pos, pos % config.window, jnp.ones((t,), bool), mask[None, None])
  variables = {"params": params}
  h = model.apply(variables, tokens, method=HybridLM.embed)
  h, caches = model.apply(variables, h, pass_caches(config, zero_states(config, b)), ctx,
                          method=HybridLM.run_pass)
  states = tuple(c.state for c in split_caches(config, caches)[0])
  logits = model.apply(variables, h, method=HybridLM.logits)
  return SleepOutput(logits, h, states, jnp.zeros((-(-t // config.window),), bool))
