"""Pallas (Triton back end) kernels for the gated delta rule, forward and backward.

Arrays stay in the op's [B,T,H,*] layout (BlockSpecs squeeze H; Triton loads strided rows), so
no transposes are paid. Five kernels (math in `_pallas_common`):
  1. intra_fwd   grid (B,H,N): W, U and T = (I+A)^-1 of every chunk (and, with the fused L2
                 norm, the normalised q, k and their reciprocal norms).
  2. state_fwd   grid (B,H,V/BV): walks the chunks carrying the [K,BV] state in registers;
                 writes o, the final state and (under a VJP) the state entering each chunk.
  3. state_bwd   grid (B,H,V/BV): walks the chunks in reverse carrying dS; writes dVnew and the
                 dS leaving each chunk, and dS_initial.
  4a. qk_grads   grid (B,H,N,K/BK): dq, kernel 2's part of dk, dW and dgamma of each chunk from
                 S, dS, Vnew, dVnew.
  4b. wy_grads   grid (B,H,N): the backward through T: dk, dv, dbeta, the rest of dgamma.
On a machine without a GPU (CI) the same kernels run with `interpret=True`.

Launch settings (warps, pipeline stages, tiles) come from a frozen `Tuning`:
`make_implementation(tuning)` builds the implementation record for one; `IMPLEMENTATION` is the
default's, which `api` registers as "pallas_triton". The benchmark times other tunings by building
their records and passing them as `implementation=` (nothing global is patched).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.gated_delta_rule import _pallas_common as common
from kernels.gated_delta_rule import base
from kernels.platform import target_platform

f32 = jnp.float32
NAME = "pallas_triton"


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Launch settings of the Triton kernels (measured on an H100, docs/kernels.md).

  Kernel 4a holds four fp32 accumulators of [C,BK] or [C,C]. float32 inputs use 8 warps there:
  with 4, Triton 3.6 miscompiled kernel 4a's tf32x3 products at K = 128, chunk 32 (dq off by 6%
  on an H200; exact with 8 warps or with IEEE fp32 products, which in turn made the fp32
  K = V = 128 case run for minutes). `state_stages` pipelines the loads of the sequential kernels'
  loop; float32 inputs keep 2 (3 asked for 305 KB of shared memory at K = V = 128, over the
  H100's 227 KB). `block_v` = 0 picks the V-tile of the sequential kernels from the shape
  (`_state_block_v`). `wide_intermediates` stores what passes between kernels in float32 (and
  runs the WY products in tf32) for bf16/fp16 inputs too; False (as in fla) stores it in the
  input dtype. `narrow_warps` (when > 0) replaces the warps of kernels 1, 4a (16-bit inputs) and
  4b at chunk 32 with K, V <= 64, the Rule 110 window's shape: there 2 warps made the op 1.17x
  faster forward+backward on an H200 (0.309 against 0.361 ms, 2026-12-05), where at chunk 64,
  K = V = 128 they are 1.3x-6x slower (docs/kernels.md); `_warps`.
  """
  intra_warps: int = 4
  state_warps: int = 4
  state_stages: int = 3
  state_stages_fp32: int = 2
  qk_grads_warps: int = 4
  qk_grads_warps_fp32: int = 8
  wy_grads_warps: int = 4
  block_k: int = 64
  block_v: int = 0
  grads_block_v: int = 64
  wide_intermediates: bool = False
  narrow_warps: int = 2


DEFAULT_TUNING = Tuning()

# The sequential kernels run B*H*V/BV programs: BV = 64 where that still gives about one program
# per SM (H100/H200: 132), else 32 for more programs (measured, docs/kernels.md).
_STATE_PROGRAMS = 128


def _warps(num_warps, cfg, dk, dv, tuning: Tuning):
  """Warps of kernels 1, 4a and 4b: `tuning.narrow_warps` at chunk 32 with K, V <= 64 (measured
  there, compiled exact; other small shapes are not measured), else `num_warps`."""
  narrow = tuning.narrow_warps and cfg.chunk_size == 32 and max(dk, dv) <= 64
  return tuning.narrow_warps if narrow else num_warps


