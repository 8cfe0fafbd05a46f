"""Chunk math and JAX glue shared by the Pallas kernels of the gated delta rule.

The per-chunk math is written once, on values (not refs), so that the Triton and the Mosaic TPU
kernels only differ in how they load and store. Vectors over the C tokens of a chunk are kept 2-D:
`*_col` is [C,1] and `*_row` is [1,C] (Mosaic TPU wants 2-D values; Triton takes either).

Per chunk, with gamma the chunk-local cumulative log decay (g_last its last entry), q already
normalised and scaled, D_rs = exp(gamma_r - gamma_s) for r >= s (masked before exponentiating):

  A     = strict_lower(diag(beta) K K^T * D)            T = (I + A)^-1 (product form, matmuls)
  W     = T diag(beta exp(gamma)) K                     U = T diag(beta) V        (kernel 1)
  Vnew  = U - W S
  O     = (Q exp(gamma)) S + (Q K^T * D) Vnew
  S'    = exp(g_last) S + (K exp(g_last - gamma))^T Vnew                          (kernel 2)

Backward: kernel 3 walks the chunks in reverse carrying dS (seeded by dS_final):
  dVnew = (Q K^T * D)^T dO + (K exp(g_last - gamma)) dS'
  dS    = exp(g_last) dS' + (Q exp(gamma))^T dO - W^T dVnew
and stores dS' per chunk and dVnew; kernel 4 (parallel over chunks) turns S, dS', dVnew into
dq, dk, dv, dgamma, dbeta, including the backward of kernel 1 through T:
  dT = dW X^T + dU Y^T,  dA = -T^T dT T^T  (X = diag(beta exp(gamma)) K, Y = diag(beta) V).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static choices of one call. `compute_dtype` is the dtype of the matmul operands."""
  chunk_size: int
  block_v: int
  compute_dtype: str  # "bfloat16" / "float16" / "float32"
  fp32_precision: object  # precision of float32 matmuls (tf32x3 on GPU, HIGHEST interpreted)
  interpret: object  # False, True or pltpu.InterpretParams()
  save_states: bool = True


# ------------------------------------------------------------------------------------------------
# Chunk math on values.


def mm(a, b, cfg: KernelConfig, *, trans_a=False, trans_b=False, fp32=False):
  """a @ b (optionally transposed) with float32 accumulation.

  Operands go to cfg.compute_dtype (bf16 runs the tensor cores at full rate), unless `fp32`, which
  keeps them in float32 at cfg.fp32_precision (the triangular inverse and its gradient need it).
  """
  dtype = f32 if fp32 else jnp.dtype(cfg.compute_dtype)
  a, b = a.astype(dtype), b.astype(dtype)
  precision = cfg.fp32_precision if dtype == f32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def masks(c: int):
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return rows >= cols, rows > cols


def last_of(col):
  """[C,1] -> [1,1]: the last entry, without dynamic indexing (Triton has none on values)."""
  c = col.shape[0]
  is_last = jax.lax.broadcasted_iota(jnp.int32, col.shape, 0) == c - 1
  return jnp.sum(jnp.where(is_last, col, 0.0), axis=0, keepdims=True)


def decay_matrix(g_col, g_row, mask):
  """exp(gamma_r - gamma_s) where mask, else 0; masked before exp so it never overflows."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, g_col - g_row, 0.0)), 0.0)


def unit_lower_inverse(a, cfg: KernelConfig):
  """(I + A)^-1 for strictly lower A: prod_i (I + N^(2^i)) with N = -A, all matmuls."""
  c = a.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  eye = jnp.where(rows == cols, 1.0, 0.0).astype(f32)
  power = -a
  inverse = eye + power
  steps = c.bit_length() - 2  # N^c = 0: factors for 2^1 .. 2^(log2 c - 1)
  for _ in range(steps):
    power = mm(power, power, cfg, fp32=True)
    inverse = inverse + mm(inverse, power, cfg, fp32=True)
  return inverse


def intra_chunk_fwd(q, k, v, g_col, g_row, b_col, cfg: KernelConfig):
  """Kernel 1's math: returns W [C,K], U [C,V], T [C,C], Q K^T * D [C,C] (all float32)."""
  c = k.shape[0]
  _, strict = masks(c)
  kk = mm(k, k, cfg, trans_b=True)
  a = kk * decay_matrix(g_col, g_row, strict) * b_col
  t_inv = unit_lower_inverse(a, cfg)
  x = k.astype(f32) * (b_col * jnp.exp(g_col))
  y = v.astype(f32) * b_col
  return (mm(t_inv, x, cfg, fp32=True), mm(t_inv, y, cfg, fp32=True), t_inv,
          qk_decayed(q, k, g_col, g_row, cfg))


