"""Pure-JAX chunked (WY) form of the gated delta rule and the gated linear rule.

Work inside a chunk of C tokens is done with matrix products for all chunks at once; only the
chain of C-token state updates is sequential (a `lax.scan` over T/C chunks). Per chunk, with
gamma the local cumulative log decay and D_rs = exp(gamma_r - gamma_s) for r >= s (masked
*before* exponentiating so it never overflows):

  A    = strict_lower(diag(beta) K K^T * D)
  U    = (I + A)^-1 diag(beta) V                    # delta rule only; linear rule: diag(beta) V
  W    = (I + A)^-1 diag(beta exp(gamma)) K
  Vnew = U - W S_in                                  # linear rule: Vnew = diag(beta) V
  O    = (Q exp(gamma)) S_in + (Q K^T * D) Vnew
  S    = exp(gamma_C) S_in + (K exp(gamma_C - gamma))^T Vnew

Gradients come from JAX's autodiff through the scan (it stores one state per chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.gated_delta_rule import base

_HIGHEST = jax.lax.Precision.HIGHEST


def _to_chunks(x, chunk_size: int):
  """[B,T,H,...] (T a multiple of chunk_size) -> [B,H,N,C,...]."""
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // chunk_size, chunk_size, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _from_chunks(x):
  """[B,H,N,C,V] -> [B,N*C,H,V]."""
  b, h, n, c = x.shape[:4]
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, *x.shape[4:])


def _chunked(q, k, v, g, beta, initial_state, *, chunk_size: int, delta: bool):
  f32 = jnp.float32
  t = q.shape[1]
  pad = (-t) % chunk_size
  if pad:
    # Padded tokens have g = 0 and beta = 0 (and zero q/k/v): they leave the state unchanged.
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    q, k, v, g, beta = (jnp.pad(x, widths(x)) for x in (q, k, v, g, beta))

  # Inputs keep their dtype for the big products (bf16 runs the matrix units); the decay math,
  # the triangular solve and the state are fp32.
  mm = lambda eq, a, b: jnp.einsum(eq, a, b, preferred_element_type=f32, precision=_HIGHEST)
  qc, kc, vc = (_to_chunks(x, chunk_size) for x in (q, k, v))            # [B,H,N,C,*]
  gc = _to_chunks(g.astype(f32), chunk_size)                             # [B,H,N,C]
  bc = _to_chunks(beta.astype(f32), chunk_size)
  gamma = jnp.cumsum(gc, axis=-1)                                        # [B,H,N,C]
  gamma_last = gamma[..., -1:]                                           # [B,H,N,1]

  idx = jnp.arange(chunk_size)
  causal = idx[:, None] >= idx[None, :]
  diff = gamma[..., :, None] - gamma[..., None, :]
  decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))                     # D, zero above diag

  qk = mm("...rk,...sk->...rs", qc, kc) * decay                          # [B,H,N,C,C]
  v_beta = vc.astype(f32) * bc[..., None]
  if delta:
    kk = mm("...rk,...sk->...rs", kc, kc)
    strict = idx[:, None] > idx[None, :]
    a = jnp.where(strict, kk * decay * bc[..., :, None], 0.0)
    eye = jnp.eye(chunk_size, dtype=f32)
    rhs = jnp.concatenate(
        [v_beta, kc.astype(f32) * (bc * jnp.exp(gamma))[..., None]], axis=-1)
    solved = jax.scipy.linalg.solve_triangular(
        eye + a, rhs, lower=True, unit_diagonal=True)
    u, w = solved[..., : vc.shape[-1]], solved[..., vc.shape[-1]:]
  else:
    u, w = v_beta, None
  q_decayed = qc.astype(f32) * jnp.exp(gamma)[..., None]
  k_to_end = kc.astype(f32) * jnp.exp(gamma_last - gamma)[..., None]

  def chunk_step(state, xs):
    u_n, w_n, qd_n, ke_n, gl_n = xs
    v_new = u_n - mm("...ck,...kv->...cv", w_n, state) if delta else u_n
    o_inter = mm("...ck,...kv->...cv", qd_n, state)
    state = state * jnp.exp(gl_n)[..., None] + mm("...ck,...cv->...kv", ke_n, v_new)
    return state, (v_new, o_inter)

  n_axis = 2  # scan over the chunk axis N
  move = lambda x: jnp.moveaxis(x, n_axis, 0)
  xs = (move(u), move(w) if delta else move(u), move(q_decayed), move(k_to_end),
        move(gamma_last))
  final_state, (v_new, o_inter) = jax.lax.scan(chunk_step, initial_state.astype(f32), xs)
  v_new, o_inter = (jnp.moveaxis(x, 0, n_axis) for x in (v_new, o_inter))
  o = o_inter + mm("...rs,...sv->...rv", qk, v_new)
  o = _from_chunks(o)[:, :t]
  return o, final_state


def chunked_gated_delta_rule(q, k, v, g, beta, initial_state, *, chunk_size: int = 64):
  return _chunked(q, k, v, g, beta, initial_state, chunk_size=chunk_size, delta=True)


def chunked_gated_linear_rule(q, k, v, g, beta, initial_state, *, chunk_size: int = 64):
  return _chunked(q, k, v, g, beta, initial_state, chunk_size=chunk_size, delta=False)


def _implementation_fn(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm, chunk_size,
                       delta):
  q, k = base.prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  fn = chunked_gated_delta_rule if delta else chunked_gated_linear_rule
  return fn(q, k, v, g, beta, initial_state, chunk_size=chunk_size)


IMPLEMENTATION = base.Implementation(
    "chunked", _implementation_fn, "pure-JAX chunked WY form; lax.scan over chunks")
