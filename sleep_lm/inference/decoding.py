"""Decoding as pure functions of a batch of streams: state, wake, sleep, prefill, sampling, and
the on-device generation loop. No host state: `sleep_lm.inference.stream.Stream` drives these.

What a stream does (the paper's inference, "Sleep, precisely"):
  - wake: tokens arrive one by one (or a chunk at a time); each goes through one pass of the
    layer stack (`HybridLM.run_pass`, the loop training uses): every attention layer writes its
    key/value into a cache of fixed size and attends to it, every GDN layer takes one recurrent
    step on its state S. The logits of a token come from this wake pass (pass 1).
  - sleep: when the window of L tokens is full, N-1 more passes run over it (the wake pass counts
    as pass 1), each feeding its output features into the next and updating S, exactly as a
    consolidation window in training (`sleep_lm.model.hybrid.window_pass`). The wake pass's features
    are kept in a buffer [B,L,D] while the window fills.
  - a looped block range (`ModelConfig.loop_layers` = (a, b) smaller than the stack, N > 1): the
    wake pass still runs every layer once (the logits come from there), but the buffer keeps the
    range's output (layer b - 1's), and the state keeps the GDN states of the coda (layers
    [b, len(layers))) as they were at the window's start. The sleep replays the range N-1 times
    over the buffer, then restores those states and runs the coda once over the range's final
    output, as a window that sleeps in training does (`sleep_lm.model.sleep`); the prelude (layers
    [0, a)) ran once in the wake pass, as in training.
  - evict: hard eviction drops the window's keys/values (nothing to do: the attention mask is
    made from positions, so stale slots are never read); sliding eviction keeps the final pass's
    last L-1 keys/values. The GDN convolution restarts with the next window.
Prefill of whole windows runs them through `window_pass` (N passes each, the wake pass's features
giving the logits; with a partial range the wake pass's coda gives the logits and the sleep
re-runs it as above); the rest of a prompt goes through the wake pass as one chunk.

Cache layout per attention layer: keys and values [B, C, H, K] with C = L (hard), 2L-1 (sliding:
slots [0, L-1) the retained prefix of the previous window, slots [L-1, 2L-1) the window) or the
capacity (eviction "none": the full-cache attention baseline, which never sleeps). Slot j of a
window starting at position s holds key position s - retained + j; masks come from those
positions (`sleep_lm.model.windows.visible`). No shape depends on the position, so one compiled step
serves any context length. The B streams of a batch advance in lockstep (same position).

Parameters are in a decode layout (`sleep_lm.model.layers.Layout`, `prepare_params`): the functions
take the layout as a static argument.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kernels.array_types import Arr, Float, Int, typed
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import (
  HybridLM,
  attn_in_span,
  convert_params,
  gdn_in_span,
  join_caches,
  loop_segments,
  split_caches,
  window_pass,
  zero_states,
)
from sleep_lm.model.layers import AttentionCache, Context, GDNCache, Layout
from sleep_lm.model.windows import retain, visible, window_context

Array = jax.Array


class DecodeState(NamedTuple):
  """Everything a batch of streams carries from one token to the next (a pytree of arrays).

  position: [] int32, tokens consumed so far (the streams advance in lockstep).
  caches: per layer, in layer order: `GDNCache(S [B,H,K,V] float32, conv [B,kernel-1,3*H*K])`
    or `AttentionCache(keys, values [B,C,G,K])` (G key/value heads) in the compute dtype.
  hidden: [B,L,D] float32 wake-pass output features of the looped range (the final features
    with the whole stack) of the current window, replayed at sleep (N > 1), else None.
  coda: the GDN states S [B,H,K,V] float32 of the coda's GDN layers (layers [b, len(layers))
    of a partial loop range (a, b), in layer order) as they were at the current window's start:
    the sleep re-runs the coda from them (`sleeps_range`: a partial range with N > 1), else
    None. Their conv histories need no copy: every window's starts at zero, and sleep passes do
    not read it.
  """
  position: Int[Array, ""]
  caches: tuple
  hidden: Float[Array, "b l d"] | None
  coda: tuple | None = None


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """The fixed shape of a stream's cache.

  window: tokens a window holds before it sleeps and is evicted (L; the capacity for eviction
    "none", which never evicts).
  retained: keys/values kept across an eviction (L-1 for sliding, else 0), in slots [0, retained).
  sliding: queries see keys at positions (p - L, p], else only their own window's.
  evicts: the window sleeps and is evicted when full (not for eviction "none").
  """
  window: int
  retained: int
  sliding: bool
  evicts: bool

  @property
  def slots(self) -> int:
    return self.retained + self.window


def sleeps_range(config: ModelConfig) -> bool:
  """Whether a sleep replays only part of the stack (`ModelConfig.loop_layers`, N > 1): the
  state then keeps the coda's GDN states, and the wake pass the range's output features. With
  N = 1 nothing sleeps and the range changes nothing."""
  return config.partial_loop and config.passes > 1


def cache_layout(config: ModelConfig, capacity: int | None = None) -> CacheLayout:
  """The layout of `config`'s streams; eviction "none" needs the capacity (max tokens)."""
  if config.eviction == "none":
    if capacity is None or capacity < 1:
      raise ValueError(f"eviction='none' keeps every key: give the capacity (max tokens of a "
                       f"stream), got {capacity!r}")
    return CacheLayout(capacity, 0, False, False)
  sliding = config.eviction == "sliding"
  return CacheLayout(config.window, config.window - 1 if sliding else 0, sliding, True)


