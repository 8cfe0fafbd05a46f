"""The op for one token (T = 1), the decode step: a few fused element-wise ops and reductions.

Per head, with S [K,V] float32, a = exp(g), b = beta, q and k prepared (`base.prepare_qk`):
  gated delta rule : u = b (v - a S^T k)      gated linear rule: u = b v
  S' = a S + k u^T,        o = S'^T q = a S^T q + (k . q) u
so S is read once for both products S^T k and S^T q (one reduction over K) and once more, with
the write, for the update: no scan, no matrix product. `reference` (the token-by-token scan) is
the oracle it is tested against.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.gated_delta_rule import base


def _implementation_fn(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm, chunk_size,
                       delta):
  del chunk_size
  if q.shape[1] != 1:
    raise NotImplementedError(f"one token only (T = 1), got T = {q.shape[1]}")
  f32 = jnp.float32
  q, k = base.prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  q, k, v = (x[:, 0].astype(f32) for x in (q, k, v))                      # [B,H,K or V]
  decay = jnp.exp(g[:, 0].astype(f32))[..., None]                          # [B,H,1]
  b = beta[:, 0].astype(f32)[..., None]
  state = initial_state.astype(f32)
  # S^T k and S^T q in one reduction over K: [B,H,2,V].
  sk, sq = jnp.unstack(jnp.sum(state[:, :, None] * jnp.stack([k, q], 2)[..., None], axis=3),
                       axis=2)
  u = b * (v - decay * sk) if delta else b * v
  o = decay * sq + jnp.sum(k * q, axis=-1, keepdims=True) * u
  state = decay[..., None] * state + k[..., :, None] * u[..., None, :]
  return o[:, None], state


IMPLEMENTATION = base.Implementation(
    "single_token", _implementation_fn,
    "one token (the decode step): S read once for S^T k and S^T q, once for the update")
