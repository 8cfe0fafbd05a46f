"""Token-by-token references for the gated delta rule and the gated linear rule.

These are the oracles of the package: a `lax.scan` over time with an fp32 state, written to be
obviously right rather than fast. Every other implementation is tested against them (and they in
turn against a float64 NumPy loop in the tests).

Per head, with state S in R^{K x V}:
  gated delta rule : S_t = a_t S_{t-1} + b_t k_t (v_t - (a_t S_{t-1})^T k_t)^T,   o_t = S_t^T q_t
  gated linear rule: S_t = a_t S_{t-1} + b_t k_t v_t^T,                           o_t = S_t^T q_t
with a_t = exp(g_t) and q already normalised and scaled (see `base.prepare_qk`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gated_delta_rule import base

_HIGHEST = jax.lax.Precision.HIGHEST


def _recurrent(q, k, v, g, beta, initial_state, *, delta: bool):
  """q,k [B,T,H,K], v [B,T,H,V], g,beta [B,T,H], state [B,H,K,V] fp32 -> (o fp32, state)."""
  f32 = jnp.float32
  # Time-major so that the scan walks over T.
  xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, g, beta))

  def step(state, x):
    q_t, k_t, v_t, g_t, b_t = x  # [B,H,K], [B,H,K], [B,H,V], [B,H], [B,H]
    state = state * jnp.exp(g_t)[..., None, None]
    if delta:
      predicted = jnp.einsum("bhkv,bhk->bhv", state, k_t, precision=_HIGHEST)
      v_t = v_t - predicted
    update = b_t[..., None] * v_t
    state = state + k_t[..., :, None] * update[..., None, :]
    o_t = jnp.einsum("bhkv,bhk->bhv", state, q_t, precision=_HIGHEST)
    return state, o_t

  final_state, o = jax.lax.scan(step, initial_state.astype(f32), xs)
  return jnp.moveaxis(o, 0, 1), final_state


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state):
  return _recurrent(q, k, v, g, beta, initial_state, delta=True)


def recurrent_gated_linear_rule(q, k, v, g, beta, initial_state):
  return _recurrent(q, k, v, g, beta, initial_state, delta=False)


def _implementation_fn(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm, chunk_size,
                       delta):
  del chunk_size  # token by token
  q, k = base.prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  fn = recurrent_gated_delta_rule if delta else recurrent_gated_linear_rule
  return fn(q, k, v, g, beta, initial_state)


IMPLEMENTATION = base.Implementation(
    "recurrent", _implementation_fn, "token-by-token lax.scan with an fp32 state (the oracle)")