def qk_decayed(q, k, g_col, g_row, cfg: KernelConfig):
  causal, _ = masks(q.shape[0])
  return mm(q, k, cfg, trans_b=True) * decay_matrix(g_col, g_row, causal)


def state_fwd_step(state, q, k, w, u, scores, g_col, cfg: KernelConfig):
  """One chunk of kernel 2 on a V-tile: returns (o [C,BV], new state [K,BV]).

  `scores` = Q K^T * D comes from kernel 1, so it is not recomputed per V-tile.
  """
  g_last = last_of(g_col)
  v_new = u.astype(f32) - mm(w, state, cfg)
  q_gated = q.astype(f32) * jnp.exp(g_col)
  o = mm(q_gated, state, cfg) + mm(scores, v_new, cfg)
  k_to_end = k.astype(f32) * jnp.exp(g_last - g_col)
  state = state * jnp.exp(g_last) + mm(k_to_end, v_new, cfg, trans_a=True)
  return o, state


def state_bwd_step(d_state, q, k, w, do, scores, g_col, cfg: KernelConfig):
  """One chunk of kernel 3 on a V-tile, in reverse: returns (dVnew [C,BV], dS entering [K,BV])."""
  g_last = last_of(g_col)
  k_to_end = k.astype(f32) * jnp.exp(g_last - g_col)
  dv_new = (mm(scores, do, cfg, trans_a=True)
            + mm(k_to_end, d_state, cfg))
  q_gated = q.astype(f32) * jnp.exp(g_col)
  d_state = (d_state * jnp.exp(g_last) + mm(q_gated, do, cfg, trans_a=True)
             - mm(w, dv_new, cfg, trans_a=True))
  return dv_new, d_state


@dataclasses.dataclass
class ChunkBwdAcc:
  """Sums over V-tiles inside kernel 4."""
  dq_state: jax.Array  # dO S^T            [C,K]
  d_scores: jax.Array  # dO Vnew^T         [C,C]
  dk_to_end: jax.Array  # Vnew dS'^T       [C,K]
  dw: jax.Array  # -dVnew S^T              [C,K]
  dt: jax.Array  # dU Y^T                  [C,C]  (dW X^T added at the end)
  dbeta_col: jax.Array  # sum_v dY * v     [C,1]
  d_state_decay: jax.Array  # sum(dS' * S) [1,1]


jax.tree_util.register_dataclass(
    ChunkBwdAcc, data_fields=[f.name for f in dataclasses.fields(ChunkBwdAcc)], meta_fields=[])


def chunk_bwd_init(c: int, dk: int) -> ChunkBwdAcc:
  z = lambda *s: jnp.zeros(s, f32)
  return ChunkBwdAcc(z(c, dk), z(c, c), z(c, dk), z(c, dk), z(c, c), z(c, 1), z(1, 1))


def chunk_bwd_vtile(acc: ChunkBwdAcc, w, t_inv, b_col, u, v, do, dv_new, state, d_state,
                    cfg: KernelConfig):
  """Kernel 4, one V-tile: accumulates into `acc`; returns (acc, dv tile [C,BV])."""
  dv_new = dv_new.astype(f32)
  v_new = u.astype(f32) - mm(w, state, cfg)
  y = v.astype(f32) * b_col
  d_y = mm(t_inv, dv_new, cfg, trans_a=True, fp32=True)
  acc = ChunkBwdAcc(
      dq_state=acc.dq_state + mm(do, state, cfg, trans_b=True),
      d_scores=acc.d_scores + mm(do, v_new, cfg, trans_b=True),
      dk_to_end=acc.dk_to_end + mm(v_new, d_state, cfg, trans_b=True),
      dw=acc.dw - mm(dv_new, state, cfg, trans_b=True),
      dt=acc.dt + mm(dv_new, y, cfg, trans_b=True, fp32=True),
      dbeta_col=acc.dbeta_col + jnp.sum(d_y * v.astype(f32), axis=1, keepdims=True),
      d_state_decay=acc.d_state_decay + jnp.sum(
          jnp.sum(d_state * state, axis=1, keepdims=True), axis=0, keepdims=True),
  )
  return acc, d_y * b_col


