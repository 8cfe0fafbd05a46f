"""Pallas Mosaic TPU kernels for the gated delta rule, forward and backward.

NEVER RUN ON A TPU: validated only on CPU in TPU interpret mode (`pltpu.InterpretParams()`), by
tests/kernels/. Available by name only: the TPU default is "chunked" until this has run on one.
The chunk math is shared with the Triton kernels (`_pallas_common`); what differs is the TPU
idiom:
  - arrays go to a [B,H,T,*] layout (the last two block dims must tile (8,128) or be whole), and
    the per-token vectors gamma, beta to [B,H,T,1] columns;
  - the chunk chain is the last grid axis ("arbitrary", sequential) with the [K,BV] state carried
    in a VMEM scratch across grid steps, instead of a loop inside one program;
  - the backward chain reverses that axis through its index maps.
Expected gaps on real hardware (unchecked): the layout transposes cost a pass over the inputs,
K/V of 64 fill half of a 128-lane vreg, and Mosaic may reject the transposed-operand matmuls or
the [C,1] -> [1,C] transpose at some shapes, and kernel 1's triangular inverse: the [C,C] ->
[C/16,16,C/16,16] and [1,C] -> [C/16,1,16] reshapes, the reductions over the middle axes of
[C/16,16,16] values and the 16-lane-wide blocks (`_pallas_common.unit_lower_inverse`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.gated_delta_rule import _pallas_common as common
from kernels.gated_delta_rule import base
from kernels.platform import target_platform

f32 = jnp.float32
NAME = "pallas_mosaic_tpu"


def _to_heads(x):
  """[B,T,H,*] -> [B,H,T,*]; [B,T,H] -> [B,H,T,1]."""
  return jnp.swapaxes(x, 1, 2) if x.ndim == 4 else jnp.swapaxes(x, 1, 2)[..., None]


def _from_heads(x):
  return jnp.swapaxes(x, 1, 2) if x.shape[-1] != 1 else jnp.swapaxes(x[..., 0], 1, 2)


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, semantics, scratch=()):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=list(scratch), interpret=cfg.interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _vectors(g_col):
  return g_col, jnp.transpose(g_col)


def _intra_fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, w_ref, u_ref, t_ref, p_ref, *normed,
                      cfg):
  common.intra_fwd_refs(q_ref, k_ref, v_ref, w_ref, u_ref, t_ref, p_ref, normed,
                        *_vectors(g_ref[...]), *_vectors(b_ref[...]), cfg,
                        store_vector=lambda col: col)


def intra_fwd(cfg, q, k, v, gamma, beta):
  b, t, h, dk = q.shape
  dv, c = v.shape[-1], cfg.chunk_size
  chunk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, n: (i, j, n, 0))
  dtype, wide = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.intermediate_dtype)
  out_specs = [chunk(dk), chunk(dv), chunk(c), chunk(c)]
  out_shape = [jax.ShapeDtypeStruct((b, h, t, dk), dtype),
               jax.ShapeDtypeStruct((b, h, t, dv), dtype),
               jax.ShapeDtypeStruct((b, h, t, c), wide), jax.ShapeDtypeStruct((b, h, t, c), dtype)]
  normalize = cfg.qk_l2norm_eps is not None
  if normalize:
    out_specs += [chunk(dk), chunk(dk), chunk(1), chunk(1)]
    out_shape += [jax.ShapeDtypeStruct((b, h, t, dk), q.dtype),
                  jax.ShapeDtypeStruct((b, h, t, dk), k.dtype),
                  jax.ShapeDtypeStruct((b, h, t, 1), f32), jax.ShapeDtypeStruct((b, h, t, 1), f32)]
  outs = _call(
      functools.partial(_intra_fwd_kernel, cfg=cfg), cfg, (b, h, t // c),
      [chunk(dk), chunk(dk), chunk(dv), chunk(1), chunk(1)], out_specs, out_shape,
      ("parallel", "parallel", "parallel"),
  )(*map(_to_heads, (q, k, v, gamma, beta)))
  return (*map(_from_heads, outs), *(() if normalize else (q, k, None, None)))


def _state_fwd_kernel(q_ref, k_ref, w_ref, u_ref, p_ref, g_ref, s0_ref, o_ref, sf_ref,
                      *rest, cfg, n_chunks):
  states_ref, vn_ref, state_ref = rest if cfg.save_states else (None, None, rest[0])
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    state_ref[...] = s0_ref[...]

  state = state_ref[...]
  if cfg.save_states:
    states_ref[...] = state.astype(states_ref.dtype)
  o, state, v_new = common.state_fwd_step(state, q_ref[...], k_ref[...], w_ref[...], u_ref[...],
                                          p_ref[...], g_ref[...], cfg)
  o_ref[...] = o.astype(o_ref.dtype)
  if cfg.save_states:
    vn_ref[...] = v_new.astype(vn_ref.dtype)
  state_ref[...] = state

  @pl.when(n == n_chunks - 1)
  def _():
    sf_ref[...] = state


def state_fwd(cfg, q, k, w, u, scores, gamma, s0):
  b, t, h, dk = q.shape
  dv, c = u.shape[-1], cfg.chunk_size
  bv = min(cfg.block_v, dv)
  n_chunks = t // c
  chunk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, m, n: (i, j, n, 0))
  tile = pl.BlockSpec((None, None, c, bv), lambda i, j, m, n: (i, j, n, m))
  state = pl.BlockSpec((None, None, dk, bv), lambda i, j, m, n: (i, j, 0, m))
  out_specs = [tile, state]
  out_shape = [jax.ShapeDtypeStruct((b, h, t, dv), q.dtype),
               jax.ShapeDtypeStruct((b, h, dk, dv), f32)]
  if cfg.save_states:
    out_specs += [pl.BlockSpec((None, None, None, dk, bv), lambda i, j, m, n: (i, j, n, 0, m)),
                  tile]
    out_shape += [jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), cfg.intermediate_dtype),
                  jax.ShapeDtypeStruct((b, h, t, dv), u.dtype)]
  outs = _call(
      functools.partial(_state_fwd_kernel, cfg=cfg, n_chunks=n_chunks), cfg,
      (b, h, dv // bv, n_chunks),
      [chunk(dk), chunk(dk), chunk(dk), tile, chunk(c), chunk(1), state], out_specs, out_shape,
      ("parallel", "parallel", "parallel", "arbitrary"), [pltpu.VMEM((dk, bv), f32)],
  )(*map(_to_heads, (q, k, w, u, scores, gamma)), s0)
  if not cfg.save_states:
    return _from_heads(outs[0]), outs[1], None, None
  return _from_heads(outs[0]), outs[1], outs[2], _from_heads(outs[3])


def _state_bwd_kernel(q_ref, k_ref, w_ref, p_ref, g_ref, do_ref, dsf_ref, dvn_ref, ds_ref,
                      ds0_ref, d_state_ref, *, cfg, n_chunks):
  i = pl.program_id(3)  # chunk n_chunks - 1 - i

  @pl.when(i == 0)
  def _():
    d_state_ref[...] = dsf_ref[...]

  d_state = d_state_ref[...]
  ds_ref[...] = d_state.astype(ds_ref.dtype)
  dv_new, d_state = common.state_bwd_step(d_state, q_ref[...], k_ref[...], w_ref[...],
                                          do_ref[...], p_ref[...], g_ref[...], cfg)
  dvn_ref[...] = dv_new.astype(dvn_ref.dtype)
  d_state_ref[...] = d_state

  @pl.when(i == n_chunks - 1)
  def _():
    ds0_ref[...] = d_state


def state_bwd(cfg, q, k, w, scores, gamma, do, ds_final):
  b, t, h, dk = q.shape
  dv, c = do.shape[-1], cfg.chunk_size
  bv = min(cfg.block_v, dv)
  n_chunks = t // c
  rev = lambda i: n_chunks - 1 - i
  chunk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, m, n: (i, j, rev(n), 0))
  tile = pl.BlockSpec((None, None, c, bv), lambda i, j, m, n: (i, j, rev(n), m))
  state = pl.BlockSpec((None, None, dk, bv), lambda i, j, m, n: (i, j, 0, m))
  states = pl.BlockSpec((None, None, None, dk, bv), lambda i, j, m, n: (i, j, rev(n), 0, m))
  dv_new, d_states, ds0 = _call(
      functools.partial(_state_bwd_kernel, cfg=cfg, n_chunks=n_chunks), cfg,
      (b, h, dv // bv, n_chunks),
      [chunk(dk), chunk(dk), chunk(dk), chunk(c), chunk(1), tile, state], [tile, states, state],
      [jax.ShapeDtypeStruct((b, h, t, dv), cfg.intermediate_dtype),
       jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), cfg.intermediate_dtype),
       jax.ShapeDtypeStruct((b, h, dk, dv), f32)],
      ("parallel", "parallel", "parallel", "arbitrary"), [pltpu.VMEM((dk, bv), f32)],
  )(*map(_to_heads, (q, k, w, scores, gamma, do)), ds_final)
  return _from_heads(dv_new), d_states, ds0


def _qk_grads_kernel(q_ref, k_ref, g_ref, do_ref, vn_ref, dvn_ref, s_ref, ds_ref, dq_ref, dk_ref,
                     dw_ref, dg_ref, dqq_ref, *, cfg):
  dg_col, dg_row, dq_dot_q = common.qk_grads_refs(q_ref, k_ref, do_ref, vn_ref, dvn_ref, s_ref,
                                                  ds_ref, dq_ref, dk_ref, dw_ref,
                                                  *_vectors(g_ref[...]), cfg)
  dg_ref[...] = dg_col + jnp.transpose(dg_row)
  dqq_ref[...] = dq_dot_q


def _wy_grads_kernel(k_ref, v_ref, t_ref, g_ref, b_ref, dw_ref, du_ref, dka_ref, dk_ref, dv_ref,
                     dg_ref, db_ref, dkk_ref, *, cfg):
  dg_col, dg_row, dbeta, dk_dot_k = common.wy_grads_refs(
      k_ref, v_ref, t_ref, dw_ref, du_ref, dka_ref, dk_ref, dv_ref, *_vectors(g_ref[...]),
      *_vectors(b_ref[...]), cfg)
  dg_ref[...] = dg_col + jnp.transpose(dg_row)
  db_ref[...] = dbeta
  dkk_ref[...] = dk_dot_k


def chunk_bwd(cfg, q, k, v, t_inv, gamma, beta, do, states, d_states, v_new, dv_new):
  b, t, h, dk = q.shape
  dv, c = v.shape[-1], cfg.chunk_size
  bk = min(cfg.block_k, dk)
  n_k = dk // bk
  # 4a: grid (B, H, N, K/BK).
  ktile = pl.BlockSpec((None, None, c, bk), lambda i, j, n, m: (i, j, n, m))
  rows = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, n, m: (i, j, n, 0))
  state = pl.BlockSpec((None, None, None, bk, dv), lambda i, j, n, m: (i, j, n, m, 0))
  per_ktile = pl.BlockSpec((None, None, None, c, 1), lambda i, j, n, m: (i, j, m, n, 0))
  dq, dk_a, dw, dg_a, dq_dot_q = _call(
      functools.partial(_qk_grads_kernel, cfg=cfg), cfg, (b, h, t // c, n_k),
      [ktile, ktile, rows(1), rows(dv), rows(dv), rows(dv), state, state],
      [ktile, ktile, ktile, per_ktile, per_ktile],
      [jax.ShapeDtypeStruct((b, h, t, dk), q.dtype),
       jax.ShapeDtypeStruct((b, h, t, dk), cfg.intermediate_dtype),
       jax.ShapeDtypeStruct((b, h, t, dk), cfg.intermediate_dtype),
       *[jax.ShapeDtypeStruct((b, h, n_k, t, 1), f32)] * 2],
      ("parallel",) * 4,
  )(*map(_to_heads, (q, k, gamma, do, v_new, dv_new)), states, d_states)
  # 4b: grid (B, H, N).
  chunk = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, n: (i, j, n, 0))
  dk_, dv_, dg_b, dbeta, dk_dot_k = _call(
      functools.partial(_wy_grads_kernel, cfg=cfg), cfg, (b, h, t // c),
      [chunk(dk), chunk(dv), chunk(c), chunk(1), chunk(1), chunk(dk), chunk(dv), chunk(dk)],
      [chunk(dk), chunk(dv), chunk(1), chunk(1), chunk(1)],
      [jax.ShapeDtypeStruct((b, h, t, dk), k.dtype), jax.ShapeDtypeStruct((b, h, t, dv), v.dtype),
       *[jax.ShapeDtypeStruct((b, h, t, 1), f32)] * 3],
      ("parallel",) * 3,
  )(*map(_to_heads, (k, v, t_inv, gamma, beta)), dw, _to_heads(dv_new), dk_a)
  dgamma = _from_heads(jnp.sum(dg_a, axis=2) + dg_b)
  return (_from_heads(dq), _from_heads(dk_), _from_heads(dv_), dgamma, _from_heads(dbeta),
          _from_heads(jnp.sum(dq_dot_q, axis=2)), _from_heads(dk_dot_k))


_core = common.make_core(common.Backend(intra_fwd, state_fwd, state_bwd, chunk_bwd))


def _make_config(chunk, dk, dv, dtype, batch_heads):
  del batch_heads  # one block size
  on_tpu = target_platform() == "tpu"
  return common.KernelConfig(
      chunk_size=chunk, block_v=min(128, dv), block_k=min(128, dk), grads_block_v=min(128, dv),
      compute_dtype=jnp.dtype(dtype).name, intermediate_dtype=jnp.dtype(dtype).name,
      fp32_precision=jax.lax.Precision.HIGHEST,
      interpret=False if on_tpu else pltpu.InterpretParams())


def gated_delta_rule_mosaic_tpu(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm,
                                chunk_size, delta):
  """Implementation fn (see base.ImplementationFn). TPU interpret mode off-TPU."""
  return common.run_gated_delta_rule(_core, q, k, v, g, beta, initial_state, scale=scale,
                                     use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
                                     delta=delta, make_config=_make_config)


# Not in any default order (api.DEFAULT_ORDER): never run on a TPU.
IMPLEMENTATION = base.Implementation(
    NAME, gated_delta_rule_mosaic_tpu,
    "Pallas Mosaic TPU kernels (fwd + bwd, custom VJP); never run on a TPU, validated in TPU "
    "interpret mode; by name only")
