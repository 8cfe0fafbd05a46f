"""Chunk math and JAX glue shared by the Pallas kernels of the gated delta rule.

The per-chunk math is written once, on values (not refs), and so are the bodies of kernels 1, 4a
and 4b (on refs), so that the Triton and the Mosaic TPU kernels only differ in their block specs
and in how they load and store. Vectors over the C tokens of a chunk are kept 2-D:
`*_col` is [C,1] and `*_row` is [1,C] (Mosaic TPU wants 2-D values; Triton takes either).

Per chunk, with gamma the chunk-local cumulative log decay (g_last its last entry), q already
normalised and scaled, D_rs = exp(gamma_r - gamma_s) for r >= s (masked before exponentiating):

  A     = strict_lower(diag(beta) K K^T * D)            T = (I + A)^-1 (substitution, doubling)
  W     = T diag(beta exp(gamma)) K                     U = T diag(beta) V        (kernel 1)
  Vnew  = U - W S
  O     = (Q exp(gamma)) S + (Q K^T * D) Vnew
  S'    = exp(g_last) S + (K exp(g_last - gamma))^T Vnew                          (kernel 2)

Backward: kernel 3 walks the chunks in reverse carrying dS (seeded by dS_final):
  dVnew = (Q K^T * D)^T dO + (K exp(g_last - gamma)) dS'
  dS    = exp(g_last) dS' + (Q exp(gamma))^T dO - W^T dVnew
and stores dS' per chunk and dVnew. Two kernels, parallel over chunks, finish the job (split so
that each holds few float32 accumulators: one kernel holding them all spilled its registers):
  4a, per K-tile: the sums over V (dO S^T, dO Vnew^T, Vnew dS'^T, dW = -dVnew S^T), then dq,
      kernel 2's part of dk and the K-tile's share of dgamma;
  4b: the backward of kernel 1 through T, from dW and dU = dVnew:
      dT = dW X^T + dU Y^T,  dA = -T^T dT T^T  (X = diag(beta exp(gamma)) K, Y = diag(beta) V),
      adding kernel 1's part of dk, and dv, dbeta, the rest of dgamma.
Under a VJP the forward saves the state entering each chunk and Vnew for kernel 4a.

Precision: the carried states and every accumulator are float32; T is inverted in float32 (its 16x16
diagonal blocks by forward substitution, elementwise, the rest by doubling with float32 products at
cfg.fp32_precision; `unit_lower_inverse`). What passes between kernels (T, per-chunk states, dS',
dVnew, dW, partial dk) is stored in `intermediate_dtype`, the input dtype by default (bf16 for bf16
inputs, as fla does), which is also the operand dtype of the WY products; the consumers cast their
matmul operands to bf16 anyway.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.gated_delta_rule import base

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static choices of one call. `compute_dtype` is the dtype of the matmul operands."""
  chunk_size: int
  block_v: int  # V-tile of the sequential kernels 2 and 3 (a grid axis: more programs)
  block_k: int  # K-tile of kernel 4a (grid axis) and of kernel 4b's loops
  grads_block_v: int  # V-tile of the loops inside kernels 4a and 4b
  compute_dtype: str  # "bfloat16" / "float16" / "float32"
  # dtype of the per-chunk arrays handed between kernels (T, states, dS', dVnew, dW, dk) and of
  # the operands of the WY products (W = T X, U = T Y and their backward). The input dtype by
  # default, as in fla; "float32" keeps them wide (Tuning.wide_intermediates on GPU).
  intermediate_dtype: str
  fp32_precision: object  # precision of float32 matmuls (tf32x3 on GPU, HIGHEST interpreted)
  interpret: object  # False, True or pltpu.InterpretParams()
  save_states: bool = True
  # q/k L2 norm fused into kernel 1 (eps of the norm), or None: q, k arrive normalised and scaled.
  qk_l2norm_eps: float | None = None
  scale: float = 1.0  # applied to q by kernel 1 when it normalises


# ------------------------------------------------------------------------------------------------
# Chunk math on values.


def mm(a, b, cfg: KernelConfig, *, trans_a=False, trans_b=False, dtype=None):
  """a @ b (optionally transposed) with float32 accumulation.

  Operands go to `dtype`, by default cfg.compute_dtype (bf16 runs the tensor cores at full rate);
  float32 operands run at cfg.fp32_precision (the triangular inverse needs them).
  """
  dtype = jnp.dtype(cfg.compute_dtype if dtype is None else dtype)
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