def init_state(config: ModelConfig, batch: int, capacity: int | None = None) -> DecodeState:
  """The state of `batch` fresh streams: position 0, S = 0, empty caches."""
  lay = cache_layout(config, capacity)
  dt = config.activation_dtype
  channels = 3 * config.num_gdn_heads * config.gdn_head_dim
  # A separate buffer per leaf: the state is donated, and one buffer cannot be donated twice.
  kv = lambda: jnp.zeros((batch, lay.slots, config.num_kv_heads, config.attn_head_dim), dt)
  gdn = tuple(GDNCache(s, jnp.zeros((batch, config.conv_kernel - 1, channels), dt))
              for s in zero_states(config, batch))
  attn = tuple(AttentionCache(kv(), kv()) for _ in range(config.num_attn_layers))
  hidden = (jnp.zeros((batch, lay.window, config.d_model), jnp.float32)
            if config.passes > 1 else None)
  return DecodeState(jnp.zeros((), jnp.int32), join_caches(config, gdn, attn), hidden,
                     _coda_states(config, zero_states(config, batch)))


def _coda_states(config: ModelConfig, states: tuple) -> tuple | None:
  """The coda's GDN states among `states` (all GDN layers') where the state keeps them."""
  if not sleeps_range(config):
    return None
  coda = loop_segments(config)[2]
  return tuple(states[j] for j in gdn_in_span(config, coda)) if coda is not None else ()