def chunk_bwd_finish(acc: ChunkBwdAcc, q, k, t_inv, g_col, g_row, b_col, cfg: KernelConfig):
  """Kernel 4 after the V-tiles: returns dq, dk [C,K]; dgamma as ([C,1], [1,C]); dbeta [C,1]."""
  c = q.shape[0]
  causal, strict = masks(c)
  qf, kf = q.astype(f32), k.astype(f32)
  g_last = last_of(g_col)
  is_last = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  # Kernel 2's part.
  exp_g = jnp.exp(g_col)
  decay = decay_matrix(g_col, g_row, causal)
  d_qk = acc.d_scores * decay
  dq = acc.dq_state * exp_g + mm(d_qk, k, cfg)
  to_end = jnp.exp(g_last - g_col)
  dk = mm(d_qk, q, cfg, trans_a=True) + acc.dk_to_end * to_end
  e_scores = d_qk * mm(q, k, cfg, trans_b=True)  # d(score) * score, masked
  dk_end_term = jnp.sum(acc.dk_to_end * kf * to_end, axis=1, keepdims=True)  # [C,1]
  dg_col = (jnp.sum(acc.dq_state * qf * exp_g, axis=1, keepdims=True)
            + jnp.sum(e_scores, axis=1, keepdims=True) - dk_end_term)
  dg_last = jnp.sum(dk_end_term, axis=0, keepdims=True) + acc.d_state_decay * jnp.exp(g_last)
  dg_row = -jnp.sum(e_scores, axis=0, keepdims=True)
  # Kernel 1's part: W = T X, U = T Y, T = (I + A)^-1.
  x_scale = b_col * exp_g
  x = kf * x_scale
  d_t = acc.dt + mm(acc.dw, x, cfg, trans_b=True, fp32=True)
  d_x = mm(t_inv, acc.dw, cfg, trans_a=True, fp32=True)
  dk = dk + d_x * x_scale
  dbeta = acc.dbeta_col + jnp.sum(d_x * kf * exp_g, axis=1, keepdims=True)
  dg_col = dg_col + jnp.sum(d_x * x, axis=1, keepdims=True)
  d_a = -mm(mm(t_inv, d_t, cfg, trans_a=True, fp32=True), t_inv, cfg, trans_b=True, fp32=True)
  d_a = jnp.where(strict, d_a, 0.0)
  strict_decay = decay_matrix(g_col, g_row, strict)
  kk_decayed = mm(k, k, cfg, trans_b=True) * strict_decay  # A / beta_r
  dbeta = dbeta + jnp.sum(d_a * kk_decayed, axis=1, keepdims=True)
  d_b0 = d_a * b_col
  e_a = d_b0 * kk_decayed
  dg_col = dg_col + jnp.sum(e_a, axis=1, keepdims=True)
  dg_row = dg_row - jnp.sum(e_a, axis=0, keepdims=True)
  d_kk = d_b0 * strict_decay
  dk = dk + mm(d_kk, k, cfg) + mm(d_kk, k, cfg, trans_a=True)
  dg_col = dg_col + jnp.where(is_last, dg_last, 0.0)
  return dq, dk, dg_col, dg_row, dbeta


# ------------------------------------------------------------------------------------------------
# Glue: padding, the custom VJP, the implementation function.


def next_power_of_2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def effective_chunk(t: int, chunk_size: int) -> int:
  """A chunk no longer than the (power-of-2 rounded) sequence: T=24 runs as one 32-token chunk."""
  return min(chunk_size, max(16, next_power_of_2(t)))