INVERSE_BLOCK = 16  # side of the diagonal blocks that `diagonal_inverses` forward-substitutes


def diagonal_inverses(a_t):
  """(I + A_b)^-1 for a batch of strictly lower 16x16 blocks A_b, given transposed: a_t [N,16,16]
  holds A_b^T. Forward substitution: step r sets row r of every block,
  T[r,:] = e_r - sum_{s<r} A[r,s] T[s,:], from the rows above it. The coefficients A[r,s] are a
  [N,16,1] column of A^T (masked sum over its last axis), the sum over s a sum over the middle
  axis: per step, elementwise work and two reductions on [N,16,16] (N * 256 values), no dynamic
  indexing (Triton has none on values). Every row written is a finished row of T, so nothing
  grows beyond |T|. Compiled by Triton (viewed from the [C,C] layout of kernel 1's products,
  `intra_fwd_refs`), each block sits in one warp and both reductions stay inside it: shuffles,
  no shared memory and no barrier."""
  shape = a_t.shape
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, a_t.ndim - 2)
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, a_t.ndim - 1)
  eye = jnp.where(rows == cols, 1.0, 0.0).astype(f32)
  t = eye
  for r in range(1, shape[-1]):
    coef = jnp.sum(jnp.where(cols == r, a_t, 0.0), axis=-1, keepdims=True)  # A[r,s] over s
    t = jnp.where(rows == r, eye - jnp.sum(coef * t, axis=-2, keepdims=True), t)
  return t


def _blocked(c: int):
  """[C,C] viewed as [N,16,N,16] (N = C/16 diagonal blocks) and the mask of its diagonal blocks.
  A reshape, which Triton lowers (where it lowers no slice of a value)."""
  n = c // INVERSE_BLOCK
  shape = (n, INVERSE_BLOCK, n, INVERSE_BLOCK)
  return shape, (jax.lax.broadcasted_iota(jnp.int32, shape, 0)
                 == jax.lax.broadcasted_iota(jnp.int32, shape, 2))


def diagonal_blocks_t(kk, g_col, g_row, b_row):
  """The 16x16 diagonal blocks of A^T from K K^T [C,C] (symmetric) and gamma ([C,1], [1,C]) and
  beta ([1,C]): [C/16,16,16], or [16,16] at C = 16. Built on the blocks only, so the decay costs
  16 C exponentials rather than C^2: A^T[s,r] = beta_r (k_r . k_s) exp(gamma_r - gamma_s), s < r."""
  c = kk.shape[0]
  if c == INVERSE_BLOCK:
    upper = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) < jax.lax.broadcasted_iota(
        jnp.int32, (c, c), 1)
    return kk * decay_matrix(g_row, g_col, upper) * b_row
  shape, on_diagonal = _blocked(c)
  n, sub = shape[:2]
  kk_diag = jnp.sum(jnp.where(on_diagonal, kk.reshape(shape), 0.0), axis=2)
  upper = (jax.lax.broadcasted_iota(jnp.int32, (n, sub, sub), 1)
           < jax.lax.broadcasted_iota(jnp.int32, (n, sub, sub), 2))
  decay = decay_matrix(g_row.reshape(n, 1, sub), g_col.reshape(n, sub, 1), upper)
  return kk_diag * decay * b_row.reshape(n, 1, sub)


