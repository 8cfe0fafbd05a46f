"""Pallas (Triton back end) kernels for the gated delta rule, forward and backward.

Arrays stay in the op's [B,T,H,*] layout (BlockSpecs squeeze H; Triton loads strided rows), so
no transposes are paid. Four kernels (math in `_pallas_common`):
  1. intra_fwd   grid (B,H,N): W, U and T = (I+A)^-1 of every chunk.
  2. state_fwd   grid (B,H,V/BV): walks the chunks carrying the [K,BV] state in registers;
                 writes o, the final state and (under a VJP) the state entering each chunk.
  3. state_bwd   grid (B,H,V/BV): walks the chunks in reverse carrying dS; writes dVnew and the
                 dS leaving each chunk, and dS_initial.
  4. chunk_bwd   grid (B,H,N): dq, dk, dv, dgamma, dbeta of each chunk from S, dS, dVnew.
On a machine without a GPU (CI) the same kernels run with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.gated_delta_rule import _pallas_common as common
from kernels.gated_delta_rule import api

f32 = jnp.float32
NAME = "pallas_triton"
# Warps of kernel 4 (the heaviest: ~128 KB of fp32 accumulators per program at K=V=128);
# module-level so that the benchmark can compare settings. Read at trace time.
CHUNK_BWD_NUM_WARPS = 4  # measured on an H200: 4 warps 5.6 ms, 8: 8.1, 16: 15.2 (fwd+bwd, B4 T4096)


def _params(cfg, num_warps):
  if cfg.interpret:
    return None
  return pltr.CompilerParams(num_warps=num_warps, num_stages=2)


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, num_warps):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=cfg.interpret,
                        compiler_params=_params(cfg, num_warps))


def _vectors(g_ref_value):
  return g_ref_value[:, None], g_ref_value[None, :]


# ------------------------------------------------------------------------------------------------
# Kernel 1: W, U, T per chunk.


def _intra_fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, w_ref, u_ref, t_ref, p_ref, *, cfg):
  g_col, g_row = _vectors(g_ref[...])
  w, u, t_inv, scores = common.intra_chunk_fwd(q_ref[...], k_ref[...], v_ref[...], g_col, g_row,
                                               b_ref[...][:, None], cfg)
  w_ref[...] = w.astype(w_ref.dtype)
  u_ref[...] = u.astype(u_ref.dtype)
  t_ref[...] = t_inv
  p_ref[...] = scores.astype(p_ref.dtype)


def intra_fwd(cfg, q, k, v, gamma, beta):
  b, t, h, dk = k.shape
  dv, c = v.shape[-1], cfg.chunk_size
  chunk = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  vec = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  dtype = jnp.dtype(cfg.compute_dtype)
  return _call(
      functools.partial(_intra_fwd_kernel, cfg=cfg), cfg, (b, h, t // c),
      [chunk(dk), chunk(dk), chunk(dv), vec, vec], [chunk(dk), chunk(dv), chunk(c), chunk(c)],
      [jax.ShapeDtypeStruct((b, t, h, dk), dtype), jax.ShapeDtypeStruct((b, t, h, dv), dtype),
       jax.ShapeDtypeStruct((b, t, h, c), f32), jax.ShapeDtypeStruct((b, t, h, c), dtype)],
      num_warps=4)(q, k, v, gamma, beta)


# ------------------------------------------------------------------------------------------------
# Kernel 2: the forward state chain.


def _state_fwd_kernel(q_ref, k_ref, w_ref, u_ref, p_ref, g_ref, s0_ref, o_ref, sf_ref, *states_ref,
                      cfg, n_chunks):
  c = cfg.chunk_size

  def step(n, state):
    rows = pl.ds(pl.multiple_of(n * c, c), c)
    g_col = g_ref[rows][:, None]
    if cfg.save_states:
      states_ref[0][n] = state
    o, state = common.state_fwd_step(state, q_ref[rows, :], k_ref[rows, :], w_ref[rows, :],
                                     u_ref[rows, :], p_ref[rows, :], g_col, cfg)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return state

  sf_ref[...] = jax.lax.fori_loop(0, n_chunks, step, s0_ref[...])


def state_fwd(cfg, q, k, w, u, scores, gamma, s0):
  b, t, h, dk = q.shape
  dv, c, bv = u.shape[-1], cfg.chunk_size, cfg.block_v
  n_chunks = t // c
  whole = lambda d: pl.BlockSpec((None, t, None, d), lambda i, j, m: (i, 0, j, 0))
  tile = pl.BlockSpec((None, t, None, bv), lambda i, j, m: (i, 0, j, m))
  vec = pl.BlockSpec((None, t, None), lambda i, j, m: (i, 0, j))
  state = pl.BlockSpec((None, None, dk, bv), lambda i, j, m: (i, j, 0, m))
  out_specs = [tile, state]
  out_shape = [jax.ShapeDtypeStruct((b, t, h, dv), q.dtype),
               jax.ShapeDtypeStruct((b, h, dk, dv), f32)]
  if cfg.save_states:
    out_specs.append(pl.BlockSpec((None, None, n_chunks, dk, bv),
                                  lambda i, j, m: (i, j, 0, 0, m)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), f32))
  outs = _call(functools.partial(_state_fwd_kernel, cfg=cfg, n_chunks=n_chunks), cfg,
               (b, h, dv // bv), [whole(dk), whole(dk), whole(dk), tile, whole(c), vec, state],
               out_specs, out_shape, num_warps=4)(q, k, w, u, scores, gamma, s0)
  return outs[0], outs[1], (outs[2] if cfg.save_states else None)


# ------------------------------------------------------------------------------------------------
# Kernel 3: the backward state chain (reverse), seeded by dS_final.


def _state_bwd_kernel(q_ref, k_ref, w_ref, p_ref, g_ref, do_ref, dsf_ref, dvn_ref, ds_ref, ds0_ref,
                      *,
                      cfg, n_chunks):
  c = cfg.chunk_size

  def step(i, d_state):
    n = n_chunks - 1 - i
    rows = pl.ds(pl.multiple_of(n * c, c), c)
    g_col = g_ref[rows][:, None]
    ds_ref[n] = d_state
    dv_new, d_state = common.state_bwd_step(d_state, q_ref[rows, :], k_ref[rows, :],
                                            w_ref[rows, :], do_ref[rows, :], p_ref[rows, :],
                                            g_col, cfg)
    dvn_ref[rows, :] = dv_new
    return d_state

  ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, step, dsf_ref[...])


def state_bwd(cfg, q, k, w, scores, gamma, do, ds_final):
  b, t, h, dk = q.shape
  dv, c, bv = do.shape[-1], cfg.chunk_size, cfg.block_v
  n_chunks = t // c
  whole = lambda d: pl.BlockSpec((None, t, None, d), lambda i, j, m: (i, 0, j, 0))
  tile = pl.BlockSpec((None, t, None, bv), lambda i, j, m: (i, 0, j, m))
  vec = pl.BlockSpec((None, t, None), lambda i, j, m: (i, 0, j))
  state = pl.BlockSpec((None, None, dk, bv), lambda i, j, m: (i, j, 0, m))
  states = pl.BlockSpec((None, None, n_chunks, dk, bv), lambda i, j, m: (i, j, 0, 0, m))
  return _call(
      functools.partial(_state_bwd_kernel, cfg=cfg, n_chunks=n_chunks), cfg, (b, h, dv // bv),
      [whole(dk), whole(dk), whole(dk), whole(c), vec, tile, state], [tile, states, state],
      [jax.ShapeDtypeStruct((b, t, h, dv), f32),
       jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), f32),
       jax.ShapeDtypeStruct((b, h, dk, dv), f32)],
      num_warps=4)(q, k, w, scores, gamma, do, ds_final)


# ------------------------------------------------------------------------------------------------
# Kernel 4: per-chunk gradients (parallel over chunks).


def _chunk_bwd_kernel(q_ref, k_ref, v_ref, w_ref, u_ref, t_ref, g_ref, b_ref, do_ref, s_ref,
                      ds_ref, dvn_ref, dq_ref, dk_ref, dv_ref, dg_ref, db_ref, *, cfg):
  c, bv = cfg.chunk_size, cfg.block_v
  dk_dim, dv_dim = q_ref.shape[-1], v_ref.shape[-1]
  g_col, g_row = _vectors(g_ref[...])
  b_col = b_ref[...][:, None]
  q, k, w, t_inv = q_ref[...], k_ref[...], w_ref[...], t_ref[...]
  acc = common.chunk_bwd_init(c, dk_dim)
  for j in range(dv_dim // bv):  # static: V / BV <= 16
    cols = pl.ds(j * bv, bv)
    acc, dv = common.chunk_bwd_vtile(acc, w, t_inv, b_col, u_ref[:, cols], v_ref[:, cols],
                                     do_ref[:, cols], dvn_ref[:, cols], s_ref[:, cols],
                                     ds_ref[:, cols], cfg)
    dv_ref[:, cols] = dv
  dq, dk, dg_col, dg_row, dbeta = common.chunk_bwd_finish(acc, q, k, t_inv, g_col, g_row, b_col,
                                                          cfg)
  dq_ref[...] = dq
  dk_ref[...] = dk
  dg_ref[...] = jnp.sum(dg_col, axis=1) + jnp.sum(dg_row, axis=0)
  db_ref[...] = jnp.sum(dbeta, axis=1)


def chunk_bwd(cfg, q, k, v, w, u, t_inv, gamma, beta, do, states, d_states, dv_new):
  b, t, h, dk = q.shape
  dv, c = v.shape[-1], cfg.chunk_size
  chunk = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  vec = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  state = pl.BlockSpec((None, None, None, dk, dv), lambda i, j, n: (i, j, n, 0, 0))
  return _call(
      functools.partial(_chunk_bwd_kernel, cfg=cfg), cfg, (b, h, t // c),
      [chunk(dk), chunk(dk), chunk(dv), chunk(dk), chunk(dv), chunk(c), vec, vec, chunk(dv),
       state, state, chunk(dv)],
      [chunk(dk), chunk(dk), chunk(dv), vec, vec],
      [jax.ShapeDtypeStruct((b, t, h, dk), f32), jax.ShapeDtypeStruct((b, t, h, dk), f32),
       jax.ShapeDtypeStruct((b, t, h, dv), f32), jax.ShapeDtypeStruct((b, t, h), f32),
       jax.ShapeDtypeStruct((b, t, h), f32)], num_warps=CHUNK_BWD_NUM_WARPS,
  )(q, k, v, w, u, t_inv, gamma, beta, do, states, d_states, dv_new)


BACKEND = common.Backend(intra_fwd, state_fwd, state_bwd, chunk_bwd)
_core = common.make_core(BACKEND)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _make_config(chunk, dk, dv, dtype):
  interpret = not _on_gpu()
  if not interpret and jnp.dtype(dtype) == f32 and max(dk, dv) >= 128:
    # Measured on an H200: kernel 4 at fp32, K = V = 128, chunk 64 asks for 320 KB of shared
    # memory (227 KB available). bf16 inputs and fp32 with K, V <= 64 fit.
    raise NotImplementedError(
        f"pallas_triton: float32 q/k/v with K or V of 128 or more (padded K={dk}, V={dv}) need "
        "more shared memory than a GPU block has in the backward kernel; use bfloat16 inputs or "
        "implementation='chunked'")
  # float32 inputs keep float32 accuracy (3 tf32 passes); bf16/fp16 inputs need no more than tf32.
  if interpret:
    precision = jax.lax.Precision.HIGHEST
  elif jnp.dtype(dtype) == f32:
    precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  else:
    precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
  # BV = 32: twice the programs of the sequential kernels (B*H*V/BV), which fill the GPU poorly.
  return common.KernelConfig(chunk_size=chunk, block_v=min(32, dv),
                             compute_dtype=jnp.dtype(dtype).name, fp32_precision=precision,
                             interpret=interpret)


def gated_delta_rule_triton(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm, chunk_size,
                            delta):
  """Implementation fn (see api.ImplementationFn). Interpreted when no GPU is the default."""
  return common.run_gated_delta_rule(_core, q, k, v, g, beta, initial_state, scale=scale,
                                     use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
                                     delta=delta, make_config=_make_config)


# Opt-in, not the GPU default: in the Rule 110 training step (H200) it is slower than "chunked"
# in float32 (88.4 vs 57.0 ms) and only 1.09x faster in bfloat16 (docs/kernels.md, end to end).
api.register_implementation(
    api.Implementation(NAME, gated_delta_rule_triton,
                       "Pallas Triton kernels (fwd + bwd, custom VJP); interpreted off-GPU"))