def chunk_local_cumsum(g, chunk: int):
  """[B,T,H] (T a multiple of chunk) -> cumulative sum inside each chunk, float32."""
  b, t, h = g.shape
  return jnp.cumsum(g.astype(f32).reshape(b, t // chunk, chunk, h), axis=2).reshape(b, t, h)


@dataclasses.dataclass(frozen=True)
class Backend:
  """The four pallas_calls of one back end; each takes arrays in the [B,T,H,*] layout."""
  intra_fwd: Callable  # (cfg, q, k, v, gamma, beta) -> w, u, t_inv, scores
  state_fwd: Callable  # (cfg, q, k, w, u, scores, gamma, s0) -> o, s_final, states|None
  state_bwd: Callable  # (cfg, q, k, w, scores, gamma, do, ds_final) -> dv_new, d_states, ds0
  chunk_bwd: Callable  # (cfg, q, k, v, w, u, t_inv, gamma, beta, do, states, d_states, dv_new)
                       #   -> dq, dk, dv, dgamma, dbeta


def make_core(backend: Backend):
  """(q, k, v, gamma, beta, s0) -> (o, s_final) with a custom VJP built from `backend`."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(cfg, q, k, v, gamma, beta, s0):
    cfg = dataclasses.replace(cfg, save_states=False)
    w, u, _, scores = backend.intra_fwd(cfg, q, k, v, gamma, beta)
    o, s_final, _ = backend.state_fwd(cfg, q, k, w, u, scores, gamma, s0)
    return o, s_final

  def core_fwd(cfg, q, k, v, gamma, beta, s0):
    w, u, t_inv, scores = backend.intra_fwd(cfg, q, k, v, gamma, beta)
    o, s_final, states = backend.state_fwd(cfg, q, k, w, u, scores, gamma, s0)
    return (o, s_final), (q, k, v, gamma, beta, w, u, t_inv, scores, states)

  def core_bwd(cfg, residuals, cotangents):
    q, k, v, gamma, beta, w, u, t_inv, scores, states = residuals
    do, ds_final = cotangents
    do = do.astype(q.dtype) if cfg.compute_dtype != "float32" else do.astype(f32)
    dv_new, d_states, ds0 = backend.state_bwd(cfg, q, k, w, scores, gamma, do,
                                                 ds_final.astype(f32))
    dq, dk, dv, dgamma, dbeta = backend.chunk_bwd(cfg, q, k, v, w, u, t_inv, gamma, beta, do,
                                                  states, d_states, dv_new)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgamma, dbeta, ds0)

  core.defvjp(core_fwd, core_bwd)
  return core


def run_gated_delta_rule(core, q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm,
                         chunk_size, delta, make_config, min_dim=16):
  """The Implementation fn: normalisation, scale and padding in JAX (autodiff), then `core`.

  q/k L2 norm and the scale are applied here, before the kernels (XLA fuses them into one pass
  over q and k; their gradient comes from JAX). T pads to the chunk with g = beta = 0 (identity
  steps); K and V pad with zeros to a power of 2 (>= min_dim), which changes nothing.
  """
  from kernels.gated_delta_rule import api  # late import: api imports this package's kernels
  if not delta:
    raise NotImplementedError("the Pallas kernels implement the gated delta rule only; the gated "
                              "linear rule runs on 'chunked'")
  if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (jnp.bfloat16, jnp.float16, f32):
    raise NotImplementedError(f"q, k, v must share one dtype of bfloat16, float16 or float32, got "
                              f"{q.dtype}, {k.dtype}, {v.dtype}")
  _, t, _, dk = q.shape
  dv = v.shape[-1]
  q, k = api.prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  chunk = effective_chunk(t, chunk_size)
  t_pad = -(-t // chunk) * chunk
  dk_pad, dv_pad = max(min_dim, next_power_of_2(dk)), max(min_dim, next_power_of_2(dv))
  cfg = make_config(chunk, dk_pad, dv_pad, q.dtype)

  def pad(x, dims):
    widths = [(0, 0)] * x.ndim
    for axis, size in dims.items():
      widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths) if any(w[1] for w in widths) else x

  q, k = (pad(x, {1: t_pad, 3: dk_pad}) for x in (q, k))
  v = pad(v, {1: t_pad, 3: dv_pad})
  g, beta = (pad(x.astype(f32), {1: t_pad}) for x in (g, beta))
  s0 = pad(initial_state.astype(f32), {2: dk_pad, 3: dv_pad})
  gamma = chunk_local_cumsum(g, chunk)
  o, s_final = core(cfg, q, k, v, gamma, beta, s0)
  return o[:, :t, :, :dv], s_final[:, :, :dk, :dv]