def unit_lower_inverse(a, a_t_diag, cfg: KernelConfig):
  """(I + A)^-1 for strictly lower A [C,C], exact to float32 rounding where I + A is well
  conditioned. `a_t_diag` holds A's 16x16 diagonal blocks transposed (`diagonal_blocks_t`).

  1. The diagonal blocks T_ii by `diagonal_inverses`, all at once ([C/16,16,16]), put on the
     diagonal of a [C,C] zero matrix through the [C/16,16,C/16,16] view.
  2. Doubling, as fla's merge: with T the inverse of the block-diagonal part of I + A at block
     side w and A_w the blocks (2p+1, 2p) of side w of A, T <- T - T (A_w T) is the inverse at
     side 2w (for a 2x2 block lower triangle, [[T1, 0], [-T2 A21 T1, T2]]): two [C,C] float32
     products at cfg.fp32_precision per doubling, 4 at C = 64, 2 at C = 32, none at C = 16.
  Every intermediate is bounded by |A| and |T|. The product form prod (I + N^(2^i)) (N = -A)
  once used here lost everything to cancellation when A's powers grew (no decay, correlated
  keys: ~1e8 where T is of order 1).
  """
  c = a.shape[0]
  t_diag = diagonal_inverses(a_t_diag)
  if c == INVERSE_BLOCK:
    return t_diag
  shape, on_diagonal = _blocked(c)
  t_inv = jnp.where(on_diagonal, t_diag[:, :, None, :], 0.0).reshape(c, c)
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  width = INVERSE_BLOCK
  while width < c:
    shift = width.bit_length() - 1
    row_block, col_block = jnp.right_shift(rows, shift), jnp.right_shift(cols, shift)
    lower_pair = (jnp.bitwise_and(row_block, 1) == 1) & (col_block == row_block - 1)
    a_w = jnp.where(lower_pair, a, 0.0)
    t_inv = t_inv - mm(t_inv, mm(a_w, t_inv, cfg, dtype=f32), cfg, dtype=f32)
    width *= 2
  return t_inv


def normalize_rows(x, scale, eps):
  """x * scale / sqrt(sum(x^2) + eps) over each row, in x's dtype, and 1 / sqrt(...) [C,1]."""
  xf = x.astype(f32)
  r = 1.0 / jnp.sqrt(jnp.sum(xf * xf, axis=1, keepdims=True) + eps)
  return (xf * (r * scale)).astype(x.dtype), r


def wy_representation(k, v, g_col, g_row, b_col, b_row, cfg: KernelConfig):
  """Kernel 1's WY math: returns W [C,K], U [C,V] and T [C,C] (float32).

  The diagonal scalings of X and Y are applied to T's columns ([C,C]) rather than to K and V's
  rows ([C,K], [C,V]): fewer elementwise ops, and K and V enter the products as loaded.
  """
  c = k.shape[0]
  _, strict = masks(c)
  kk = mm(k, k, cfg, trans_b=True)  # symmetric: A^T is built from it elementwise too
  a = kk * decay_matrix(g_col, g_row, strict) * b_col
  t_inv = unit_lower_inverse(a, diagonal_blocks_t(kk, g_col, g_row, b_row), cfg)
  wy = cfg.intermediate_dtype
  w = mm(t_inv * (b_row * jnp.exp(g_row)), k, cfg, dtype=wy)
  u = mm(t_inv * b_row, v, cfg, dtype=wy)
  return w, u, t_inv


def qk_decayed(q, k, g_col, g_row, cfg: KernelConfig):
  causal, _ = masks(q.shape[0])
  return mm(q, k, cfg, trans_b=True) * decay_matrix(g_col, g_row, causal)


def state_fwd_step(state, q, k, w, u, scores, g_col, cfg: KernelConfig):
  """One chunk of kernel 2 on a V-tile: returns (o [C,BV], new state [K,BV], Vnew [C,BV]).

  `scores` = Q K^T * D comes from kernel 1, so it is not recomputed per V-tile. The decays scale
  the [C,BV] operands and results, not q and k ([C,K]).
  """
  g_last = last_of(g_col)
  v_new = u.astype(f32) - mm(w, state, cfg)
  o = mm(q, state, cfg) * jnp.exp(g_col) + mm(scores, v_new, cfg)
  state = state * jnp.exp(g_last) + mm(k, v_new * jnp.exp(g_last - g_col), cfg, trans_a=True)
  return o, state, v_new


def state_bwd_step(d_state, q, k, w, do, scores, g_col, cfg: KernelConfig):
  """One chunk of kernel 3 on a V-tile, in reverse: returns (dVnew [C,BV], dS entering [K,BV])."""
  g_last = last_of(g_col)
  dv_new = mm(scores, do, cfg, trans_a=True) + mm(k, d_state, cfg) * jnp.exp(g_last - g_col)
  d_state = (d_state * jnp.exp(g_last) + mm(q, do.astype(f32) * jnp.exp(g_col), cfg, trans_a=True)
             - mm(w, dv_new, cfg, trans_a=True))
  return dv_new, d_state


