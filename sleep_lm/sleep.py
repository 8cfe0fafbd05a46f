"""Sleep: the paper's Algorithm 1 as two nested `jax.lax.scan`s.

    tokens [B,T] --embed--> h [B,T,D] --split--> windows [W,B,L,D]   (W = ceil(T/L), last padded)

    carry = (S_1..S_G fast-weight states, retained prefix K/V (sliding only))
    scan over windows c = 0..W-1:
        h, S <- run_pass(h, S)                               # pass 1 (wake), every window
        scan over passes 2..N:                               # only if window c sleeps (no
            h, S <- run_pass(h, S) if sleeps[c] else (h, S)  # supervised token in the batch)
                                                            # attention over the window's own
                                                            # recomputed K/V; each GDN rescans
        emit h;  drop h and the KV cache;  keep S             # hard eviction
        (sliding: keep the final pass's last L-1 keys/values as the next window's prefix)
    logits = head(h of every window)                          # loss is masked to answers

Gradients reach an earlier window only through S (and, for the sliding variant, the retained
K/V). Each pass is wrapped in `jax.checkpoint` with the configured policy.

Batch schedule: all examples of a batch share one window schedule. A window is a prediction
window if *any* example supervises a token in it; then every example gets one pass there (an
example that would have slept in that window does not). Tasks whose examples share a layout
(Rule 110, Depo) are unaffected; for mixed layouts, bucket batches by layout.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sleep_lm.config import ModelConfig
from sleep_lm.model import HybridLM, PassContext, zero_states

Array = jax.Array

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class SleepOutput(NamedTuple):
  logits: Array        # [B,T,vocab] float32
  hidden: Array        # [B,T,D] final-pass features of every window
  states: tuple        # GDN states after the last window, float32 [B,H,K,V] each
  sleeps: Array        # [W] bool, True where the window was consolidated with N passes


def window_length(config: ModelConfig, seq_len: int) -> int:
  return seq_len if config.eviction == "none" else config.window


def sleep_schedule(loss_mask: Array, window: int) -> Array:
  """[B,T] loss mask -> [W] bool: True for consolidation windows (no supervised token)."""
  b, t = loss_mask.shape
  pad = (-t) % window
  supervised = jnp.pad(loss_mask.astype(bool), ((0, 0), (0, pad))).reshape(b, -1, window)
  return ~jnp.any(supervised, axis=(0, 2))


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def sleep_forward(config: ModelConfig, params, tokens: Array, loss_mask: Array, *,
                  initial_states: tuple | None = None) -> SleepOutput:
  """Runs Algorithm 1 over tokens [B,T] with the window schedule taken from loss_mask [B,T]."""
  h = HybridLM(config).apply({"params": params}, tokens, method=HybridLM.embed)
  return sleep_forward_embedded(config, params, h, loss_mask, initial_states=initial_states)


def sleep_forward_embedded(config: ModelConfig, params, h: Array, loss_mask: Array, *,
                           initial_states: tuple | None = None) -> SleepOutput:
  """`sleep_forward` from embedded inputs h [B,T,D] (lets tests differentiate w.r.t. them)."""
  model = HybridLM(config)
  b, t, d = h.shape
  length = window_length(config, t)
  num_windows = -(-t // length)
  pad = num_windows * length - t
  windows = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, num_windows, length, d)
  windows = jnp.swapaxes(windows, 0, 1)                                  # [W,B,L,D]
  sleeps = sleep_schedule(loss_mask, length)
  starts = jnp.arange(num_windows) * length
  states = zero_states(config, b) if initial_states is None else tuple(initial_states)
  sliding = config.eviction == "sliding"
  retained = length - 1 if sliding else 0

  local = jnp.arange(length)
  own_causal = local[None, :] <= local[:, None]                           # [L,L]

  def context(start, prefix) -> PassContext:
    positions = start + local
    valid = positions < t
    if not sliding:
      return PassContext(positions, local, valid, own_causal[None, None])
    key_pos = jnp.concatenate([start - retained + jnp.arange(retained), positions])
    mask = ((key_pos[None, :] <= positions[:, None])
            & (key_pos[None, :] > positions[:, None] - length) & (key_pos[None, :] >= 0))
    return PassContext(positions, local, valid, mask[None, None], prefix)

  def one_pass(ctx, h, states):
    return model.apply({"params": params}, h, states, ctx, method=HybridLM.run_pass)

  def window_step(carry, xs):
    states, prefix = carry
    h, sleep, start = xs
    ctx = context(start, prefix)
    pass_fn = _remat(functools.partial(one_pass, ctx), config.remat)

    # Pass 1 (the wake pass) runs for every window; passes 2..N only where the window sleeps.
    # A cond per replay pass (not one cond between "1 pass" and "N passes") matters under
    # autodiff: a cond keeps the residuals of both branches, and the identity branch has none,
    # so memory stays at N passes per window instead of N + 1.
    carry = pass_fn(h, states)
    if config.passes > 1:
      def replay(carry, _):
        return jax.lax.cond(sleep, lambda c: pass_fn(c[0], c[1]), lambda c: c, carry), None
      carry, _ = jax.lax.scan(replay, carry, None, length=config.passes - 1)
    h, states, kvs = carry
    if sliding:
      # Keep the last L-1 keys/values of [prefix ; this window's final pass]. (Not x[:, -n:]:
      # with L = 1, n = 0 and that would keep everything.)
      last = lambda a, b: (x := jnp.concatenate([a, b], 1))[:, x.shape[1] - retained:]
      prefix = tuple((last(pk, k), last(pv, v))
                     for (pk, pv), (k, v) in zip(prefix, kvs, strict=True))
    return (states, prefix), h

  prefix = ()
  if sliding:
    shape = (b, retained, config.num_attn_heads, config.attn_head_dim)
    prefix = tuple((jnp.zeros(shape, h.dtype), jnp.zeros(shape, h.dtype))
                   for _ in range(config.num_attn_layers))
  (states, _), hidden = jax.lax.scan(window_step, (states, prefix), (windows, sleeps, starts))
  hidden = jnp.swapaxes(hidden, 0, 1).reshape(b, num_windows * length, d)[:, :t]
  logits = model.apply({"params": params}, hidden, method=HybridLM.logits)
  return SleepOutput(logits, hidden, states, sleeps)


def parallel_forward(config: ModelConfig, params, tokens: Array) -> SleepOutput:
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
  ctx = PassContext(pos, pos % config.window, jnp.ones((t,), bool), mask[None, None])
  variables = {"params": params}
  h = model.apply(variables, tokens, method=HybridLM.embed)
  h, states, _ = model.apply(variables, h, zero_states(config, b), ctx, method=HybridLM.run_pass)
  logits = model.apply(variables, h, method=HybridLM.logits)
  return SleepOutput(logits, h, states, jnp.zeros((-(-t // config.window),), bool))