def _params(cfg, num_warps, num_stages):
  if cfg.interpret:
    return None
  return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, num_warps, num_stages=2):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=cfg.interpret,
                        compiler_params=_params(cfg, num_warps, num_stages))


def _vectors(g_ref_value):
  return g_ref_value[:, None], g_ref_value[None, :]


# ------------------------------------------------------------------------------------------------
# Kernel 1: W, U, T per chunk.


def _intra_fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, w_ref, u_ref, t_ref, p_ref, *normed,
                      cfg):
  common.intra_fwd_refs(q_ref, k_ref, v_ref, w_ref, u_ref, t_ref, p_ref, normed,
                        *_vectors(g_ref[...]), *_vectors(b_ref[...]), cfg,
                        store_vector=lambda col: jnp.sum(col, axis=1))


def intra_fwd(cfg, q, k, v, gamma, beta, *, tuning: Tuning):
  b, t, h, dk = k.shape
  dv, c = v.shape[-1], cfg.chunk_size
  chunk = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  vec = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  dtype, wide = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.intermediate_dtype)
  out_specs = [chunk(dk), chunk(dv), chunk(c), chunk(c)]
  out_shape = [jax.ShapeDtypeStruct((b, t, h, dk), dtype),
               jax.ShapeDtypeStruct((b, t, h, dv), dtype),
               jax.ShapeDtypeStruct((b, t, h, c), wide), jax.ShapeDtypeStruct((b, t, h, c), dtype)]
  normalize = cfg.qk_l2norm_eps is not None
  if normalize:
    out_specs += [chunk(dk), chunk(dk), vec, vec]
    out_shape += [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                  jax.ShapeDtypeStruct((b, t, h), f32), jax.ShapeDtypeStruct((b, t, h), f32)]
  outs = _call(functools.partial(_intra_fwd_kernel, cfg=cfg), cfg, (b, h, t // c),
               [chunk(dk), chunk(dk), chunk(dv), vec, vec], out_specs, out_shape,
               num_warps=_warps(tuning.intra_warps, cfg, dk, dv, tuning))(q, k, v, gamma, beta)
  return (*outs, *(() if normalize else (q, k, None, None)))


# ------------------------------------------------------------------------------------------------
# Kernel 2: the forward state chain.


# Shared memory per block on the H100 and H200, and what the sequential kernels need besides their
# pipeline buffers (layout conversions; fitted to the 305 KB that 3 stages asked for at float32,
# K = V = 128, BV = 32).
_SMEM_BYTES = 227 * 1024
_SMEM_SCRATCH = 64 * 1024


def _state_stages(dtype, chunk, dk, bv, tuning: Tuning):
  """Pipeline stages of the sequential kernels' loop: the tuning's, fewer where the loads of one
  step ([C,K] q, k, w, [C,BV], [C,C]) would overflow shared memory (K = 256). Each stage past
  the first holds one step's loads."""
  requested = tuning.state_stages_fp32 if dtype == f32 else tuning.state_stages
  per_stage = chunk * (3 * dk + bv + chunk) * jnp.dtype(dtype).itemsize
  return max(1, min(requested, 1 + (_SMEM_BYTES - _SMEM_SCRATCH) // per_stage))


def _state_fwd_kernel(q_ref, k_ref, w_ref, u_ref, p_ref, g_ref, s0_ref, o_ref, sf_ref, *saved,
                      cfg, n_chunks):
  c = cfg.chunk_size

  def step(n, state):
    rows = pl.ds(pl.multiple_of(n * c, c), c)
    g_col = g_ref[rows][:, None]
    if cfg.save_states:
      saved[0][n] = state.astype(saved[0].dtype)
    o, state, v_new = common.state_fwd_step(state, q_ref[rows, :], k_ref[rows, :], w_ref[rows, :],
                                            u_ref[rows, :], p_ref[rows, :], g_col, cfg)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    if cfg.save_states:
      saved[1][rows, :] = v_new.astype(saved[1].dtype)
    return state

  sf_ref[...] = jax.lax.fori_loop(0, n_chunks, step, s0_ref[...])


def state_fwd(cfg, q, k, w, u, scores, gamma, s0, *, tuning: Tuning):
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
    out_specs += [pl.BlockSpec((None, None, n_chunks, dk, bv), lambda i, j, m: (i, j, 0, 0, m)),
                  tile]
    out_shape += [jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), cfg.intermediate_dtype),
                  jax.ShapeDtypeStruct((b, t, h, dv), u.dtype)]  # Vnew: only a matmul operand
  outs = _call(functools.partial(_state_fwd_kernel, cfg=cfg, n_chunks=n_chunks), cfg,
               (b, h, dv // bv), [whole(dk), whole(dk), whole(dk), tile, whole(c), vec, state],
               out_specs, out_shape, num_warps=tuning.state_warps,
               num_stages=_state_stages(q.dtype, c, dk, bv, tuning),
               )(q, k, w, u, scores, gamma, s0)
  return (outs[0], outs[1], *(outs[2:] if cfg.save_states else (None, None)))


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
    ds_ref[n] = d_state.astype(ds_ref.dtype)
    dv_new, d_state = common.state_bwd_step(d_state, q_ref[rows, :], k_ref[rows, :],
                                            w_ref[rows, :], do_ref[rows, :], p_ref[rows, :],
                                            g_col, cfg)
    dvn_ref[rows, :] = dv_new.astype(dvn_ref.dtype)
    return d_state

  ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, step, dsf_ref[...])


def state_bwd(cfg, q, k, w, scores, gamma, do, ds_final, *, tuning: Tuning):
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
      [jax.ShapeDtypeStruct((b, t, h, dv), cfg.intermediate_dtype),
       jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), cfg.intermediate_dtype),
       jax.ShapeDtypeStruct((b, h, dk, dv), f32)],
      num_warps=tuning.state_warps, num_stages=_state_stages(q.dtype, c, dk, bv, tuning),
  )(q, k, w, scores, gamma, do, ds_final)