def qk_grads_vtile(acc, do, v_new, dv_new, state, d_state, cfg: KernelConfig):
  """Kernel 4a, one V-tile of one K-tile: accumulates the sums over V of the chunk's gradients.

  acc = (dq_state = dO S^T [C,BK], d_scores = dO Vnew^T [C,C], dk_to_end = Vnew dS'^T [C,BK],
         dw = -dVnew S^T [C,BK], state_decay = sum(dS' * S) [1,1]); `state`, `d_state` are the
  K-tile's rows [BK,BV] of the state entering the chunk and of dS' leaving it.
  """
  dq_state, d_scores, dk_to_end, dw, state_decay = acc
  return (dq_state + mm(do, state, cfg, trans_b=True),
          d_scores + mm(do, v_new, cfg, trans_b=True),
          dk_to_end + mm(v_new, d_state, cfg, trans_b=True),
          dw - mm(dv_new, state, cfg, trans_b=True),
          state_decay + jnp.sum(jnp.sum(d_state * state, axis=1, keepdims=True), axis=0,
                                keepdims=True))


def qk_grads_init(c: int, bk: int):
  z = lambda *s: jnp.zeros(s, f32)
  return z(c, bk), z(c, c), z(c, bk), z(c, bk), z(1, 1)


def qk_grads_finish(acc, q, k, g_col, g_row, cfg: KernelConfig):
  """Kernel 4a after the V-tiles, on one K-tile (q, k [C,BK]): the gradients through kernel 2.

  Returns dq [C,BK] (complete), dk [C,BK] (kernel 2's part), dw [C,BK] and this K-tile's share
  of dgamma as ([C,1], [1,C]): every dgamma term is a sum over K, so the shares add up.
  """
  dq_state, d_scores, dk_to_end, dw, state_decay = acc
  c = q.shape[0]
  causal, _ = masks(c)
  qf, kf = q.astype(f32), k.astype(f32)
  g_last = last_of(g_col)
  is_last = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  exp_g = jnp.exp(g_col)
  d_qk = d_scores * decay_matrix(g_col, g_row, causal)
  dq = dq_state * exp_g + mm(d_qk, k, cfg)
  to_end = jnp.exp(g_last - g_col)
  dk = mm(d_qk, q, cfg, trans_a=True) + dk_to_end * to_end
  e_scores = d_qk * mm(q, k, cfg, trans_b=True)  # d(score) * score over this K-tile, masked
  dk_end_term = jnp.sum(dk_to_end * kf * to_end, axis=1, keepdims=True)  # [C,1]
  dg_last = jnp.sum(dk_end_term, axis=0, keepdims=True) + state_decay * jnp.exp(g_last)
  dg_col = (jnp.sum(dq_state * qf * exp_g, axis=1, keepdims=True)
            + jnp.sum(e_scores, axis=1, keepdims=True) - dk_end_term
            + jnp.where(is_last, dg_last, 0.0))
  dg_row = -jnp.sum(e_scores, axis=0, keepdims=True)
  return dq, dk, dw, dg_col, dg_row