def state_bytes(state: DecodeState) -> int:
  """Bytes of a decode state: what a stream holds on the device between tokens."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


_convert = jax.jit(convert_params, static_argnums=(0, 2))


def prepare_params(config: ModelConfig, params, layout: Layout):
  """Training-layout parameters of one model in `layout`, on the device (once per stream)."""
  return _convert(config, params, layout)


# ------------------------------------------------------------------------ the wake pass


def step_context(config: ModelConfig, lay: CacheLayout, position: Array, batch: int, t: int, *,
                 empty: bool = False) -> Context:
  """The context of T new tokens at `position` against the fixed-size caches.

  empty: the window's buffer holds nothing before these tokens and nothing is retained (a
  window's first tokens under hard eviction, or the first tokens of a full-cache stream): they
  attend causally to their own keys. A single token whose visible keys are the buffer's first
  slots (hard eviction, or no eviction) gives cuDNN their number (`kv_lengths`) instead of a
  mask, so that it reads only those.
  """
  offset = position % lay.window
  start = position - offset
  positions = position + jnp.arange(t)
  segment_pos = offset + jnp.arange(t)
  slot = lay.retained + offset
  if empty:
    return Context(positions, segment_pos, slot=slot, causal=True)
  if config.attention_implementation == "cudnn" and t == 1 and not lay.sliding:
    return Context(positions, segment_pos, slot=slot,
                   kv_lengths=jnp.full((batch,), offset + 1, jnp.int32))
  key_pos = start - lay.retained + jnp.arange(lay.slots)
  mask = visible(positions, key_pos, start, window=lay.window, sliding=lay.sliding)
  return Context(positions, segment_pos, mask=mask, slot=slot)


@typed
def wake(config: ModelConfig, lay: CacheLayout, layout: Layout, params, state: DecodeState,
         tokens: Int[Arr, "b t"], *, last_only: bool = False, empty: bool = False
         ) -> tuple[DecodeState, Float[Array, "b _ vocab"]]:
  """The wake pass over tokens [B,T] that fit in the current window: (new state, logits
  [B,T,V], or [B,1,V] of the last token if last_only). T = 1 is the decode step."""
  model, variables = HybridLM(config, layout), {"params": params}
  b, t = tokens.shape
  if empty and lay.retained:
    raise ValueError("empty=True: a sliding window always sees the retained keys")
  ctx = step_context(config, lay, state.position, b, t, empty=empty)
  h = model.apply(variables, tokens, method=HybridLM.embed)
  coda = loop_segments(config)[2] if sleeps_range(config) else None
  if coda is None:
    h, caches = model.apply(variables, h, state.caches, ctx, method=HybridLM.run_pass)
    kept = h
  else:     # the sleep replays the range from its output (layer b - 1's), not the final one
    kept, caches = model.apply(variables, h, state.caches, ctx, method=HybridLM.run_pass,
                               span=(0, coda[0]))
    h, caches = model.apply(variables, kept, caches, ctx, method=HybridLM.run_pass, span=coda)
  hidden = state.hidden
  if hidden is not None:
    offset = state.position % lay.window
    hidden = jax.lax.dynamic_update_slice(hidden, kept.astype(hidden.dtype), (0, offset, 0))
  logits = model.apply(variables, h[:, -1:] if last_only else h, method=HybridLM.logits)
  return DecodeState(state.position + t, caches, hidden, state.coda), logits


# --------------------------------------------------------------------- sleep and prefill


def _replay(config: ModelConfig, layout: Layout, params, ctx: Context, prefix, carry,
            span: tuple[int, int] | None = None):
  """Passes 2..N of the layers of `span` (None: all) over a window: carry (h, states, the
  span's attention layers' own keys/values) of the pass before."""

  def one(carry, _):
    return window_pass(config, params, ctx, prefix, carry[0], carry[1], layout, span), None

  carry, _ = jax.lax.scan(one, carry, None, length=config.passes - 1)
  return carry


def _consolidate(config: ModelConfig, layout: Layout, params, ctx: Context, prefix, h, states,
                 own: tuple, coda_start: tuple | None) -> tuple[tuple, tuple]:
  """The sleep of a window whose wake pass is done: passes 2..N of the looped range over h (the
  range's output in the wake pass), from the GDN states and every attention layer's own
  keys/values that the wake pass left; then, with a partial range, the coda once over the
  range's final output, from its GDN states at the window's start (`coda_start`), as
  `sleep_forward` runs a window that sleeps. Returns (the GDN states, every attention layer's
  own keys/values from the pass that ran it last: prelude from the wake pass, range from its
  last pass, coda from the run here)."""
  _, looped, coda = loop_segments(config)
  in_range = attn_in_span(config, config.loop_span)
  carry = (h, states, tuple(own[j] for j in in_range))
  h, states, kv = _replay(config, layout, params, ctx, prefix, carry, looped)
  if looped is None:                 # the whole stack: nothing else ran (today's program)
    return states, kv
  own = list(own)
  for j, x in zip(in_range, kv, strict=True):
    own[j] = x
  if coda is not None:
    states = list(states)
    for j, s in zip(gdn_in_span(config, coda), coda_start, strict=True):
      states[j] = s
    h, states, kv = window_pass(config, params, ctx, prefix, h, tuple(states), layout, coda)
    for j, x in zip(attn_in_span(config, coda), kv, strict=True):
      own[j] = x
  return states, tuple(own)


def _prefix(lay: CacheLayout, attn: tuple) -> tuple | None:
  """The retained slots [0, retained) of each attention buffer (sliding), else None."""
  if not lay.sliding:
    return None
  return tuple(AttentionCache(c.keys[:, :lay.retained], c.values[:, :lay.retained])
               for c in attn)


def _evicted(config: ModelConfig, lay: CacheLayout, state: DecodeState, states: tuple,
             attn: tuple, kept: tuple | None, position: Array) -> DecodeState:
  """The state after eviction: the new S, the retained keys (sliding) written to slots
  [0, retained), the conv histories cleared (the conv restarts with the next window)."""
  gdn, _ = split_caches(config, state.caches)
  gdn = tuple(GDNCache(s, jnp.zeros_like(c.conv)) for s, c in zip(states, gdn, strict=True))
  if kept is not None:
    attn = tuple(AttentionCache(c.keys.at[:, :lay.retained].set(k.keys),
                                c.values.at[:, :lay.retained].set(k.values))
                 for c, k in zip(attn, kept, strict=True))
  return DecodeState(position, join_caches(config, gdn, attn), state.hidden,
                     _coda_states(config, states))     # the next window's start


def sleep(config: ModelConfig, lay: CacheLayout, layout: Layout, params,
          state: DecodeState) -> DecodeState:
  """The window just filled: N-1 replay passes over its wake features (a partial range: then
  the coda once, `_consolidate`), then eviction."""
  gdn, attn = split_caches(config, state.caches)
  states = tuple(c.state for c in gdn)
  prefix = _prefix(lay, attn)
  own = tuple(AttentionCache(c.keys[:, lay.retained:], c.values[:, lay.retained:])
              for c in attn)
  if config.passes > 1:
    start = state.position - lay.window
    ctx = window_context(start, lay.window, retained=lay.retained, sliding=lay.sliding)
    states, own = _consolidate(config, layout, params, ctx, prefix, state.hidden, states, own,
                               state.coda)
  kept = retain(prefix, own, lay.retained) if lay.sliding else None
  return _evicted(config, lay, state, states, attn, kept, state.position)


@typed
def prefill(config: ModelConfig, lay: CacheLayout, layout: Layout, params, state: DecodeState,
            tokens: Int[Arr, "b t"], *, last_only: bool = False
            ) -> tuple[DecodeState, Float[Array, "b _ vocab"]]:
  """Whole windows [B, n*L] from a window boundary, as in training: the wake pass (its features
  give the logits), N-1 replays (a partial range: then the coda once, `_consolidate`), eviction,
  per window. Returns (state, logits)."""
  model, variables = HybridLM(config, layout), {"params": params}
  b, t = tokens.shape
  n = t // lay.window
  h = model.apply(variables, tokens, method=HybridLM.embed)
  windows = jnp.swapaxes(h.reshape(b, n, lay.window, -1), 0, 1)          # [n,B,L,D]
  starts = state.position + jnp.arange(n) * lay.window
  gdn, attn = split_caches(config, state.caches)
  coda = loop_segments(config)[2] if sleeps_range(config) else None

  def window(carry, xs):
    states, prefix = carry
    h, start = xs
    ctx = window_context(start, lay.window, retained=lay.retained, sliding=lay.sliding)
    if coda is None:
      h, new, own = window_pass(config, params, ctx, prefix, h, states, layout)
      wake_h = h
    else:    # the wake pass in two parts: the sleep replays the range from its output
      h, new, own = window_pass(config, params, ctx, prefix, h, states, layout, (0, coda[0]))
      wake_h, _, coda_own = window_pass(config, params, ctx, prefix, h, new, layout, coda)
      own += coda_own                  # (replaced by the coda's run in the sleep)
    if config.passes > 1:    # `new` still holds the coda's window-start states: nothing ran it
      new, own = _consolidate(config, layout, params, ctx, prefix, h, new, own,
                              _coda_states(config, new))
    prefix = retain(prefix, own, lay.retained) if lay.sliding else prefix
    return (new, prefix), wake_h[:, -1:] if last_only else wake_h

  carry = (tuple(c.state for c in gdn), _prefix(lay, attn))
  (states, prefix), wake_h = jax.lax.scan(window, carry, (windows, starts))
  new = _evicted(config, lay, state, states, attn, prefix, state.position + t)
  h = wake_h[-1] if last_only else jnp.swapaxes(wake_h, 0, 1).reshape(b, t, -1)
  return new, model.apply(variables, h, method=HybridLM.logits)


# ------------------------------------------------------------------- sampling and the loop


@functools.partial(jax.jit, static_argnames=("temperature", "top_k"))
@typed
def sample(logits: Float[Arr, "b vocab"], key: Array, *, temperature: float = 0.0,
           top_k: int = 0) -> Int[Array, " b"]:
  """[B,V] logits -> [B] int32 tokens: greedy (temperature 0), else softmax(logits/temperature)
  sampling, over the top_k logits only when top_k > 0 (ties with the k-th are kept)."""
  if temperature <= 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@typed
def generate(config: ModelConfig, lay: CacheLayout, layout: Layout, params, state: DecodeState,
             logits: Float[Arr, "b vocab"], key: Array, index: Array | int, count, *,
             steps: int, temperature: float = 0.0, top_k: int = 0
             ) -> tuple[DecodeState, Int[Array, "b steps"], Float[Array, "b vocab"]]:
  """`count` (<= steps) tokens per stream, sampled and fed back on the device: token i is drawn
  from the logits before it with `fold_in(key, index + i)`, then its wake step runs.

  logits [B,V]: the last token's. The tokens must fit in the current window (the caller sleeps
  at its end). A traced count compiles one loop for any count (its trip count is read on the
  host each iteration); a Python int compiles a loop of that trip count. Returns (state, tokens
  [B, steps] of which the first `count` columns are written, the last token's logits [B,V]).
  """

  def body(i, carry):
    state, logits, tokens = carry
    token = sample(logits, jax.random.fold_in(key, index + i), temperature=temperature,
                   top_k=top_k)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    state, logits = wake(config, lay, layout, params, state, token[:, None], last_only=True)
    return state, logits[:, 0], tokens

  tokens = jnp.zeros((logits.shape[0], steps), jnp.int32)
  state, logits, tokens = jax.lax.fori_loop(0, count, body, (state, logits, tokens))
  return state, tokens, logits


class Functions(NamedTuple):
  """The jitted pieces of a stream; the state argument is donated (caches update in place).

  wake(params, state, tokens [B,T], last_only=, empty=) -> (state, logits).
  sleep(params, state) -> state, when the window has just filled.
  prefill(params, state, tokens [B,n*L], last_only=) -> (state, logits), whole windows.
  generate(params, state, logits, key, index, count, steps=, temperature=, top_k=)
    -> (state, tokens, logits): one compiled loop for any count.
  generate_fixed: the same with `count` static (a loop of known trip count per count).
  """
  wake: Any
  sleep: Any
  prefill: Any
  generate: Any
  generate_fixed: Any


@functools.cache
def functions(config: ModelConfig, lay: CacheLayout, layout: Layout) -> Functions:
  """The jitted functions of `config`'s streams with cache layout `lay`, parameters in
  `layout` (cached: streams of one model share their compilations)."""
  bind = lambda fn: functools.partial(fn, config, lay, layout)
  loop = ("steps", "temperature", "top_k")
  return Functions(
      jax.jit(bind(wake), donate_argnums=1, static_argnames=("last_only", "empty")),
      jax.jit(bind(sleep), donate_argnums=1),
      jax.jit(bind(prefill), donate_argnums=1, static_argnames="last_only"),
      jax.jit(bind(generate), donate_argnums=1, static_argnames=loop),
      jax.jit(bind(generate), donate_argnums=1, static_argnames=loop + ("count",)))