# ------------------------------------------------------------------------------------------------
# Kernels 4a and 4b: per-chunk gradients (parallel over chunks).


def _qk_grads_kernel(q_ref, k_ref, g_ref, do_ref, vn_ref, dvn_ref, s_ref, ds_ref, dq_ref, dk_ref,
                     dw_ref, dg_ref, dqq_ref, *, cfg):
  dg_col, dg_row, dq_dot_q = common.qk_grads_refs(q_ref, k_ref, do_ref, vn_ref, dvn_ref, s_ref,
                                                  ds_ref, dq_ref, dk_ref, dw_ref,
                                                  *_vectors(g_ref[...]), cfg)
  dg_ref[...] = jnp.sum(dg_col, axis=1) + jnp.sum(dg_row, axis=0)
  dqq_ref[...] = jnp.sum(dq_dot_q, axis=1)


def _wy_grads_kernel(k_ref, v_ref, t_ref, g_ref, b_ref, dw_ref, du_ref, dka_ref, dk_ref, dv_ref,
                     dg_ref, db_ref, dkk_ref, *, cfg):
  dg_col, dg_row, dbeta, dk_dot_k = common.wy_grads_refs(
      k_ref, v_ref, t_ref, dw_ref, du_ref, dka_ref, dk_ref, dv_ref, *_vectors(g_ref[...]),
      *_vectors(b_ref[...]), cfg)
  dg_ref[...] = jnp.sum(dg_col, axis=1) + jnp.sum(dg_row, axis=0)
  db_ref[...] = jnp.sum(dbeta, axis=1)
  dkk_ref[...] = jnp.sum(dk_dot_k, axis=1)