def wy_grads(load_k, load_v, load_dw, load_du, load_dk, store_dk, store_dv, n_ktiles, n_vtiles,
             t_inv, g_col, g_row, b_col, b_row, cfg: KernelConfig):
  """Kernel 4b: the backward of kernel 1 (W = T X, U = T Y, T = (I + A)^-1) for one chunk.

  X = diag(beta exp(gamma)) K, Y = diag(beta) V; dW comes from kernel 4a and dU = dVnew.
    dT = dW X^T + dU Y^T,  dA = -T^T dT T^T (strict lower),  dX = T^T dW,  dY = T^T dU.
  Tiles are read and written through the `load_*(j)` / `store_*(j, value)` callbacks (K-tiles for
  k, dw, dk; V-tiles for v, du, dv) so that no [C,K] or [C,V] float32 value is live at once.
  `load_dk(j)` is kernel 4a's part of dk, to which this adds kernel 1's. Returns dgamma as
  ([C,1], [1,C]), dbeta [C,1] and the row sums of dk * k [C,1] (for the L2 norm's backward).
  """
  c = t_inv.shape[0]
  _, strict = masks(c)
  wy = cfg.intermediate_dtype
  exp_g = jnp.exp(g_col)
  x_scale = b_col * exp_g
  d_t_x = jnp.zeros((c, c), f32)  # dW K^T, then scaled by X's diagonal (columns)
  d_t_y = jnp.zeros((c, c), f32)  # dU V^T, then scaled by Y's
  kk = jnp.zeros((c, c), f32)
  for j in range(n_ktiles):
    k = load_k(j)
    d_t_x += mm(load_dw(j), k, cfg, trans_b=True, dtype=wy)
    kk += mm(k, k, cfg, trans_b=True)
  for j in range(n_vtiles):
    d_t_y += mm(load_du(j), load_v(j), cfg, trans_b=True, dtype=wy)
  d_t = d_t_x * (b_row * jnp.exp(g_row)) + d_t_y * b_row
  d_a = -mm(mm(t_inv, d_t, cfg, trans_a=True, dtype=wy), t_inv, cfg, trans_b=True, dtype=wy)
  d_a = jnp.where(strict, d_a, 0.0)
  strict_decay = decay_matrix(g_col, g_row, strict)
  kk_decayed = kk * strict_decay  # A / beta_r
  dbeta = jnp.sum(d_a * kk_decayed, axis=1, keepdims=True)
  d_b0 = d_a * b_col
  e_a = d_b0 * kk_decayed
  dg_col = jnp.sum(e_a, axis=1, keepdims=True)
  dg_row = -jnp.sum(e_a, axis=0, keepdims=True)
  d_kk = d_b0 * strict_decay
  dk_dot_k = jnp.zeros((c, 1), f32)
  for j in range(n_ktiles):
    k = load_k(j)
    kf = k.astype(f32)
    d_x = mm(t_inv, load_dw(j), cfg, trans_a=True, dtype=wy)
    d_x_dot_k = jnp.sum(d_x * kf, axis=1, keepdims=True)
    dbeta += d_x_dot_k * exp_g
    dg_col += d_x_dot_k * x_scale
    dk = load_dk(j) + d_x * x_scale + mm(d_kk, k, cfg) + mm(d_kk, k, cfg, trans_a=True)
    dk_dot_k += jnp.sum(dk * kf, axis=1, keepdims=True)
    store_dk(j, dk)
  for j in range(n_vtiles):
    v = load_v(j)
    d_y = mm(t_inv, load_du(j), cfg, trans_a=True, dtype=wy)
    dbeta += jnp.sum(d_y * v.astype(f32), axis=1, keepdims=True)
    store_dv(j, d_y * b_col)
  return dg_col, dg_row, dbeta, dk_dot_k


def intra_fwd_refs(q_ref, k_ref, v_ref, w_ref, u_ref, t_ref, p_ref, normed, g_col, g_row, b_col,
                   b_row, cfg: KernelConfig, store_vector):
  """Kernel 1's body on refs (both back ends): W, U and T, then the causal scores Q K^T * D;
  with the fused L2 norm, q and k normalised (q scaled) and stored with their reciprocal norms.
  `normed` holds the refs of those outputs or is empty; `store_vector` turns a [C,1] value into
  the back end's layout of a per-token vector.

  The order is for Triton's sake (checked on the compiled code): q is loaded after the WY math,
  so that it is not live through it (at C = 64 it made the kernel spill registers), and the
  scores are the last product. At C <= 32 (mma.sync products) Triton picks the warp arrangement
  of the last product and gives it to the products connected to it (AccelerateMatmul): after a
  [C,C] result the warps split rows, so each 16x16 diagonal block of T lies in one warp; after
  W's or U's [C,K] the warps split columns, the blocks straddled two warps and the substitution
  took 4-5x the barriers (69 instead of 15 at C = 32). At C = 64 (wgmma) the warps split rows
  whatever the order.
  """
  eps = cfg.qk_l2norm_eps
  k = k_ref[...]
  if eps is not None:
    qn_ref, kn_ref, rq_ref, rk_ref = normed
    k, r_k = normalize_rows(k, 1.0, eps)
    kn_ref[...] = k
    rk_ref[...] = store_vector(r_k)
  w, u, t_inv = wy_representation(k, v_ref[...], g_col, g_row, b_col, b_row, cfg)
  w_ref[...] = w.astype(w_ref.dtype)
  u_ref[...] = u.astype(u_ref.dtype)
  t_ref[...] = t_inv.astype(t_ref.dtype)
  q = q_ref[...]
  if eps is not None:
    q, r_q = normalize_rows(q, cfg.scale, eps)
    qn_ref[...] = q
    rq_ref[...] = store_vector(r_q)
  p_ref[...] = qk_decayed(q, k, g_col, g_row, cfg).astype(p_ref.dtype)


