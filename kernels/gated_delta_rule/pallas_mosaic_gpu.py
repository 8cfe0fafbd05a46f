"""Pallas Mosaic GPU kernels for the gated delta rule: W, U, T, P and the two state chains.

SLOWER THAN pallas_triton, so available by name only (in no default order). The registered
"pallas_mosaic_gpu" (`pallas_mosaic_gpu_grads.IMPLEMENTATION`) runs these three kernels and the
per-chunk gradient kernel of `pallas_mosaic_gpu_grads`. Validated by
tests/kernels/test_pallas_mosaic_gpu.py and test_mosaic_gpu_grads.py on CPU in GPU interpret mode
(`plgpu.InterpretGPUParams()`) and compiled under jit on one H200 (2026-12-04: every case
passed; float32 ~2e-5 relative to the oracle). Timed there (docs/kernels.md): 2.2 ms fwd+bwd at
(4, 4096, 16, 128) bf16, 1.22x pallas_triton and 2.0x jax-linear-attention; 0.55 ms of it is the
XLA glue around the kernels (layout transposes, casts, the L2 norm) in that run; since then the
kernels read q, k, v, dO and write o, dq, dk, dv in the op's [B, T, H, *] layout (`head_tile`),
which removes the eight [B,T,H,D] <-> [B*H,T,D] transposes of a fwd+bwd call, and XLA forms
neither Qe, Ke nor -W: 0.750 ms fwd, 2.040 fwd+bwd there (exact compiled, same checks). Since
then the forward chain computes the states only and a parallel kernel the outputs (not yet
compiled on a GPU).

Per chunk n of C = 64 tokens (one batch*head; T padded to a multiple of C), with gamma the
chunk-local cumulative log decay, g_last its last entry, D_rs = exp(gamma_r - gamma_s) for
r >= s (causal mask Dc; strictly lower: Ds), q already normalised and scaled, and S_n the
[K,V] state entering the chunk:

  A    = strict_lower(diag(beta) K K^T * D),  T = (I + A)^-1
  W    = T diag(beta exp(gamma)) K = T X,   U = T diag(beta) V = T Y,   P = (Q K^T) * Dc
  Vnew = U - W S_n
  O    = Qe S_n + P Vnew                         Qe = diag(exp(gamma)) Q
  S_n+1 = exp(g_last) S_n + Ke^T Vnew             Ke = diag(exp(g_last - gamma)) K

Backward, with dS_n+1 the gradient of the loss w.r.t. the state leaving chunk n (dS_N =
dS_final, the cotangent of the final state), walking the chunks from last to first:

  dVnew = P^T dO + Ke dS_n+1                                               (reverse kernel)
  dS_n  = exp(g_last) dS_n+1 + Qe^T dO - W^T dVnew ;  dS_0 = d initial_state

and then, per chunk and in parallel, from S_n, dS_n+1, Vnew, dVnew (`_chunk_grads`, the
_pallas_common math of the Triton kernels 4a and 4b):

  dP   = (dO Vnew^T) * Dc
  dQ   = diag(exp(gamma)) dO S_n^T + dP K
  dK   = dP^T Q + diag(exp(g_last - gamma)) Vnew dS_n+1^T               (through O and S_n+1)
  dW   = -dVnew S_n^T,  dU = dVnew
  dT   = dW X^T + dU Y^T,  dA = strict_lower(-T^T dT T^T),  dX = T^T dW,  dY = T^T dU
  dK  += diag(beta exp(gamma)) dX + (dA * beta_col * Ds) K + (dA * beta_col * Ds)^T K
  dV   = diag(beta) dY
  dbeta = rowsum(dX * K) exp(gamma) + rowsum(dY * V) + rowsum(dA * (K K^T * Ds))
  dgamma_r = e_r <dO_r, (S_n^T q_r)> + rowsum(dP * QK^T)_r - colsum(dP * QK^T)_r     (O)
           + rowsum(dX * X)_r + rowsum(dA * A)_r - colsum(dA * A)_r                   (W, T)
           - m_r + [r = C-1] (sum_s m_s + exp(g_last) <dS_n+1, S_n>)                   (S_n+1)
    with m_r = exp(g_last - gamma_r) <k_r, dS_n+1 Vnew_r^T>, e_r = exp(gamma_r).
dgamma becomes dg by autodiff of the chunk-local cumsum; the L2 norm, the scale and the padding
are autodiffed too (everything outside `_core`, whose custom VJP this is).

What runs where:
  - W, U, T and P (the Triton/TPU kernel 1 math): a third Mosaic GPU kernel `intra_fwd`
    (`make_implementation(wy_kernel=False)`, "pallas_mosaic_gpu[jax_wy]": pure JAX instead,
    `_pallas_common.wy_representation` / `qk_decayed` vmapped over (batch*head, chunk)),
    grid (B*H, N), computes them with wgmma: K K^T,
    T = (I + A)^-1 by block doubling from 1x1 blocks (T <- T - T (A_w T), w = 2 .. 32, ten
    [C,C] products at bf16 hi/lo precision for either dtype), W, U (per V-tile) and P. Exact
    interpreted (float32 ~2e-5 relative in the no-decay, aligned-keys regime of issue 15; bf16
    as the pure-JAX path). Compiled on an H200 it failed in Mosaic GPU's layout inference (no
    solution: gamma and beta were loaded as rows and as columns from one SMEM ref, and the CSE
    pass merged the two loads into one, which no relayout turns into both; now two copies each,
    docs/kernels.md). Since then it lowers for CUDA on a CPU, layout inference included
    (`test_kernels_lower_for_a_gpu`), and passed its tests compiled on an H200 (2026-12-04).
  - Forward chain: one `plgpu.kernel`, grid (B*H, V/BV): each program walks the chunks of one
    (batch, head) and one V-tile, carrying the [K,BV] float32 state in SMEM, with two chunk
    products, (-W) S and K^T Vnew (`plgpu.wgmma`); it writes the state entering each chunk and
    Vnew, and nothing else: the outputs are not on the sequential path.
  - Outputs: one `plgpu.kernel` `outputs`, grid (B*H, N x V/BV), in parallel over chunks: O =
    diag(exp(gamma)) Q S_n + P Vnew from the saved states and Vnew (two products).
  - Backward chain: one `plgpu.kernel`, grid (B*H, V/BV), chunks from last to first, carrying
    the [K,BV] float32 dS in SMEM; one [C,BV] accumulator for dVnew (P^T dO and Ke dS: two
    products, one accumulator) and one [K,BV] for Qe^T dO + (-W)^T dVnew. The kernel scales
    the q and k tiles into Qe and Ke in SMEM (in place, by rows), and -W comes negated from the
    WY step (the forward chain adds (-W) S), so XLA forms none of them.
  - The rest of the backward (dq, dk, dv, dgamma, dbeta): the `chunk_grads` hook of
    `make_implementation` (the registered op: `pallas_mosaic_gpu_grads`' kernel), else pure JAX,
    vmapped over chunks (`_chunk_grads`, "pallas_mosaic_gpu[jax_grads]").
  - Precision: every chunk product in both kernels has bf16 operands in SMEM and a float32
    accumulator. bf16 inputs: the state, dS, Vnew, dVnew enter the products rounded to bf16,
    as in the Triton kernels. float32 inputs: each operand is split into bf16 hi + lo parts and
    a product is three wgmmas (hi hi + hi lo + lo hi, error ~2^-16 relative), so that a real
    GPU does not fall back to tf32 (operands split in XLA, before the kernels, by a bit mask:
    `_array_parts` says why). The pure-JAX parts multiply at HIGHEST for float32 inputs.

Written by the forward chain (also outside a VJP: the outputs kernel reads them) and saved for
the backward (which runs no forward again):
  - the state entering each chunk, states [B*H, N, K, V]: float32 for float32 inputs (the
    carried SMEM state), bf16 for bf16 ones (its bf16 operand copy): the Triton kernels'
    precision choice (`intermediate_dtype` = the input dtype);
  - Vnew [B*H, T, V] as its bf16 operand parts (one part for bf16 inputs; hi and lo for float32,
    summed in JAX: float32 to ~2^-16): the chunk-parallel gradients need it (dK, dgamma);
  - W, T (= (I + A)^-1) and P in the input dtype, as the Triton kernel 1 saves them, and the
    prepared q, k, v, gamma, beta.
The backward kernel returns dVnew (parts, as Vnew), dS_n+1 per chunk (float32 / bf16 as the
states) and dS_0 (float32).

Limits (NotImplementedError): the gated delta rule only; bf16 or float32 inputs; chunk_size 64
(a warpgroup's wgmma has M = 64: the [C,*] products need C = 64); K is padded to a multiple of
64 (the [K,BV] products have M = K) and refused where the SMEM buffers of a kernel do not fit
in 200 KiB (`_smem_bytes`, `_out_smem_bytes`, `_bwd_smem_bytes`, and `_intra_smem_bytes` with
the WY kernel). With V-tiles of 64 the backward needs the most but for the WY kernel at
float32 K = 64 (145 against 129 KiB), and the WY kernel fits wherever the backward does, so
the limits are the backward's: bf16 at K > 192 (backward 169 KiB at K = 192, 218 at K = 256;
forward chain 145 and 185, WY 137 and 161); float32, whose operands are bf16 hi/lo pairs, at
K > 64 (backward 129 KiB at K = 64, 209 at K = 128).
T pads to the chunk with g = beta = 0 (identity steps); K and V pad with zeros.

For the profile to judge: the SMEM scratch declares no tiling/swizzle transforms but one
(Mosaic GPU's layout inference assigns them when lowering: the lowered modules tile most wgmma
operands (8, 64), or (64, 8) transposed, with 128-byte swizzles; the exception is the reverse
kernel's Qe at V-tile 32, declared because inference ran out of search steps there: `state_bwd`),
and there is no TMA/compute overlap (each chunk waits for its copies).

Checked only by a compiled run (the H200 runs of 2026-12-04 passed them): GPU interpret mode
runs the TMA copies synchronously, so the fences that keep a tile from being rewritten while a
copy to GMEM still reads it (the `wait_smem_to_gmem(0, wait_read_only=True)` in each chunk) are
not exercised on the CPU, nor are Mosaic GPU's passes after layout inference and the PTX
compilation. All three kernels lower for CUDA on a CPU, layout inference included
(`test_kernels_lower_for_a_gpu`), so a layout failure shows before a GPU is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.gated_delta_rule import _pallas_common as common
from kernels.gated_delta_rule import base
from kernels.platform import target_platform

f32, bf16 = jnp.float32, jnp.bfloat16
NAME = "pallas_mosaic_gpu"
CHUNK = 64  # wgmma's M per warpgroup
BLOCK_V = 64
SMEM_LIMIT = 200 * 1024  # of the H100/H200's 227 KiB per block, some left for the compiler
FWD_KERNEL, BWD_KERNEL = "gdr_mosaic_state_fwd", "gdr_mosaic_state_bwd"
INTRA_KERNEL = "gdr_mosaic_intra_fwd"
OUT_KERNEL = "gdr_mosaic_outputs"


def _parts(x):
  """bf16 operand parts: (x,) for bf16; (hi, lo) for float32 with x ~= hi + lo."""
  if x.dtype == bf16:
    return (x,)
  hi = x.astype(bf16)
  return hi, (x - hi.astype(f32)).astype(bf16)


def _array_parts(x):
  """`_parts` for arrays split outside the kernels, in XLA. There the rounding split is not
  safe: XLA on GPU folds convert(convert(x, bf16), f32) into x (excess precision, on by default;
  openxla/xla#41605), which makes lo exactly 0 under jit and float32 inputs bf16-accurate. So hi
  is x with its low 16 bits cleared (a bf16 value: the cast is exact) and lo = x - hi (exact in
  float32, |lo| < 2^-7 |x|), rounded to bf16: x - hi - lo within 2^-16 |x|, as the rounding
  split. Inside a kernel (`_store_parts`) Mosaic GPU, not XLA, lowers the casts."""
  if x.dtype == bf16:
    return (x,)
  bits = jax.lax.bitcast_convert_type(x.astype(f32), jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), f32)
  return hi.astype(bf16), (x - hi).astype(bf16)


def _join(parts):
  """The inverse of `_parts`: bf16 for one part, float32 hi + lo for two."""
  return parts[0] if len(parts) == 1 else parts[0].astype(f32) + parts[1].astype(f32)


def _smem_bytes(n_parts, dk, bv, u_dtype):
  """SMEM of the forward chain (`state_fwd`): operands K, -W [C,K], S [K,BV], Vnew, Vd [C,BV]
  (bf16 parts), U [C,BV], the float32 S [K,BV], exp(g_last - gamma) [C], exp(g_last) [K]."""
  c = CHUNK
  operands = n_parts * 2 * (2 * c * dk + dk * bv + 2 * c * bv)
  return operands + 4 * dk * bv + c * bv * jnp.dtype(u_dtype).itemsize + 4 * (c + dk)


def _out_smem_bytes(n_parts, dk, bv, out_dtype):
  """SMEM of the outputs kernel (`outputs`): operands Q [C,K], P [C,C], S [K,BV], Vnew [C,BV]
  (bf16 parts), exp(gamma) [C] and the o tile [C,BV]."""
  c = CHUNK
  return (n_parts * 2 * (c * dk + c * c + dk * bv + c * bv) + 4 * c
          + c * bv * jnp.dtype(out_dtype).itemsize)


def _bwd_smem_bytes(n_parts, dk, bv):
  """SMEM of the backward kernel (`state_bwd`): operands Qe, Ke, -W [C,K], P [C,C], dO [C,BV],
  dS [K,BV], dVnew [C,BV] (bf16 parts), the float32 dS [K,BV], exp(g_last) [K] and the row
  scales of q and k [C]."""
  c = CHUNK
  return n_parts * 2 * (3 * c * dk + c * c + 2 * c * bv + dk * bv) + 4 * dk * bv + 4 * dk + 8 * c


def head_tile(ref, bh, heads, rows, cols=slice(None)):
  """The [rows, cols] tile of batch*head `bh` of a [B, T, H, *] array. The op's own arrays (q, k,
  v, o, dO and the gradients of q, k, v) are read and written in that layout, so XLA transposes
  nothing to [B*H, T, *]; the arrays made and used by the kernels only keep [B*H, T, *]."""
  return ref.at[bh // heads, rows, bh % heads, cols]


def _store_parts(dst, x, n_parts):
  """x (float32 value) -> its bf16 operand parts in the SMEM refs `dst`, fenced for the wgmma
  and the TMA copies that read them."""
  for ref, part in zip(dst, _parts(x.astype(f32) if n_parts == 2 else x.astype(bf16)),
                       strict=True):
    ref[...] = part
  plgpu.commit_smem()


def _dot(terms, shape, n_parts):
  """sum over (a, b) in terms of a @ b, each over the part pairs (0,0), (0,1), (1,0) (one pair
  for bf16): wgmmas into one float32 accumulator. a, b are tuples of SMEM refs (parts).

  The result passes through an optimization barrier: reading the accumulator lowers to an
  inline `wgmma.wait_group` with no data dependency on the accumulator registers, so the
  compiler may schedule arithmetic on them before the wait (jax-linear-attention documents
  silently zeroed products from this; our forward passed on an H200 without the barrier)."""
  pairs = ((0, 0), (0, 1), (1, 0)) if n_parts == 2 else ((0, 0),)

  def body(acc):
    for a, b in terms:
      for i, j in pairs:
        plgpu.wgmma(acc, a[i], b[j])
    return acc[...]
  return jax.lax.optimization_barrier(pl.run_scoped(body, plgpu.ACC(shape, f32)))


def _state_fwd_kernel(*refs, n_parts, n_chunks, bv, heads):
  """One (batch*head, V-tile): the chunk chain, states only (the outputs are `outputs`'s, in
  parallel). Refs: inputs (k [B,T,H,K], -W parts; u, e_end, s_decay, s0), outputs (s_final,
  the states entering each chunk, Vnew parts), scratch (see `state_fwd`)."""
  it = iter(refs)
  take = lambda n: tuple(next(it) for _ in range(n))
  k_g, nw_g = (take(n_parts) for _ in range(2))
  u_g, e_end_g, sd_g, s0_g, sf_g, states_g = take(6)
  vn_g = take(n_parts)
  k_s, nw_s, s_b, vn_b, vd_b = (take(n_parts) for _ in range(5))
  u_s, e_end_s, sd_s, s_s, bar, s0_bar = take(6)

  bh = jax.lax.axis_index("bh")
  cols = pl.ds(jax.lax.axis_index("v") * bv, bv)
  c = CHUNK
  store_parts = functools.partial(_store_parts, n_parts=n_parts)
  dot = functools.partial(_dot, n_parts=n_parts)

  plgpu.copy_gmem_to_smem(s0_g.at[bh, :, cols], s_s, s0_bar)
  plgpu.barrier_wait(s0_bar)
  store_parts(s_b, s_s[...])

  @pl.loop(0, n_chunks)
  def _(n):
    rows = pl.ds(n * c, c)
    # The state entering the chunk: float32 (s_s) or its bf16 operand (s_b).
    plgpu.copy_smem_to_gmem(s_s if n_parts == 2 else s_b[0], states_g.at[bh, n, :, cols])
    for src, dst in zip(k_g, k_s, strict=True):
      plgpu.copy_gmem_to_smem(head_tile(src, bh, heads, rows), dst, bar)
    for src, dst in zip(nw_g, nw_s, strict=True):
      plgpu.copy_gmem_to_smem(src.at[bh, rows], dst, bar)
    plgpu.copy_gmem_to_smem(u_g.at[bh, rows, cols], u_s, bar)
    plgpu.copy_gmem_to_smem(e_end_g.at[bh, rows], e_end_s, bar)
    plgpu.copy_gmem_to_smem(sd_g.at[bh, n], sd_s, bar)
    plgpu.barrier_wait(bar)
    e_end = e_end_s[...]  # [C]: exp(g_last - gamma)
    v_new = u_s[...].astype(f32) + dot([(nw_s, s_b)], (c, bv))  # U - W S
    # Every copy to GMEM issued so far (the previous chunk's Vnew, this chunk's state) has read
    # its SMEM source: vn_b, s_s and s_b may be written below.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    store_parts(vn_b, v_new)
    for part, dst in zip(vn_b, vn_g, strict=True):
      plgpu.copy_smem_to_gmem(part, dst.at[bh, rows, cols])
    store_parts(vd_b, v_new * e_end[:, None])
    k_t = tuple(ref.T for ref in k_s)  # K^T as a transposed view of the SMEM tile, no copy
    state = s_s[...] * sd_s[...][:, None] + dot([(k_t, vd_b)], (s_s.shape[0], bv))
    s_s[...] = state
    store_parts(s_b, state)

  plgpu.copy_smem_to_gmem(s_s, sf_g.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def state_fwd(k, neg_w, u, e_end, s_decay, s0, *, interpret):
  """The chunk chain, states only. k [B, T, H, K], neg_w = -W and u [B*H, T, *], T a multiple
  of CHUNK; k and neg_w float32 or bf16 (split into bf16 parts here); s_decay [B*H, N, K] holds
  exp(g_last) per chunk (a row vector, so no scalar is read from SMEM). Returns s_final
  [B*H,K,V] float32, the states entering each chunk [B*H,N,K,V] (float32 for float32 inputs,
  bf16 for bf16) and Vnew [B*H,T,V] as its bf16 operand parts (one, or hi and lo)."""
  b, t, heads, dk = k.shape
  bh = b * heads
  dv = u.shape[-1]
  bv = min(BLOCK_V, dv)
  n_parts = 1 if k.dtype == bf16 else 2
  parts = [x for a in (k, neg_w) for x in _array_parts(a)]
  c = CHUNK
  smem = plgpu.SMEM
  scratch = ([smem((c, dk), bf16)] * (2 * n_parts) + [smem((dk, bv), bf16)] * n_parts
             + [smem((c, bv), bf16)] * (2 * n_parts)
             + [smem((c, bv), u.dtype), smem((c,), f32), smem((dk,), f32), smem((dk, bv), f32),
                plgpu.Barrier(num_arrivals=2 * n_parts + 3), plgpu.Barrier(num_arrivals=1)])
  out_type = ([jax.ShapeDtypeStruct((bh, dk, dv), f32),
               jax.ShapeDtypeStruct((bh, t // c, dk, dv), k.dtype)]
              + [jax.ShapeDtypeStruct((bh, t, dv), bf16)] * n_parts)
  kernel = functools.partial(_state_fwd_kernel, n_parts=n_parts, n_chunks=t // c, bv=bv,
                             heads=heads)
  outs = plgpu.kernel(
      kernel, out_type=tuple(out_type), grid=(bh, dv // bv), grid_names=("bh", "v"),
      scratch_types=scratch, interpret=interpret, kernel_name=FWD_KERNEL,
  )(*parts, u, e_end, s_decay, s0)
  return outs[0], outs[1], tuple(outs[2:])


def _outputs_kernel(*refs, n_parts, nv, heads):
  """One (batch*head, chunk x V-tile): O = diag(exp(gamma)) Q S_n + P Vnew. Refs: inputs (q
  [B,T,H,K], P, S_n, Vnew parts; e_out), output (o [B,T,H,V]), scratch (see `outputs`)."""
  it = iter(refs)
  take = lambda n: tuple(next(it) for _ in range(n))
  q_g, p_g, s_g, vn_g = (take(n_parts) for _ in range(4))
  e_out_g, o_g = take(2)
  q_s, p_s, s_s, vn_s = (take(n_parts) for _ in range(4))
  e_out_s, o_s, bar = take(3)

  bh, i = jax.lax.axis_index("bh"), jax.lax.axis_index("nv")
  n, j = i // nv, i % nv
  c, bv = CHUNK, o_s.shape[1]
  rows, cols = pl.ds(n * c, c), pl.ds(j * bv, bv)
  for src, dst in zip(q_g, q_s, strict=True):
    plgpu.copy_gmem_to_smem(head_tile(src, bh, heads, rows), dst, bar)
  for src, dst in zip(p_g, p_s, strict=True):
    plgpu.copy_gmem_to_smem(src.at[bh, rows], dst, bar)
  for src, dst in zip(s_g, s_s, strict=True):
    plgpu.copy_gmem_to_smem(src.at[bh, n, :, cols], dst, bar)
  for src, dst in zip(vn_g, vn_s, strict=True):
    plgpu.copy_gmem_to_smem(src.at[bh, rows, cols], dst, bar)
  plgpu.copy_gmem_to_smem(e_out_g.at[bh, rows], e_out_s, bar)
  plgpu.barrier_wait(bar)
  e_out = e_out_s[...]  # [C]: exp(gamma)
  o = (_dot([(q_s, s_s)], (c, bv), n_parts) * e_out[:, None]
       + _dot([(p_s, vn_s)], (c, bv), n_parts))
  o_s[...] = o.astype(o_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_s, head_tile(o_g, bh, heads, rows, cols))
  plgpu.wait_smem_to_gmem(0)


def outputs(q, p, states, v_new_parts, e_out, *, out_dtype, interpret):
  """o [B, T, H, V] of every chunk, in parallel, grid (B*H, N x V-tiles): from q [B, T, H, K],
  P [B*H, T, C], the states entering the chunks [B*H, N, K, V] and Vnew's bf16 parts
  [B*H, T, V] (as `state_fwd` returns them), e_out = exp(gamma) [B*H, T]."""
  b, t, heads, dk = q.shape
  bh = b * heads
  dv = states.shape[-1]
  bv = min(BLOCK_V, dv)
  n_parts = len(v_new_parts)
  c = CHUNK
  parts = [x for a in (q, p, states) for x in _array_parts(a)] + list(v_new_parts)
  smem = plgpu.SMEM
  scratch = ([smem((c, dk), bf16)] * n_parts + [smem((c, c), bf16)] * n_parts
             + [smem((dk, bv), bf16)] * n_parts + [smem((c, bv), bf16)] * n_parts
             + [smem((c,), f32), smem((c, bv), out_dtype),
                plgpu.Barrier(num_arrivals=4 * n_parts + 1)])
  return plgpu.kernel(
      functools.partial(_outputs_kernel, n_parts=n_parts, nv=dv // bv, heads=heads),
      out_type=jax.ShapeDtypeStruct((b, t, heads, dv), out_dtype),
      grid=(bh, (t // c) * (dv // bv)), grid_names=("bh", "nv"), scratch_types=scratch,
      interpret=interpret, kernel_name=OUT_KERNEL,
  )(*parts, e_out)


def _state_bwd_kernel(*refs, n_parts, n_chunks, bv, heads):
  """One (batch*head, V-tile): the reverse chunk chain. Refs: inputs (q, k [B,T,H,K], -W, P,
  dO [B,T,H,V] parts; e_out, e_end, s_decay, dS_final), outputs (dVnew parts, dS per chunk,
  dS_0), scratch (see `state_bwd`). Qe and Ke are q and k scaled by rows in SMEM, in place."""
  it = iter(refs)
  take = lambda n: tuple(next(it) for _ in range(n))
  q_g, k_g, nw_g, p_g, do_g = (take(n_parts) for _ in range(5))
  e_out_g, e_end_g, sd_g, dsf_g = take(4)
  dvn_g = take(n_parts)
  dstates_g, ds0_g = take(2)
  qe_s, ke_s, nw_s, p_s, do_s, ds_b, dvn_b = (take(n_parts) for _ in range(7))
  e_out_s, e_end_s, sd_s, ds_s, bar, init_bar = take(6)

  bh = jax.lax.axis_index("bh")
  cols = pl.ds(jax.lax.axis_index("v") * bv, bv)
  c, dk = CHUNK, ds_s.shape[0]
  store_parts = functools.partial(_store_parts, n_parts=n_parts)
  dot = functools.partial(_dot, n_parts=n_parts)
  transposed = lambda refs: tuple(ref.T for ref in refs)  # views of the SMEM tiles, no copy

  plgpu.copy_gmem_to_smem(dsf_g.at[bh, :, cols], ds_s, init_bar)
  plgpu.barrier_wait(init_bar)
  store_parts(ds_b, ds_s[...])

  @pl.loop(0, n_chunks)
  def _(i):
    n = n_chunks - 1 - i
    rows = pl.ds(n * c, c)
    # dS leaving chunk n: float32 (ds_s) or its bf16 operand (ds_b), as the forward's states.
    plgpu.copy_smem_to_gmem(ds_s if n_parts == 2 else ds_b[0], dstates_g.at[bh, n, :, cols])
    for src, dst in zip((*q_g, *k_g), (*qe_s, *ke_s), strict=True):
      plgpu.copy_gmem_to_smem(head_tile(src, bh, heads, rows), dst, bar)
    plgpu.copy_gmem_to_smem(e_out_g.at[bh, rows], e_out_s, bar)
    plgpu.copy_gmem_to_smem(e_end_g.at[bh, rows], e_end_s, bar)
    for src, dst in zip((*nw_g, *p_g), (*nw_s, *p_s), strict=True):
      plgpu.copy_gmem_to_smem(src.at[bh, rows], dst, bar)
    for src, dst in zip(do_g, do_s, strict=True):
      plgpu.copy_gmem_to_smem(head_tile(src, bh, heads, rows, cols), dst, bar)
    plgpu.copy_gmem_to_smem(sd_g.at[bh, n], sd_s, bar)
    plgpu.barrier_wait(bar)
    # Qe = diag(exp(gamma)) q, Ke = diag(exp(g_last - gamma)) k, in place (each thread rewrites
    # the elements it read; the previous chunk's wgmmas that read them have completed).
    for parts, e_s in ((qe_s, e_out_s), (ke_s, e_end_s)):
      x = _join(tuple(plgpu.load(ref, layout=WGMMA) for ref in parts)).astype(f32)
      e = jax.lax.broadcast_in_dim(plgpu.load(e_s, layout=ROWS), x.shape, [0])
      store_parts(parts, x * e)
    # dVnew = P^T dO + Ke dS  [C,BV]
    dv_new = dot([(transposed(p_s), do_s), (ke_s, ds_b)], (c, bv))
    # Every copy to GMEM issued so far (the previous chunk's dVnew, this chunk's dS) has read
    # its SMEM source: dvn_b, ds_s and ds_b may be written below.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    store_parts(dvn_b, dv_new)
    for part, dst in zip(dvn_b, dvn_g, strict=True):
      plgpu.copy_smem_to_gmem(part, dst.at[bh, rows, cols])
    # dS entering the chunk = exp(g_last) dS + Qe^T dO + (-W)^T dVnew  [K,BV]
    d_state = ds_s[...] * sd_s[...][:, None] + dot(
        [(transposed(qe_s), do_s), (transposed(nw_s), dvn_b)], (dk, bv))
    ds_s[...] = d_state
    store_parts(ds_b, d_state)

  plgpu.copy_smem_to_gmem(ds_s, ds0_g.at[bh, :, cols])
  plgpu.wait_smem_to_gmem(0)


def state_bwd(q, k, e_out, e_end, neg_w, p, do, s_decay, ds_final, *, interpret):
  """The reverse chunk chain. q, k and do [B, T, H, *], neg_w = -W and p [B*H, T, *], T a
  multiple of CHUNK (float32 or bf16, split into bf16 parts here); e_out = exp(gamma) and
  e_end = exp(g_last - gamma) [B*H, T] scale q and k into Qe and Ke in the kernel;
  s_decay [B*H, N, K] = exp(g_last), ds_final [B*H, K, V] float32.
  Returns dVnew [B*H,T,V] (float32 = hi + lo, or bf16), dS leaving each chunk [B*H,N,K,V]
  (float32 for float32 inputs, bf16 for bf16) and dS_0 [B*H,K,V] float32."""
  b, t, heads, dk = q.shape
  bh = b * heads
  dv = do.shape[-1]
  bv = min(BLOCK_V, dv)
  n_parts = 1 if q.dtype == bf16 else 2
  parts = [x for a in (q, k, neg_w, p, do) for x in _array_parts(a)]
  c = CHUNK
  smem = plgpu.SMEM
  # At V-tile 32, Mosaic GPU's layout inference ran out of search steps on this kernel (a
  # "Layout inference failed to find a solution" error: the 12-04d failures at V padded to 32):
  # Qe is scaled in place in registers and is then a transposed wgmma operand against dO's
  # 32-wide tile, whose two allowed layouts the search only meets late. Declaring Qe's layout,
  # the one inference gives every tile paired with a 32-wide bf16 tile, lets it finish at once.
  qe = (smem((c, dk), bf16, transforms=(plgpu.TilingTransform((8, 32)),
                                        plgpu.SwizzleTransform(64)))
        if bv == 32 else smem((c, dk), bf16))
  scratch = ([qe] * n_parts + [smem((c, dk), bf16)] * (2 * n_parts) + [smem((c, c), bf16)] * n_parts
             + [smem((c, bv), bf16)] * n_parts + [smem((dk, bv), bf16)] * n_parts
             + [smem((c, bv), bf16)] * n_parts
             + [smem((c,), f32), smem((c,), f32), smem((dk,), f32), smem((dk, bv), f32),
                plgpu.Barrier(num_arrivals=5 * n_parts + 3), plgpu.Barrier(num_arrivals=1)])
  out_type = ([jax.ShapeDtypeStruct((bh, t, dv), bf16)] * n_parts
              + [jax.ShapeDtypeStruct((bh, t // c, dk, dv), q.dtype),
                 jax.ShapeDtypeStruct((bh, dk, dv), f32)])
  kernel = functools.partial(_state_bwd_kernel, n_parts=n_parts, n_chunks=t // c, bv=bv,
                             heads=heads)
  outs = plgpu.kernel(
      kernel, out_type=tuple(out_type), grid=(bh, dv // bv), grid_names=("bh", "v"),
      scratch_types=scratch, interpret=interpret, kernel_name=BWD_KERNEL,
  )(*parts, e_out, e_end, s_decay, ds_final)
  return _join(outs[:n_parts]), outs[n_parts], outs[n_parts + 1]


WGMMA = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # a [C] vector with one value per row of a [C,*] tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def _intra_fwd_kernel(*refs, n_parts, bv, heads):
  """One (batch*head, chunk): W, U, T = (I + A)^-1 and P (the Triton kernel 1 math). Refs: inputs
  (q, k, v [B,T,H,*] parts; gamma, beta), outputs (W, U, T, P [B*H,T,*]), scratch (see
  `intra_fwd`).

  T by block doubling from 1x1 blocks: with T the inverse of the block-diagonal part of I + A
  at block side w (w = 1: the identity) and A_w the blocks (2p+1, 2p) of side w of A,
  T <- T - T (A_w T) is the inverse at side 2w; w = 1 needs no product (T = I - A_1), then
  w = 2 .. 32 take two [C,C] products each, at bf16 hi/lo precision for either input dtype
  (the inverse wants float32 products). Every intermediate is bounded by |A| and |T|.
  """
  it = iter(refs)
  take = lambda n: tuple(next(it) for _ in range(n))
  q_g, k_g, v_g = (take(n_parts) for _ in range(3))
  g_g, b_g, w_g, u_g, t_g, p_g = take(6)
  q_s, k_s, v_s = (take(n_parts) for _ in range(3))
  m_b, t_b = take(2), take(2)  # [C,C] bf16 hi/lo operands of the inverse's products
  # gamma and beta twice each: one copy read as a row vector, one as a column vector. Loads of
  # one ref are merged by the CSE pass before Mosaic GPU's layout inference, which has no
  # relayout between the two (WGMMA.reduce(1) and .reduce(0)) and then finds no solution.
  g_rs, g_cs, b_rs, b_cs, w_o, u_o, t_o, p_o, bar, v_bar = take(10)

  bh = jax.lax.axis_index("bh")
  rows = pl.ds(jax.lax.axis_index("n") * CHUNK, CHUNK)
  c, dk, dv = CHUNK, k_s[0].shape[1], u_g.shape[-1]
  sq = (c, c)
  store_parts = functools.partial(_store_parts, n_parts=n_parts)
  store_wide = functools.partial(_store_parts, n_parts=2)  # the inverse: hi/lo whatever the dtype

  for src, dst in zip((*q_g, *k_g), (*q_s, *k_s), strict=True):
    plgpu.copy_gmem_to_smem(head_tile(src, bh, heads, rows), dst, bar)
  for src, dst in ((g_g, g_rs), (g_g, g_cs), (b_g, b_rs), (b_g, b_cs)):
    plgpu.copy_gmem_to_smem(src.at[bh, rows], dst, bar)
  plgpu.barrier_wait(bar)
  ri = plgpu.broadcasted_iota(jnp.int32, sq, 0, layout=plgpu.Layout.WGMMA)
  ci = plgpu.broadcasted_iota(jnp.int32, sq, 1, layout=plgpu.Layout.WGMMA)
  by_row = lambda x: jax.lax.broadcast_in_dim(x, sq, [0])
  by_col = lambda x: jax.lax.broadcast_in_dim(x, sq, [1])
  g_r, g_c = plgpu.load(g_rs, layout=ROWS), plgpu.load(g_cs, layout=COLS)
  b_r, b_c = plgpu.load(b_rs, layout=ROWS), plgpu.load(b_cs, layout=COLS)
  g_diff = by_row(g_r) - by_col(g_c)
  decay = lambda mask: jnp.where(mask, jnp.exp(jnp.where(mask, g_diff, 0.0)), 0.0)
  k_t = tuple(ref.T for ref in k_s)  # K^T: transposed views of the SMEM tiles

  # A = strict_lower(diag(beta) K K^T * D)
  a = _dot([(k_s, k_t)], sq, n_parts) * decay(ri > ci) * by_row(b_r)
  t = jnp.where(ri == ci, 1.0, 0.0) - jnp.where((jax.lax.rem(ri, 2) == 1) & (ci == ri - 1), a, 0.0)
  w = 2
  while w < c:
    r_blk, c_blk = jax.lax.div(ri, w), jax.lax.div(ci, w)
    a_w = jnp.where((jax.lax.rem(r_blk, 2) == 1) & (c_blk == r_blk - 1), a, 0.0)
    store_wide(m_b, a_w)
    store_wide(t_b, t)
    x = _dot([(m_b, t_b)], sq, 2)  # A_w T; the wgmmas have read m_b when _dot returns
    store_wide(m_b, x)
    t = t - _dot([(t_b, m_b)], sq, 2)  # T (A_w T)
    w *= 2
  t_o[...] = t.astype(t_o.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(t_o, t_g.at[bh, rows])

  # -W = -(T diag(beta exp(gamma))) K, in the input dtype's precision (one pass for bf16, as
  # fla); negated here so that neither chain nor XLA negates it.
  store_parts(m_b[:n_parts], -t * by_col(b_c * jnp.exp(g_c)))
  w_o[...] = _dot([(m_b[:n_parts], k_s)], (c, dk), n_parts).astype(w_o.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(w_o, w_g.at[bh, rows])
  # P = (Q K^T) * Dc
  p_o[...] = (_dot([(q_s, k_t)], sq, n_parts) * decay(ri >= ci)).astype(p_o.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(p_o, p_g.at[bh, rows])
  # U = (T diag(beta)) V, per V-tile.
  store_parts(t_b[:n_parts], t * by_col(b_c))
  for j in range(dv // bv):
    cols = pl.ds(j * bv, bv)
    for src, dst in zip(v_g, v_s, strict=True):
      plgpu.copy_gmem_to_smem(head_tile(src, bh, heads, rows, cols), dst, v_bar)
    plgpu.barrier_wait(v_bar)
    u = _dot([(t_b[:n_parts], v_s)], (c, bv), n_parts)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's U has left u_o
    u_o[...] = u.astype(u_o.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(u_o, u_g.at[bh, rows, cols])
  plgpu.wait_smem_to_gmem(0)


def _intra_smem_bytes(n_parts, dk, bv, dtype):
  """SMEM of the WY kernel (`intra_fwd`): q, k [C,K] and a V-tile of v (bf16 parts), four [C,C]
  bf16 buffers of the inverse, gamma and beta (two copies each), and the output tiles W [C,K],
  U [C,BV], T, P."""
  c, size = CHUNK, jnp.dtype(dtype).itemsize
  return (n_parts * 2 * (2 * c * dk + c * bv) + 4 * 2 * c * c + 16 * c
          + size * (c * dk + c * bv + 2 * c * c))


def intra_fwd(q, k, v, gamma, beta, *, interpret):
  """-W, U, T, P [B*H, T, *] of every chunk by a Mosaic GPU kernel, grid (B*H, N), from q, k, v
  [B, T, H, *] and gamma, beta [B*H, T], T a multiple of CHUNK; outputs in the input dtype, as
  `_intra_chunk`."""
  b, t, heads, dk = q.shape
  bh = b * heads
  dv = v.shape[-1]
  bv = min(BLOCK_V, dv)
  dtype = q.dtype
  n_parts = 1 if dtype == bf16 else 2
  c = CHUNK
  smem = plgpu.SMEM
  scratch = ([smem((c, dk), bf16)] * (2 * n_parts) + [smem((c, bv), bf16)] * n_parts
             + [smem((c, c), bf16)] * 4
             + [smem((c,), f32)] * 4 + [smem((c, dk), dtype), smem((c, bv), dtype)]
             + [smem((c, c), dtype)] * 2
             + [plgpu.Barrier(num_arrivals=2 * n_parts + 4), plgpu.Barrier(num_arrivals=n_parts)])
  out_type = (jax.ShapeDtypeStruct((bh, t, dk), dtype), jax.ShapeDtypeStruct((bh, t, dv), dtype),
              jax.ShapeDtypeStruct((bh, t, c), dtype), jax.ShapeDtypeStruct((bh, t, c), dtype))
  parts = [x for a in (q, k, v) for x in _array_parts(a)]
  return plgpu.kernel(
      functools.partial(_intra_fwd_kernel, n_parts=n_parts, bv=bv, heads=heads),
      out_type=out_type,
      grid=(bh, t // c), grid_names=("bh", "n"), scratch_types=scratch, interpret=interpret,
      kernel_name=INTRA_KERNEL,
  )(*parts, gamma, beta)


def _interpret():
  return False if target_platform() == "gpu" else plgpu.InterpretGPUParams()


def _config(dk, dv, dtype):
  """The _pallas_common config of the pure-JAX chunk math: one K- and one V-tile, operands in
  the input dtype (bf16 products for bf16, as fla), float32 products at HIGHEST."""
  return common.KernelConfig(
      chunk_size=CHUNK, block_v=dv, block_k=dk, grads_block_v=dv,
      compute_dtype=jnp.dtype(dtype).name, intermediate_dtype=jnp.dtype(dtype).name,
      fp32_precision=jax.lax.Precision.HIGHEST, interpret=None)


def _to_bh(x):
  """[B, T, H, *] -> [B*H, T, *] (the pure-JAX parts' layout)."""
  b, t, h = x.shape[:3]
  return jnp.moveaxis(x, 2, 1).reshape(b * h, t, *x.shape[3:])


def _from_bh(x, b):
  """[B*H, T, *] -> [B, T, H, *]."""
  bh, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, bh // b, t, *x.shape[2:]), 1, 2)


def _per_chunk(x):
  """[B*H, T, *] -> [B*H*N, C, *]."""
  return x.reshape(-1, CHUNK, *x.shape[2:])


def _intra_chunk(q, k, v, gamma, beta, dtype):
  """-W, U, T, P per chunk in pure JAX (the Triton/TPU kernel 1 math, vmapped over [B*H, N]), as
  `intra_fwd`: q, k, v [B, T, H, *], gamma, beta [B*H, T]; outputs [B*H, T, *]; float32
  intermediates for float32 inputs, bf16 for bf16 ones (as fla)."""
  q, k, v = map(_to_bh, (q, k, v))
  bh, t, dk = q.shape
  cfg = _config(dk, v.shape[-1], dtype)

  def one(q, k, v, g, b):
    g_col, g_row, b_col, b_row = g[:, None], g[None, :], b[:, None], b[None, :]
    w, u, t_inv = common.wy_representation(k, v, g_col, g_row, b_col, b_row, cfg)
    return -w, u, t_inv, common.qk_decayed(q, k, g_col, g_row, cfg)

  outs = jax.vmap(one)(*map(_per_chunk, (q, k, v, gamma, beta)))
  return tuple(x.astype(dtype).reshape(bh, t, x.shape[-1]) for x in outs)


def _chunk_grads(q, k, v, gamma, beta, t_inv, do, v_new, dv_new, states, d_states):
  """dq, dk, dv, dgamma, dbeta of every chunk from the chains' S_n, dS_n+1, Vnew, dVnew: the
  _pallas_common math of the Triton kernels 4a (through O and S_n+1) and 4b (through W, U, T),
  in pure JAX vmapped over [B*H, N]. The `chunk_grads` contract: q, k, v, do and dq, dk, dv
  [B, T, H, *]; gamma, beta, T, Vnew, dVnew, dgamma, dbeta [B*H, T, *]; states [B*H, N, K, V]."""
  b = q.shape[0]
  q, k, v, do = map(_to_bh, (q, k, v, do))
  bh, t, dk = q.shape
  dv = v.shape[-1]
  cfg = _config(dk, dv, q.dtype)

  def one(q, k, v, g, b, t_inv, do, vn, dvn, s, ds):
    g_col, g_row, b_col, b_row = g[:, None], g[None, :], b[:, None], b[None, :]
    acc = common.qk_grads_vtile(common.qk_grads_init(CHUNK, dk), do, vn, dvn, s, ds, cfg)
    dq, dk_o, dw, dg_col, dg_row = common.qk_grads_finish(acc, q, k, g_col, g_row, cfg)
    out = {}
    dg_col_wy, dg_row_wy, dbeta, _ = common.wy_grads(
        lambda j: k, lambda j: v, lambda j: dw, lambda j: dvn, lambda j: dk_o,
        lambda j, x: out.__setitem__("dk", x), lambda j, x: out.__setitem__("dv", x), 1, 1,
        t_inv.astype(f32), g_col, g_row, b_col, b_row, cfg)
    dgamma = (dg_col + dg_col_wy)[:, 0] + (dg_row + dg_row_wy)[0]
    return dq, out["dk"], out["dv"], dgamma, dbeta[:, 0]

  flat = lambda x: x.reshape(-1, *x.shape[2:])
  outs = jax.vmap(one)(*map(_per_chunk, (q, k, v, gamma, beta, t_inv, do, v_new, dv_new)),
                       flat(states), flat(d_states))
  dq, dk, dv, dgamma, dbeta = (x.reshape(bh, t, *x.shape[2:]) for x in outs)
  return _from_bh(dq, b), _from_bh(dk, b), _from_bh(dv, b), dgamma, dbeta


def _decays(gamma):
  """exp(gamma) [B*H,T], exp(g_last - gamma) [B*H,T] and exp(g_last) [B*H,N,1] per chunk."""
  bh, t = gamma.shape
  per_chunk = gamma.reshape(bh, t // CHUNK, CHUNK)
  g_last = per_chunk[..., -1:]
  return jnp.exp(gamma), jnp.exp(g_last - per_chunk).reshape(bh, t), jnp.exp(g_last)


def _run_forward(q, k, v, gamma, beta, s0, wy_kernel):
  """(o, s_final, the states entering each chunk, Vnew) and (-W, T, P) for the backward."""
  dtype = q.dtype
  if wy_kernel:
    neg_w, u, t_inv, p = intra_fwd(q, k, v, gamma, beta, interpret=_interpret())
  else:
    neg_w, u, t_inv, p = _intra_chunk(q, k, v, gamma, beta, dtype)
  e_out, e_end, s_decay = _decays(gamma)
  s_decay = jnp.broadcast_to(s_decay, (*s_decay.shape[:2], q.shape[-1]))
  s_final, states, v_new_parts = state_fwd(k, neg_w, u, e_end, s_decay, s0,
                                           interpret=_interpret())
  o = outputs(q, p, states, v_new_parts, e_out, out_dtype=v.dtype, interpret=_interpret())
  return (o, s_final, states, _join(v_new_parts)), (neg_w, t_inv, p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _core(q, k, v, gamma, beta, s0, wy_kernel, chunk_grads):
  """(o [B, T, H, V], s_final [B*H, K, V]) from prepared, padded q, k, v [B, T, H, *], gamma
  (the chunk-local cumsum) and beta [B*H, T] and s0 [B*H, K, V];
  W, U, T, P by the Mosaic GPU kernel `intra_fwd` with `wy_kernel`, else in pure JAX; the
  per-chunk gradients by `chunk_grads` (see `make_implementation`), else `_chunk_grads`."""
  return _run_forward(q, k, v, gamma, beta, s0, wy_kernel)[0][:2]


def _core_fwd(q, k, v, gamma, beta, s0, wy_kernel, chunk_grads):
  del chunk_grads
  (o, s_final, states, v_new), (neg_w, t_inv, p) = _run_forward(q, k, v, gamma, beta, s0,
                                                                wy_kernel)
  return (o, s_final), (q, k, v, gamma, beta, neg_w, t_inv, p, states, v_new)


def _core_bwd(wy_kernel, chunk_grads, residuals, cotangents):
  del wy_kernel  # the backward is the same either way
  q, k, v, gamma, beta, neg_w, t_inv, p, states, v_new = residuals
  do, ds_final = cotangents
  dtype = q.dtype
  do = do.astype(dtype)
  e_out, e_end, s_decay = _decays(gamma)
  dv_new, d_states, ds0 = state_bwd(
      q, k, e_out, e_end, neg_w, p, do,
      jnp.broadcast_to(s_decay, (*s_decay.shape[:2], q.shape[-1])), ds_final.astype(f32),
      interpret=_interpret())
  args = (q, k, v, gamma, beta, t_inv, do, v_new, dv_new, states, d_states)
  if chunk_grads is None:
    dq, dk, dv, dgamma, dbeta = _chunk_grads(*args)
  else:
    dq, dk, dv, dgamma, dbeta = chunk_grads(*args, interpret=_interpret())
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgamma, dbeta, ds0)


_core.defvjp(_core_fwd, _core_bwd)


def _check(q, k, v, chunk_size, delta, wy_kernel=False):
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
  bv = min(BLOCK_V, dv)
  needs = {"forward": _smem_bytes(n_parts, dk, bv, v.dtype),
           "outputs": _out_smem_bytes(n_parts, dk, bv, v.dtype),
           "backward": _bwd_smem_bytes(n_parts, dk, bv)}
  if wy_kernel:
    needs["WY"] = _intra_smem_bytes(n_parts, dk, bv, q.dtype)
  need = max(needs.values())
  if need > SMEM_LIMIT:
    each = ", ".join(f"{name} kernel {n // 1024} KiB" for name, n in needs.items())
    raise NotImplementedError(f"pallas_mosaic_gpu: K = {q.shape[-1]} (padded {dk}) in "
                              f"{q.dtype.name} needs {need // 1024} KiB of SMEM, over "
                              f"{SMEM_LIMIT // 1024} KiB ({each})")


def _padded_dims(dk, dv):
  """K to a multiple of 64 (the M of the [K,BV] products), V to a power of 2 >= 16 (wgmma's N)."""
  return -(-dk // CHUNK) * CHUNK, max(16, common.next_power_of_2(dv))


def _forward(q, k, v, g, beta, s0, scale, use_qk_l2norm, wy_kernel, chunk_grads=None):
  """Preparation (L2 norm, scale, padding, cumsum; autodiffed) around `_core`. q, k, v keep
  their [B, T, H, *] layout (the kernels read it in place); g and beta go to [B*H, T]."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  q, k = base.prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  t_pad = -(-t // CHUNK) * CHUNK
  dk_pad, dv_pad = _padded_dims(dk, dv)
  pad = lambda x, d: jnp.pad(x, [(0, 0), (0, t_pad - t), (0, 0), (0, d - x.shape[-1])])
  q, k, v = pad(q, dk_pad), pad(k, dk_pad), pad(v, dv_pad)
  g, beta = (jnp.pad(_to_bh(x.astype(f32)), [(0, 0), (0, t_pad - t)]) for x in (g, beta))
  gamma = common.chunk_local_cumsum(g[..., None], CHUNK)[..., 0]  # [B*H, T]
  s0 = jnp.pad(s0.astype(f32), [(0, 0), (0, 0), (0, dk_pad - dk), (0, dv_pad - dv)])
  o, s_final = _core(q, k, v, gamma, beta, s0.reshape(b * h, dk_pad, dv_pad), wy_kernel,
                     chunk_grads)
  return o[:, :t, :, :dv], s_final.reshape(b, h, dk_pad, dv_pad)[:, :, :dk, :dv]


JAX_WY, JAX_GRADS = "jax_wy", "jax_grads"   # the opt-outs a bracketed name lists


def make_implementation(*, wy_kernel: bool = True, chunk_grads=None) -> base.Implementation:
  """The implementation record. W, U, T, P by the Mosaic GPU kernel `intra_fwd` (`wy_kernel`),
  else in pure JAX; the per-chunk gradients by `chunk_grads`, a function of `_chunk_grads`'s
  arguments and an `interpret` keyword, else by the pure-JAX `_chunk_grads`. The registered
  "pallas_mosaic_gpu" is both kernels (`pallas_mosaic_gpu_grads.IMPLEMENTATION`: that module passes
  its kernel through this hook, so this one does not import it); a pure-JAX part is named in
  brackets, "pallas_mosaic_gpu[jax_wy]", "[jax_grads]", "[jax_wy,jax_grads]" (passed as
  `implementation=`, not registered)."""

  def gated_delta_rule_mosaic_gpu(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm,
                                  chunk_size, delta):
    """Implementation fn (see base.ImplementationFn). GPU interpret mode off-GPU."""
    _check(q, k, v, chunk_size, delta, wy_kernel)
    return _forward(q, k, v, g, beta, initial_state, float(scale), bool(use_qk_l2norm),
                    wy_kernel, chunk_grads)

  pure_jax = [JAX_WY] * (not wy_kernel) + [JAX_GRADS] * (chunk_grads is None)
  if not pure_jax:
    return base.Implementation(
        NAME, gated_delta_rule_mosaic_gpu,
        "Pallas Mosaic GPU kernels (wgmma): W, U, T, P, the forward and reverse state chains, "
        "the per-chunk gradients; exact compiled on an H200, 1.2x slower than pallas_triton "
        "there (fwd+bwd at (4, 4096, 16, 128) bf16); chunk 64 only; by name only")
  return base.Implementation(
      f"{NAME}[{','.join(pure_jax)}]", gated_delta_rule_mosaic_gpu,
      "pallas_mosaic_gpu with " + " and ".join(
          {JAX_WY: "W, U, T, P", JAX_GRADS: "the per-chunk gradients"}[p] for p in pure_jax)
      + " in pure JAX (slower; for comparison)")