def chunk_bwd(cfg, q, k, v, t_inv, gamma, beta, do, states, d_states, v_new, dv_new, *,
              tuning: Tuning):
  b, t, h, dk = q.shape
  dv, c, bk = v.shape[-1], cfg.chunk_size, cfg.block_k
  n_k = dk // bk
  # 4a: grid (B, H, N, K/BK).
  ktile = pl.BlockSpec((None, c, None, bk), lambda i, j, n, m: (i, n, j, m))
  rows = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n, m: (i, n, j, 0))
  state = pl.BlockSpec((None, None, None, bk, dv), lambda i, j, n, m: (i, j, n, m, 0))
  per_ktile = pl.BlockSpec((None, None, c, None), lambda i, j, n, m: (i, m, n, j))
  dq, dk_a, dw, dg_a, dq_dot_q = _call(
      functools.partial(_qk_grads_kernel, cfg=cfg), cfg, (b, h, t // c, n_k),
      [ktile, ktile, pl.BlockSpec((None, c, None), lambda i, j, n, m: (i, n, j)), rows(dv),
       rows(dv), rows(dv), state, state],
      [ktile, ktile, ktile, per_ktile, per_ktile],
      [jax.ShapeDtypeStruct((b, t, h, dk), q.dtype),
       jax.ShapeDtypeStruct((b, t, h, dk), cfg.intermediate_dtype),
       jax.ShapeDtypeStruct((b, t, h, dk), cfg.intermediate_dtype),
       jax.ShapeDtypeStruct((b, n_k, t, h), f32), jax.ShapeDtypeStruct((b, n_k, t, h), f32)],
      num_warps=(tuning.qk_grads_warps_fp32 if q.dtype == f32
                 else _warps(tuning.qk_grads_warps, cfg, dk, dv, tuning)),
  )(q, k, gamma, do, v_new, dv_new, states, d_states)
  # 4b: grid (B, H, N).
  chunk = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  vec = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  dk_, dv_, dg_b, dbeta, dk_dot_k = _call(
      functools.partial(_wy_grads_kernel, cfg=cfg), cfg, (b, h, t // c),
      [chunk(dk), chunk(dv), chunk(c), vec, vec, chunk(dk), chunk(dv), chunk(dk)],
      [chunk(dk), chunk(dv), vec, vec, vec],
      [jax.ShapeDtypeStruct((b, t, h, dk), k.dtype), jax.ShapeDtypeStruct((b, t, h, dv), v.dtype),
       *[jax.ShapeDtypeStruct((b, t, h), f32)] * 3],
      num_warps=_warps(tuning.wy_grads_warps, cfg, dk, dv, tuning),
  )(k, v, t_inv, gamma, beta, dw, dv_new, dk_a)
  return (dq, dk_, dv_, jnp.sum(dg_a, axis=1) + dg_b, dbeta, jnp.sum(dq_dot_q, axis=1),
          dk_dot_k)


def _on_gpu() -> bool:
  return target_platform() == "gpu"


def _state_block_v(dv, batch_heads, tuning: Tuning):
  if tuning.block_v:
    return min(tuning.block_v, dv)
  return min(64 if batch_heads * dv // 64 >= _STATE_PROGRAMS else 32, dv)


# Kernel 1 with float32 inputs multiplies in 3 tf32 passes, which split each float32 operand into
# a high and a low tf32 part. Compiled by Triton for an H100/H200 at chunk 64 it stages the split
# k^T (K K^T, Q K^T) and k (W = T X) tiles in shared memory at once: four [64, K] float32 tiles,
# six with the fused L2 norm, 256 or 384 KB at K = 256 where a block can have 227 KB (the compiled
# fla-style grid failed there: "requested 393216, available: 232448"). Read off the compiled
# kernel (Triton 3.6, sm_90) for K, V in {64, 128, 256}, L2 norm on and off: with K <= 128 at
# most 192 KB (K = 128, or V = 256), so V alone never overflows; chunk 32 takes at most 192 KB
# and chunk 16 96 KB at K = 256; bf16/fp16 inputs (no split) 96 KB at chunk 64, K = 256.


def _refusal(chunk, dk, dtype, interpret) -> str | None:
  """Why the compiled kernels cannot run these (padded) shapes, or None."""
  if interpret or jnp.dtype(dtype) != f32 or chunk != 64 or dk <= 128:
    return None
  return (f"pallas_triton: float32 inputs with K padded to {dk} at chunk 64 do not fit kernel 1 "
          f"in shared memory when compiled: its 3-pass tf32 products stage four to six [64, K] "
          f"float32 tiles at once, {4 * chunk * dk * 4} to {6 * chunk * dk * 4} bytes, over the "
          f"{_SMEM_BYTES} an H100 or H200 block can use. Use 'chunked' "
          f"(implementation=None picks it for float32 inputs), chunk_size <= 32, or bfloat16 "
          f"inputs")


def _make_config(chunk, dk, dv, dtype, batch_heads, *, tuning: Tuning):
  interpret = not _on_gpu()
  reason = _refusal(chunk, dk, dtype, interpret)
  if reason:
    raise NotImplementedError(reason)
  # float32 inputs keep float32 accuracy (3 tf32 passes; see Tuning for a Triton miscompile);
  # bf16/fp16 inputs need no more than tf32 for their fp32 products.
  if interpret:
    precision = jax.lax.Precision.HIGHEST
  elif jnp.dtype(dtype) == f32:
    precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  else:
    precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
  return common.KernelConfig(chunk_size=chunk, block_v=_state_block_v(dv, batch_heads, tuning),
                             block_k=min(tuning.block_k, dk),
                             grads_block_v=min(tuning.grads_block_v, dv),
                             compute_dtype=jnp.dtype(dtype).name,
                             intermediate_dtype="float32" if tuning.wide_intermediates
                             else jnp.dtype(dtype).name,
                             fp32_precision=precision,
                             interpret=interpret)


def _passed_over_by_default(q) -> str | None:
  # Rule 110 training step on an H100 (docs/kernels.md, end to end): bfloat16 0.62x the chunked
  # path's time, float32 2.56x (1.2x on an H200 before the 8-warp miscompile workaround).
  if q.dtype == f32:
    return ("float32 inputs run faster on 'chunked' (measured, docs/kernels.md); ask for "
            "'pallas_triton' by name to use it anyway")
  return None


def make_implementation(tuning: Tuning = DEFAULT_TUNING) -> base.Implementation:
  """The implementation record of the Triton kernels launched with `tuning`.

  Named "pallas_triton" for the default tuning, else "pallas_triton[field=value,...]" listing the
  fields that differ. Pass the record itself as `implementation=` to run it (the registry holds
  only the default).
  """
  bind = lambda f: functools.partial(f, tuning=tuning)
  core = common.make_core(common.Backend(bind(intra_fwd), bind(state_fwd), bind(state_bwd),
                                         bind(chunk_bwd)))
  make_config = bind(_make_config)

  def gated_delta_rule_triton(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm,
                              chunk_size, delta):
    """Implementation fn (see base.ImplementationFn). Interpreted when no GPU is the default."""
    return common.run_gated_delta_rule(core, q, k, v, g, beta, initial_state, scale=scale,
                                       use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
                                       delta=delta, make_config=make_config)

  changed = [f"{f.name}={getattr(tuning, f.name)}" for f in dataclasses.fields(Tuning)
             if getattr(tuning, f.name) != getattr(DEFAULT_TUNING, f.name)]
  name = f"{NAME}[{','.join(changed)}]" if changed else NAME
  return base.Implementation(
      name, gated_delta_rule_triton,
      "Pallas Triton kernels (fwd + bwd, custom VJP); interpreted off-GPU",
      passed_over_by_default=_passed_over_by_default)


# The GPU default for bfloat16/float16 inputs (api.DEFAULT_ORDER); float32 inputs go to "chunked".
IMPLEMENTATION = make_implementation()
