"""Pallas Mosaic GPU forward kernel for the gated delta rule (first step; forward only).

NEVER TIMED. Validated by tests/kernels/test_pallas_mosaic_gpu.py on CPU in GPU interpret mode
(`plgpu.InterpretGPUParams()`) and compiled on one H200 (all of its tests passed there,
2026-12-03). Available by name only (in no default order) until a benchmark says it is faster.

What runs where:
  - The intra-chunk WY quantities (W, U and the causal scores P = Q K^T * D) are computed in pure
    JAX outside the kernel, by `_pallas_common.wy_representation` / `qk_decayed` vmapped over
    (batch*head, chunk): the same chunk math as the Triton and TPU kernel 1.
  - The state-passing part is one `plgpu.kernel`, grid (B*H, V/BV): each program walks the
    chunks of one (batch, head) and one V-tile, carrying the [K,BV] float32 state in SMEM:
      Vnew = U - W S;  O = exp(gamma) * (Q S) + P Vnew;  S' = exp(g_last) S + K^T (exp(g_last -
      gamma) * Vnew).
    Every chunk product is a `plgpu.wgmma` (bf16 operands in SMEM, float32 accumulator).
    bf16 inputs: the state and Vnew enter the products rounded to bf16, as in the Triton kernel.
    float32 inputs: each operand is split into bf16 hi + lo parts and a product is three wgmmas
    (hi hi + hi lo + lo hi, error ~2^-16 relative), so that a real GPU does not fall back to tf32.
  - Backward: `jax.custom_vjp` whose bwd recomputes the op with the `chunked` implementation and
    differentiates that (correct, not fast: it repeats the whole forward in pure JAX).

Limits (NotImplementedError): the gated delta rule only; bf16 or float32 inputs; chunk_size 64
(a warpgroup's wgmma has M = 64: the [C,*] products need C = 64); K is padded to a multiple of
64 (the state update K^T Vnew has M = K) and refused where the SMEM buffers do not fit
(with V-tiles of 64: bf16 at K > 192; float32, whose operands are bf16 hi/lo pairs, at
K > 64).
T pads to the chunk with g = beta = 0 (identity steps); K and V pad with zeros.

For the profile to judge: the SMEM scratch has no tiling/swizzle transforms (it compiled without;
unswizzled wgmma operands may cost bank conflicts), and there is no TMA/compute overlap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.gated_delta_rule import _pallas_common as common
from kernels.gated_delta_rule import base, chunked

f32, bf16 = jnp.float32, jnp.bfloat16
NAME = "pallas_mosaic_gpu"
CHUNK = 64  # wgmma's M per warpgroup
BLOCK_V = 64
SMEM_LIMIT = 200 * 1024  # of the H100/H200's 227 KiB per block, some left for the compiler


def _parts(x):
  """bf16 operand parts: (x,) for bf16; (hi, lo) for float32 with x ~= hi + lo."""
  if x.dtype == bf16:
    return (x,)
  hi = x.astype(bf16)
  return hi, (x - hi.astype(f32)).astype(bf16)


def _smem_bytes(n_parts, dk, bv, out_dtype, u_dtype):
  c = CHUNK
  operands = n_parts * 2 * (3 * c * dk + c * c + dk * bv + 2 * c * bv)  # q k w, P, S, Vnew, Vd
  return (operands + 4 * dk * bv + c * bv * (jnp.dtype(out_dtype).itemsize
                                             + jnp.dtype(u_dtype).itemsize) + 4 * (c + dk))


def _state_fwd_kernel(*refs, n_parts, n_chunks, bv):
  """One (batch*head, V-tile): the chunk chain. Refs: inputs (q, k, w, p parts; u, e_out, e_end,
  s_decay, s0), outputs (o, s_final), scratch (see `state_fwd`)."""
  it = iter(refs)
  take = lambda n: tuple(next(it) for _ in range(n))
  q_g, k_g, w_g, p_g = (take(n_parts) for _ in range(4))
  u_g, e_out_g, e_end_g, sd_g, s0_g, o_g, sf_g = take(7)
  q_s, k_s, w_s, p_s = (take(n_parts) for _ in range(4))
  s_b, vn_b, vd_b = (take(n_parts) for _ in range(3))
  u_s, e_out_s, e_end_s, sd_s, s_s, o_s, bar, s0_bar = take(8)

  bh = jax.lax.axis_index("bh")
  cols = pl.ds(jax.lax.axis_index("v") * bv, bv)
  c = CHUNK

  def store_parts(dst, x):
    """x float32 -> the bf16 operand parts in SMEM, fenced for the wgmma that reads them."""
    for ref, part in zip(dst, _parts(x.astype(f32) if n_parts == 2 else x.astype(bf16)),
                         strict=True):
      ref[...] = part
    plgpu.commit_smem()

  def dot(a, b, shape):
    """sum of a_i @ b_j over the part pairs (0,0), (0,1), (1,0): one float32 accumulator."""
    def body(acc):
      for i, j in ((0, 0), (0, 1), (1, 0))[: 3 if n_parts == 2 else 1]:
        plgpu.wgmma(acc, a[i], b[j])
      return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, f32))

  plgpu.copy_gmem_to_smem(s0_g.at[bh, :, cols], s_s, s0_bar)
  plgpu.barrier_wait(s0_bar)
  store_parts(s_b, s_s[...])

  @pl.loop(0, n_chunks)
  def _(n):
    rows = pl.ds(n * c, c)
    for src, dst in zip((*q_g, *k_g, *w_g, *p_g), (*q_s, *k_s, *w_s, *p_s), strict=True):
      plgpu.copy_gmem_to_smem(src.at[bh, rows], dst, bar)
    plgpu.copy_gmem_to_smem(u_g.at[bh, rows, cols], u_s, bar)
    plgpu.copy_gmem_to_smem(e_out_g.at[bh, rows], e_out_s, bar)
    plgpu.copy_gmem_to_smem(e_end_g.at[bh, rows], e_end_s, bar)
    plgpu.copy_gmem_to_smem(sd_g.at[bh, n], sd_s, bar)
    plgpu.barrier_wait(bar)
    e_out = e_out_s[...]  # [C]: exp(gamma)
    e_end = e_end_s[...]  # [C]: exp(g_last - gamma)
    v_new = u_s[...].astype(f32) - dot(w_s, s_b, (c, bv))
    o = dot(q_s, s_b, (c, bv)) * e_out[:, None]
    store_parts(vn_b, v_new)
    o = o + dot(p_s, vn_b, (c, bv))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's o has left o_s
    o_s[...] = o.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_g.at[bh, rows, cols])
    store_parts(vd_b, v_new * e_end[:, None])
    k_t = tuple(ref.T for ref in k_s)  # K^T as a transposed view of the SMEM tile, no copy
    state = s_s[...] * sd_s[...][:, None] + dot(k_t, vd_b, (s_s.shape[0], bv))
    s_s[...] = state
    store_parts(s_b, state)

  plgpu.copy_smem_to_gmem(s_s, sf_g.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def state_fwd(q, k, w, p, u, e_out, e_end, s_decay, s0, *, out_dtype, interpret):
  """The chunk chain. Arrays in the [B*H, T, *] layout, T a multiple of CHUNK; q, k, w, p are
  float32 or bf16 (split into bf16 parts here); s_decay [B*H, N, K] holds exp(g_last) per chunk
  (a row vector, so no scalar is read from SMEM). Returns o [B*H,T,V] and s_final [B*H,K,V]."""
  bh, t, dk = q.shape
  dv = u.shape[-1]
  bv = min(BLOCK_V, dv)
  n_parts = 1 if q.dtype == bf16 else 2
  parts = [x for a in (q, k, w, p) for x in _parts(a)]
  c = CHUNK
  smem = lambda shape, dtype: plgpu.SMEM(shape, dtype)
  scratch = ([smem((c, dk), bf16)] * (3 * n_parts) + [smem((c, c), bf16)] * n_parts
             + [smem((dk, bv), bf16)] * n_parts + [smem((c, bv), bf16)] * (2 * n_parts)
             + [smem((c, bv), u.dtype), smem((c,), f32), smem((c,), f32), smem((dk,), f32),
                smem((dk, bv), f32), smem((c, bv), out_dtype),
                plgpu.Barrier(num_arrivals=4 * n_parts + 4), plgpu.Barrier(num_arrivals=1)])
  kernel = functools.partial(_state_fwd_kernel, n_parts=n_parts, n_chunks=t // c, bv=bv)
  return plgpu.kernel(
      kernel, out_type=(jax.ShapeDtypeStruct((bh, t, dv), out_dtype),
                        jax.ShapeDtypeStruct((bh, dk, dv), f32)),
      grid=(bh, dv // bv), grid_names=("bh", "v"), scratch_types=scratch, interpret=interpret,
  )(*parts, u, e_out, e_end, s_decay, s0)


def _interpret():
  return False if jax.default_backend() == "gpu" else plgpu.InterpretGPUParams()


def _intra_chunk(q, k, v, gamma, beta, dtype):
  """W, U, P per chunk in pure JAX (the Triton/TPU kernel 1 math, vmapped over [B*H, N]).
  Arrays [B*H, T, *]; float32 intermediates for float32 inputs, bf16 for bf16 ones (as fla)."""
  bh, t, dk = q.shape
  n = t // CHUNK
  cfg = common.KernelConfig(
      chunk_size=CHUNK, block_v=BLOCK_V, block_k=dk, grads_block_v=BLOCK_V,
      compute_dtype=jnp.dtype(dtype).name, intermediate_dtype=jnp.dtype(dtype).name,
      fp32_precision=jax.lax.Precision.HIGHEST, interpret=None)
  chunks = lambda x: x.reshape(bh * n, CHUNK, *x.shape[2:])

  def one(q, k, v, g, b):
    g_col, g_row, b_col, b_row = g[:, None], g[None, :], b[:, None], b[None, :]
    w, u, _ = common.wy_representation(k, v, g_col, g_row, b_col, b_row, cfg)
    return w, u, common.qk_decayed(q, k, g_col, g_row, cfg)

  w, u, p = jax.vmap(one)(*map(chunks, (q, k, v, gamma, beta)))
  back = lambda x: x.reshape(bh, t, x.shape[-1])
  return back(w.astype(dtype)), back(u.astype(dtype)), back(p.astype(dtype))


def _check(q, k, v, chunk_size, delta):
  if not delta:
    raise NotImplementedError("pallas_mosaic_gpu implements the gated delta rule only; the gated "
                              "linear rule runs on 'chunked'")
  if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (bf16, f32):
    raise NotImplementedError(f"pallas_mosaic_gpu takes q, k, v of one dtype, bfloat16 or "
                              f"float32; got {q.dtype}, {k.dtype}, {v.dtype}")
  if chunk_size != CHUNK:
    raise NotImplementedError(f"pallas_mosaic_gpu runs chunk_size {CHUNK} only (a warpgroup's "
                              f"wgmma has M = 64), got {chunk_size}")
  dk, dv = _padded_dims(q.shape[-1], v.shape[-1])
  n_parts = 1 if q.dtype == bf16 else 2
  need = _smem_bytes(n_parts, dk, min(BLOCK_V, dv), v.dtype, v.dtype)
  if need > SMEM_LIMIT:
    raise NotImplementedError(f"pallas_mosaic_gpu: K = {q.shape[-1]} (padded {dk}) in "
                              f"{q.dtype.name} needs {need // 1024} KiB of SMEM, over "
                              f"{SMEM_LIMIT // 1024} KiB")


def _padded_dims(dk, dv):
  """K to a multiple of 64 (the M of K^T Vnew), V to a power of 2 >= 16 (wgmma's N)."""
  return -(-dk // CHUNK) * CHUNK, max(16, common.next_power_of_2(dv))


def _forward(q, k, v, g, beta, s0, scale, use_qk_l2norm):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  dtype = q.dtype
  q, k = base.prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  t_pad = -(-t // CHUNK) * CHUNK
  dk_pad, dv_pad = _padded_dims(dk, dv)

  def heads(x, d=None):
    """[B,T,H,*] -> [B*H, T_pad, d] (or [B*H, T_pad] for [B,T,H]), zero padded."""
    x = jnp.moveaxis(x, 2, 1)
    widths = [(0, 0), (0, 0), (0, t_pad - t)] + ([(0, d - x.shape[-1])] if d else [])
    return jnp.pad(x, widths).reshape(b * h, t_pad, *x.shape[3:-1], *([d] if d else []))

  q, k = heads(q, dk_pad), heads(k, dk_pad)
  v = heads(v, dv_pad)
  g, beta = heads(g.astype(f32)), heads(beta.astype(f32))
  gamma = common.chunk_local_cumsum(g[..., None], CHUNK)[..., 0]  # [B*H, T]
  w, u, p = _intra_chunk(q, k, v, gamma, beta, dtype)
  n = t_pad // CHUNK
  g_last = gamma.reshape(b * h, n, CHUNK)[..., -1:]  # [B*H, N, 1]
  e_out = jnp.exp(gamma)
  e_end = jnp.exp(g_last - gamma.reshape(b * h, n, CHUNK)).reshape(b * h, t_pad)
  s_decay = jnp.broadcast_to(jnp.exp(g_last), (b * h, n, dk_pad))
  s0 = jnp.pad(s0.astype(f32), [(0, 0), (0, 0), (0, dk_pad - dk), (0, dv_pad - dv)])
  o, s_final = state_fwd(q, k, w, p, u, e_out, e_end, s_decay, s0.reshape(b * h, dk_pad, dv_pad),
                         out_dtype=v.dtype, interpret=_interpret())
  o = jnp.moveaxis(o.reshape(b, h, t_pad, dv_pad), 1, 2)[:, :t, :, :dv]
  return o, s_final.reshape(b, h, dk_pad, dv_pad)[:, :, :dk, :dv]


def _chunked_reference(q, k, v, g, beta, s0, scale, use_qk_l2norm):
  return chunked.IMPLEMENTATION.fn(q, k, v, g, beta, s0, scale=scale,
                                   use_qk_l2norm=use_qk_l2norm, chunk_size=CHUNK, delta=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _op(q, k, v, g, beta, s0, scale, use_qk_l2norm):
  return _forward(q, k, v, g, beta, s0, scale, use_qk_l2norm)


def _op_fwd(q, k, v, g, beta, s0, scale, use_qk_l2norm):
  return _forward(q, k, v, g, beta, s0, scale, use_qk_l2norm), (q, k, v, g, beta, s0)


def _op_bwd(scale, use_qk_l2norm, inputs, cotangents):
  # Recomputes the forward with `chunked` and differentiates it: correct, not fast.
  out, vjp = jax.vjp(lambda *xs: _chunked_reference(*xs, scale, use_qk_l2norm), *inputs)
  do, ds_final = cotangents
  return vjp((do.astype(out[0].dtype), ds_final.astype(out[1].dtype)))


_op.defvjp(_op_fwd, _op_bwd)


def gated_delta_rule_mosaic_gpu(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm,
                                chunk_size, delta):
  """Implementation fn (see base.ImplementationFn). GPU interpret mode off-GPU."""
  _check(q, k, v, chunk_size, delta)
  return _op(q, k, v, g, beta, initial_state, float(scale), bool(use_qk_l2norm))


# Not in any default order (api.DEFAULT_ORDER): never timed.
IMPLEMENTATION = base.Implementation(
    NAME, gated_delta_rule_mosaic_gpu,
    "Pallas Mosaic GPU state-passing forward kernel (wgmma), WY terms in pure JAX; backward "
    "recomputes with 'chunked' autodiff (correct, not fast); exact on an H200 and in GPU "
    "interpret mode, never timed; chunk 64 only; by name only")
