"""Where the tokens of a window sit: attention visibility, the context of a pass over a window,
and what sliding eviction keeps. Training (`sleep_lm.model.sleep`) and decoding
(`sleep_lm.inference.decoding`) build their masks and retain keys here, so both see the same keys.

Visibility, by absolute positions (keys at negative positions are empty slots):
  hard eviction (and "none", one window from 0): a query at p sees keys at [window start, p];
  sliding: a query at p sees keys at (p - L, p] (the retained L-1 keys of the previous window's
    final pass, then its own window's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sleep_lm.model.layers import AttentionCache, Context

Array = jax.Array


def visible(query_pos: Array, key_pos: Array, start: Array, *, window: int,
            sliding: bool) -> Array:
  """[1,1,T,S] bool: which keys (at `key_pos` [S]) the queries at `query_pos` [T] see, in a
  window starting at `start` of `window` tokens."""
  q, k = query_pos[:, None], key_pos[None, :]
  seen = (k <= q) & (k >= 0)
  seen &= (k > q - window) if sliding else (k >= start)
  return seen[None, None]


def window_context(start: Array, length: int, *, retained: int = 0, sliding: bool = False,
                   total: int | None = None) -> Context:
  """The context of a pass over the window of `length` tokens from `start`: keys are
  [`retained` prefix keys (sliding) ; the window's own]. Tokens at or past `total` (the end of
  the sequence, when the last window is padded) are marked invalid. With nothing retained (hard
  eviction, "none", a first sliding window) the context is `causal` rather than masked."""
  local = jnp.arange(length)
  positions = start + local
  valid = positions < total if total is not None else jnp.ones((length,), bool)
  if retained == 0:
    # Only the window's own keys: `visible` is then exactly causal, and saying so lets cuDNN
    # skip the masked blocks instead of reading a [T, T] mask as a bias (2 GiB at 32K tokens).
    return Context(positions, local, valid, causal=True)
  key_pos = jnp.concatenate([start - retained + jnp.arange(retained), positions])
  mask = visible(positions, key_pos, start, window=length, sliding=sliding)
  return Context(positions, local, valid, mask)


def retain(prefix: tuple[AttentionCache, ...], own: tuple[AttentionCache, ...],
           keep: int) -> tuple[AttentionCache, ...]:
  """Sliding eviction: per attention layer, the last `keep` keys/values of [prefix ; own].
  (Not x[:, -keep:]: with keep = 0 that would keep everything.)"""
  last = lambda a, b: (x := jnp.concatenate([a, b.astype(a.dtype)], 1))[:, x.shape[1] - keep:]
  return tuple(AttentionCache(last(p.keys, o.keys), last(p.values, o.values))
               for p, o in zip(prefix, own, strict=True))