def qk_grads_refs(q_ref, k_ref, do_ref, vn_ref, dvn_ref, s_ref, ds_ref, dq_ref, dk_ref, dw_ref,
                  g_col, g_row, cfg: KernelConfig):
  """Kernel 4a's body on refs (both back ends): loops over V-tiles, stores dq, dk, dw.

  Returns this K-tile's share of dgamma as ([C,1], [1,C]) and of the row sums of dq * q [C,1]
  (for the L2 norm's backward).
  """
  dv = do_ref.shape[-1]
  bv = min(cfg.grads_block_v, dv)
  acc = qk_grads_init(cfg.chunk_size, q_ref.shape[-1])
  for j in range(dv // bv):  # static: V / BV <= 16
    cols = pl.ds(j * bv, bv)
    acc = qk_grads_vtile(acc, do_ref[:, cols], vn_ref[:, cols], dvn_ref[:, cols], s_ref[:, cols],
                         ds_ref[:, cols], cfg)
  q = q_ref[...]
  dq, dk, dw, dg_col, dg_row = qk_grads_finish(acc, q, k_ref[...], g_col, g_row, cfg)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dw_ref[...] = dw.astype(dw_ref.dtype)
  return dg_col, dg_row, jnp.sum(dq * q.astype(f32), axis=1, keepdims=True)


def wy_grads_refs(k_ref, v_ref, t_ref, dw_ref, du_ref, dka_ref, dk_ref, dv_ref, g_col, g_row, b_col,
                  b_row, cfg: KernelConfig):
  """Kernel 4b's body on refs (both back ends): `wy_grads` over K- and V-tiles of the refs."""
  bk = min(cfg.block_k, k_ref.shape[-1])
  bv = min(cfg.grads_block_v, v_ref.shape[-1])
  kcols = lambda j: pl.ds(j * bk, bk)
  vcols = lambda j: pl.ds(j * bv, bv)

  def store_dk(j, x):
    dk_ref[:, kcols(j)] = x.astype(dk_ref.dtype)

  def store_dv(j, x):
    dv_ref[:, vcols(j)] = x.astype(dv_ref.dtype)

  return wy_grads(
      lambda j: k_ref[:, kcols(j)], lambda j: v_ref[:, vcols(j)], lambda j: dw_ref[:, kcols(j)],
      lambda j: du_ref[:, vcols(j)], lambda j: dka_ref[:, kcols(j)], store_dk, store_dv,
      k_ref.shape[-1] // bk, v_ref.shape[-1] // bv, t_ref[...], g_col, g_row, b_col, b_row, cfg)


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
  """The kernels of one back end (chunk_bwd is two pallas_calls); arrays in the [B,T,H,*] layout."""
  intra_fwd: Callable  # (cfg, q, k, v, gamma, beta) -> w, u, t_inv, scores, q, k, r_q, r_k:
                       #   with cfg.qk_l2norm_eps, q and k normalised (and q scaled) and the
                       #   reciprocal norms r [B,T,H]; else q, k as given and r None
  state_fwd: Callable  # (cfg, q, k, w, u, scores, gamma, s0)
                       #   -> o, s_final, states|None, v_new|None (both under a VJP only)
  state_bwd: Callable  # (cfg, q, k, w, scores, gamma, do, ds_final) -> dv_new, d_states, ds0
  chunk_bwd: Callable  # (cfg, q, k, v, t_inv, gamma, beta, do, states, d_states, v_new, dv_new)
                       #   -> dq, dk, dv, dgamma, dbeta, sum(dq*q), sum(dk*k) [B,T,H] (4a, 4b)


def l2norm_bwd(x_hat, dx_hat, x_hat_dot_dx_hat, r, scale):
  """Gradient through x_hat = scale * x * r, r = 1/sqrt(|x|^2 + eps), per row:
  dx = r (scale dx_hat - n <n, scale dx_hat>) with n = x r = x_hat / scale, and
  <n, scale dx_hat> = <x_hat, dx_hat>, which kernels 4a/4b return."""
  n = x_hat.astype(f32) / scale
  return r[..., None] * (scale * dx_hat.astype(f32) - n * x_hat_dot_dx_hat[..., None])


def make_core(backend: Backend):
  """(q, k, v, gamma, beta, s0) -> (o, s_final) with a custom VJP built from `backend`.

  With cfg.qk_l2norm_eps, q and k arrive raw: kernel 1 normalises them (and scales q), the other
  kernels read its normalised copies, and the backward finishes the norm's gradient here.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(cfg, q, k, v, gamma, beta, s0):
    cfg = dataclasses.replace(cfg, save_states=False)
    w, u, _, scores, q, k, _, _ = backend.intra_fwd(cfg, q, k, v, gamma, beta)
    o, s_final, _, _ = backend.state_fwd(cfg, q, k, w, u, scores, gamma, s0)
    return o, s_final

  def core_fwd(cfg, q, k, v, gamma, beta, s0):
    w, u, t_inv, scores, q, k, r_q, r_k = backend.intra_fwd(cfg, q, k, v, gamma, beta)
    o, s_final, states, v_new = backend.state_fwd(cfg, q, k, w, u, scores, gamma, s0)
    return (o, s_final), (q, k, v, gamma, beta, w, t_inv, scores, states, v_new, r_q, r_k)

  def core_bwd(cfg, residuals, cotangents):
    q, k, v, gamma, beta, w, t_inv, scores, states, v_new, r_q, r_k = residuals
    do, ds_final = cotangents
    do = do.astype(q.dtype) if cfg.compute_dtype != "float32" else do.astype(f32)
    dv_new, d_states, ds0 = backend.state_bwd(cfg, q, k, w, scores, gamma, do,
                                                 ds_final.astype(f32))
    dq, dk, dv, dgamma, dbeta, dq_dot_q, dk_dot_k = backend.chunk_bwd(
        cfg, q, k, v, t_inv, gamma, beta, do, states, d_states, v_new, dv_new)
    if cfg.qk_l2norm_eps is not None:  # q, k are the normalised copies here
      dq = l2norm_bwd(q, dq, dq_dot_q, r_q, cfg.scale)
      dk = l2norm_bwd(k, dk, dk_dot_k, r_k, 1.0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgamma, dbeta, ds0)

  core.defvjp(core_fwd, core_bwd)
  return core


def run_gated_delta_rule(core, q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm,
                         chunk_size, delta, make_config, min_dim=16):
  """The Implementation fn: padding in JAX (autodiff), then `core`.

  With `use_qk_l2norm` the norm and the scale are fused into kernel 1 (one pass fewer over q and
  k each way); without it the scale is applied here. T pads to the chunk with g = beta = 0
  (identity steps); K and V pad with zeros to a power of 2 (>= min_dim), which changes nothing,
  the norms included.
  """
  if not delta:
    raise NotImplementedError("the Pallas kernels implement the gated delta rule only; the gated "
                              "linear rule runs on 'chunked'")
  if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (jnp.bfloat16, jnp.float16, f32):
    raise NotImplementedError(f"q, k, v must share one dtype of bfloat16, float16 or float32, got "
                              f"{q.dtype}, {k.dtype}, {v.dtype}")
  _, t, _, dk = q.shape
  dv = v.shape[-1]
  if not use_qk_l2norm:
    q, k = base.prepare_qk(q, k, scale=scale, use_qk_l2norm=False)
  chunk = effective_chunk(t, chunk_size)
  t_pad = -(-t // chunk) * chunk
  dk_pad, dv_pad = max(min_dim, next_power_of_2(dk)), max(min_dim, next_power_of_2(dv))
  cfg = make_config(chunk, dk_pad, dv_pad, q.dtype, batch_heads=q.shape[0] * q.shape[2])
  if use_qk_l2norm:
    cfg = dataclasses.replace(cfg, qk_l2norm_eps=base.L2NORM_EPS, scale=float(scale))

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
