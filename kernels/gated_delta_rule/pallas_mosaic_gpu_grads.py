"""Pallas Mosaic GPU kernel for the per-chunk gradients of the gated delta rule.

Exact compiled on an H200 (2026-12-04, every case of tests/kernels/test_mosaic_gpu_grads.py
under jit), interpreted on a CPU (GPU interpret mode) and lowered for CUDA there.
`make_implementation()` here hands it to `pallas_mosaic_gpu.make_implementation(chunk_grads=...)`
(a hook: that module does not import this one); its `IMPLEMENTATION` is the registered
"pallas_mosaic_gpu" (0.71 of its 2.14 ms of device time fwd+bwd at (4, 4096, 16, 128) bf16).

One `plgpu.kernel`, grid (B*H, N chunks), one warpgroup: per chunk it computes what
`pallas_mosaic_gpu._chunk_grads` (the `_pallas_common` math of the Triton kernels 4a and 4b)
computes, all of it: dq, dk, dv, dgamma, dbeta from q, k, v, gamma, beta, T = (I + A)^-1, dO,
Vnew, dVnew, the state S_n entering the chunk and dS_n+1 leaving it. Notation as the module
docstring of pallas_mosaic_gpu (C = 64, e = exp(gamma), f = exp(g_last - gamma), Dc / Ds the
causal / strictly causal decay matrices, X = diag(beta e) K, Y = diag(beta) V). Every [C,*]
product is a wgmma with bf16 SMEM operands (float32 inputs: hi/lo parts, three wgmmas) and a
float32 accumulator; transposed operands are `.T` views of the SMEM tiles. Sums of a product and
a value (dq, dk below) are added in registers: no accumulator starts from a value (`ACC.init`
needs `pl.run_state`, which GPU interpret mode does not run).

  V-tile loop 1 (BV = 64 columns at a time; one accumulator per product spans the loop):
    Gq  = dO S^T                      [C,K]   (A dO, B S^T)
    dP0 = dO Vnew^T                   [C,C]   (A dO, B Vnew^T)
    sd  = rowsum(S * dS')             [K]     (elementwise, for <dS', S>)
  dP = dP0 * Ds (strictly causal), p = diag(dP0)           dP -> SMEM operand
  dq = diag(e) Gq + dP K + diag(p) K                       (A dP, B K; the last term elementwise)
  V-tile loop 2:
    Gk  = Vnew dS'^T                  [C,K]   (A Vnew, B dS'^T)
    Gw  = dVnew S^T                   [C,K]   (A dVnew, B S^T);  dW = -Gw -> SMEM operand
  dk_O = diag(f) Gk + dP^T Q + diag(p) Q                  (A dP^T, B Q)
  V-tile loop 3:
    dTy = dVnew V^T                   [C,C]   (A dVnew, B V^T)
    dY  = T^T dVnew                   [C,BV]  (A T^T, B dVnew);  dv = diag(beta) dY,
                                               dbeta += rowsum(dY * V)
  dT   = dTy * beta_col + (dW K^T) * (beta e)_col          (A dW, B K^T) -> SMEM
  M    = T^T dT                                            (A T^T, B dT) -> SMEM
  dA   = strict_lower(-M T^T),  dAD = dA * Ds              (A M, B T^T)  -> SMEM
  Z    = dAD K                                             (A dAD, B K)
  dKK  = diag(beta) dAD                                    -> SMEM
  Z2   = dKK^T K                                           (A dKK^T, B K)
  dX   = T^T dW                                            (A T^T, B dW)
  dk   = dk_O + diag(beta) Z + Z2 + diag(beta e) dX
  dbeta += rowsum(k * Z) + e rowsum(k * dX)

dgamma without column sums or Q K^T / K K^T products: the column sums of dP * QK^T and of
dKK * KK^T are row sums of k * (dP^T Q) and k * (dKK^T K), and the row sums are q * (dP K) and
k * (dKK K), so

  dgamma = rowsum(q * (dq - diag(p) K)) - rowsum(k * (dk_O - diag(p) Q))   (through O, S_n+1)
           + beta rowsum(k * Z) - rowsum(k * Z2) + beta e rowsum(k * dX)    (through W, T)
           + [r = C-1] (sum_r f_r rowsum(k * Gk)_r + exp(g_last) sum(sd))   (S_n+1's decay)

(the same terms as `_pallas_common.qk_grads_finish` and `wy_grads`, regrouped). dP's diagonal
adds p_r <q_r, k_r> to the first row sum and takes it from the second: it is left out of both
(and out of the products) rather than cancelled in float32. Where every token forgets the
state (g between -70 and -30: the fla grid's normalizer 0.01) the true dgamma is ~1e-15 and dP
is nearly its diagonal: as products of hi/lo parts (~2^-16) the two terms left dgamma 2e-5
off, compiled and interpreted (the grid's T75K64V64C64s1-float32-n0.01 case); without them,
8e-15. The two scalars are summed as in jax-linear-attention: the per-row vector is stored to
SMEM and read back in the column layout (`.sum()` there).

Mosaic GPU layout inference: every [C] vector that is broadcast is loaded from its own SMEM
buffer in one layout (gamma and beta twice, as ROWS = WGMMA.reduce(1) and COLS =
WGMMA.reduce(0) vectors). Loading one SMEM ref in both layouts makes layout inference fail
("failed to find a solution") as soon as a row broadcast meets a column broadcast (found by
lowering small kernels for CUDA on a CPU; the WY kernel of pallas_mosaic_gpu failed so
and now has two buffers each too).

Measured interpreted (tests/kernels/test_mosaic_gpu_grads.py): against `_chunk_grads` at
HIGHEST on the upcast inputs, float32 ~1.5e-5 relative RMS (hi/lo products), bf16 ~2e-3;
through the VJP against `recurrent`, float32 within 3.7e-5 (dg; the pure-JAX path 8.9e-6 on
that case, dq and dk ~1.5e-5 vs ~3e-6) and bf16 within 1.4e-2 (dg; pure JAX 1.3e-2).

SMEM (`_smem_bytes`; n_parts = 1 for bf16, 2 for float32 hi/lo parts): q, k, dW [C,K], T and
one [C,C] scratch operand (dP, then dT, M, dAD, dKK), two [C,BV] and two [K,BV] V-tile buffers
(loop 1: dO, Vnew, S, dS'; loop 2: dVnew, Vnew, S, dS'; loop 3: dVnew, V; with one V-tile the
resident ones are not loaded again), the staging tiles of dq/dk [C,K] and dv [C,BV] in the
input dtype, and a few [C] / [K] vectors. At V >= 64 (BV = 64): bf16 90 KiB at K = 64, 138 at
K = 128, 186.5 at K = 192 (within 1.5 KiB of the forward kernel's, which refuses K = 256: 235
here); float32 178 KiB at K = 64, 274 at K = 128 (the forward refuses it too). Narrow V needs
less: at float32 K = 128, which the forward accepts for V <= 32, this kernel fits at V = 16
(190 KiB) but not at V = 32 (218 KiB); there `chunk_grads_or_jax` (the hook) runs the pure-JAX
`_chunk_grads` instead (`fits`).
`chunk_grads` itself refuses over 200 KiB (NotImplementedError).

Registers (one warpgroup, a [C,K] float32 value is K/2 registers a thread): the widest points
hold two [C,K] values and a [C,K] accumulator (dk, the product being added, and the `k` rows
reloaded from SMEM for the row sums): by that count ~200 a thread at K = 128 and over the 255
limit at K = 192 (bf16), where the compiler would spill. An estimate, not measured.

Not done (for the profile to judge): no TMA/compute overlap (each V-tile waits for its
copies), no swizzle declared on SMEM (layout inference assigns tilings and swizzles itself when
lowering, as for the other kernels of pallas_mosaic_gpu), one warpgroup (jla's
kernel splits the work over three), the V-tiles are read again by each loop when V > 64, and
float32 arrays are split into hi/lo parts by XLA before the kernel (Vnew is joined from its
parts after the forward and split again here).

Checked only by a compiled run (GPU interpret mode runs wgmma and TMA synchronously; the H200
run of 2026-12-04 passed every case with them): the `wgmma_wait(0)` before a V-tile's buffers
are overwritten by the next tile's copies, the `wait_smem_to_gmem(0, wait_read_only=True)`
fences before the staging tiles are rewritten, the COLS-layout `.sum()` of a vector written in
the ROWS layout, transposed SMEM views as wgmma B operands (S^T, Vnew^T, dS'^T, V^T, K^T, T^T:
jla uses them too), and loop 3's dY accumulator, scoped inside the span of dTy's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.gated_delta_rule import pallas_mosaic_gpu as mgpu

f32, bf16 = jnp.float32, jnp.bfloat16
KERNEL = "gdr_mosaic_chunk_grads"
WGMMA = plgpu.Layout.WGMMA
ROWS, COLS = mgpu.ROWS, mgpu.COLS


def _smem_bytes(n_parts, dk, bv, dtype):
  """SMEM of the kernel: bf16 operands (q, k, dW [C,K]; T, the [C,C] scratch; two [C,BV] and
  two [K,BV] tile buffers), staging tiles in `dtype` (dq/dk [C,K], dv [C,BV]), float32 vectors
  (gamma, beta twice each; the two sums' [C] and [K]; dgamma, dbeta)."""
  c, size = mgpu.CHUNK, jnp.dtype(dtype).itemsize
  operands = n_parts * 2 * (3 * c * dk + 2 * c * c + 2 * c * bv + 2 * dk * bv)
  return operands + size * (c * dk + c * bv) + 4 * (7 * c + dk)


def fits(dtype, dk, dv):
  """Whether the kernel's SMEM fits in SMEM_LIMIT at (padded) K and V for q's dtype."""
  n_parts = 1 if jnp.dtype(dtype) == bf16 else 2
  return _smem_bytes(n_parts, dk, min(mgpu.BLOCK_V, dv), dtype) <= mgpu.SMEM_LIMIT


def _issue(acc, terms, n_parts):
  """wgmmas of sum over (a, b) in terms of a @ b into `acc`, over the part pairs (0,0), (0,1),
  (1,0) (one pair for bf16); a, b are tuples of SMEM refs (parts)."""
  for a, b in terms:
    for i, j in ((0, 0), (0, 1), (1, 0)) if n_parts == 2 else ((0, 0),):
      plgpu.wgmma(acc, a[i], b[j])


def _accumulate(shapes, steps, n_parts):
  """float32 accumulators of `shapes` over the V-tiles: each step(j) copies tile j in and
  returns ([terms per accumulator], side value); the side values are summed. Before each step
  after the first, `wgmma_wait(0)`: the previous tile's wgmmas have read the tile buffers that
  its copies overwrite. The results pass an optimization barrier (see `pallas_mosaic_gpu._dot`).
  One accumulator per product spanning the loop: GPU interpret mode has no `pl.run_state`, so
  no accumulator starts from a value (`ACC.init`)."""

  def body(*accs):
    side = None
    for j, step in enumerate(steps):
      if j:
        plgpu.wgmma_wait(0)
      terms, value = step(j)
      for acc, t in zip(accs, terms, strict=True):
        _issue(acc, t, n_parts)
      side = value if side is None else side + value
    return tuple(acc[...] for acc in accs), side
  return jax.lax.optimization_barrier(
      pl.run_scoped(body, *(plgpu.ACC(shape, f32) for shape in shapes)))


def _dot(terms, shape, n_parts):
  """sum over (a, b) in terms of a @ b into one float32 accumulator (`_accumulate`, one step)."""
  return _accumulate([shape], [lambda j: ([terms], None)], n_parts)[0][0]


def _kernel(*refs, n_parts, bv, nv, heads):
  """One (batch*head, chunk). Refs: inputs (q, k, v, dO [B,T,H,*], Vnew, dVnew, T parts; states,
  dstates parts; gamma, beta), outputs (dq, dk, dv [B,T,H,*], dgamma, dbeta), scratch (see
  `chunk_grads`)."""
  it = iter(refs)
  take = lambda n: tuple(next(it) for _ in range(n))
  q_g, k_g, v_g, do_g, vn_g, dvn_g, t_g, s_g, ds_g = (take(n_parts) for _ in range(9))
  g_g, b_g, dq_g, dk_g, dv_g, dgam_g, dbeta_g = take(7)
  q_s, k_s, dw_s, t_s, sq_s, ta_s, tb_s, s_s, ds_s = (take(n_parts) for _ in range(9))
  (ok_s, ov_s, gr_s, gc_s, br_s, bc_s, m_s, sd_s, dg_s, db_s,
   bar, bar1, bar2, bar3) = take(14)

  bh, n = jax.lax.axis_index("bh"), jax.lax.axis_index("n")
  c, dk = mgpu.CHUNK, q_s[0].shape[1]
  rows = pl.ds(n * c, c)
  sq, sk = (c, c), (c, dk)
  dot = functools.partial(_dot, n_parts=n_parts)
  accumulate = functools.partial(_accumulate, n_parts=n_parts)
  store = functools.partial(mgpu._store_parts, n_parts=n_parts)
  tr = lambda parts: tuple(ref.T for ref in parts)  # transposed views of SMEM tiles, no copy
  load = lambda parts: mgpu._join(tuple(plgpu.load(ref, layout=WGMMA) for ref in parts)
                                  ).astype(f32)
  by_row = lambda x, shape: jax.lax.broadcast_in_dim(x, shape, [0])  # x[r] along row r
  by_col = lambda x, shape: jax.lax.broadcast_in_dim(x, shape, [1])  # x[s] along column s
  rowsum = lambda x: x.sum(axis=1)

  def copy(srcs, dsts, barrier):
    for src, dst in zip(srcs, dsts, strict=True):
      plgpu.copy_gmem_to_smem(src, dst, barrier)

  def tiles(j, which, barrier):
    """Copy V-tile j of the named arrays into the tile buffers and wait."""
    cols = pl.ds(j * bv, bv)
    src = {"do": do_g, "vn": vn_g, "dvn": dvn_g, "v": v_g}
    dst = {"a": ta_s, "b": tb_s}
    for name, buf in which:
      if name in ("s", "ds"):
        copy([g.at[bh, n, :, cols] for g in (s_g if name == "s" else ds_g)],
             s_s if name == "s" else ds_s, barrier)
      elif name in ("do", "v"):  # the op's own arrays, [B, T, H, *]
        copy([mgpu.head_tile(g, bh, heads, rows, cols) for g in src[name]], dst[buf], barrier)
      else:
        copy([g.at[bh, rows, cols] for g in src[name]], dst[buf], barrier)
    plgpu.barrier_wait(barrier)

  copy([mgpu.head_tile(g, bh, heads, rows) for g in (*q_g, *k_g)]
       + [g.at[bh, rows] for g in t_g], (*q_s, *k_s, *t_s), bar)
  copy([g_g.at[bh, rows]] * 2 + [b_g.at[bh, rows]] * 2, (gr_s, gc_s, br_s, bc_s), bar)
  plgpu.barrier_wait(bar)
  g_r, g_c = plgpu.load(gr_s, layout=ROWS), plgpu.load(gc_s, layout=COLS)
  b_r, b_c = plgpu.load(br_s, layout=ROWS), plgpu.load(bc_s, layout=COLS)
  g_last = gr_s[c - 1]
  e_r, e_c, f_r = jnp.exp(g_r), jnp.exp(g_c), jnp.exp(g_last - g_r)
  ri = plgpu.broadcasted_iota(jnp.int32, sq, 0, layout=WGMMA)
  ci = plgpu.broadcasted_iota(jnp.int32, sq, 1, layout=WGMMA)
  g_diff = by_row(g_r, sq) - by_col(g_c, sq)
  decay = lambda mask: jnp.exp(jnp.where(mask, g_diff, -jnp.inf))  # 0 outside the mask

  # Loop 1: Gq = dO S^T, dP0 = dO Vnew^T, sd = rowsum(S * dS').
  def step1(j):
    tiles(j, [("do", "a"), ("vn", "b"), ("s", None), ("ds", None)], bar1)
    return [[(ta_s, tr(s_s))], [(ta_s, tr(tb_s))]], rowsum(load(s_s) * load(ds_s))
  (gq, dp0), sd = accumulate([sk, sq], [step1] * nv)
  # dP's diagonal stays out of the products (and of dgamma, where its terms cancel exactly):
  # dq and dk_O take it elementwise. Products of parts would leave ~2^-16 of it in dgamma.
  dp_diag = rowsum(jnp.where(ri == ci, dp0, 0.0))
  store(sq_s, dp0 * decay(ri > ci))  # dP off its diagonal
  dq = gq * by_row(e_r, sk) + dot([(sq_s, k_s)], sk)
  dg = rowsum(load(q_s) * dq)
  dq = dq + by_row(dp_diag, sk) * load(k_s)
  ok_s[...] = dq.astype(ok_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(ok_s, mgpu.head_tile(dq_g, bh, heads, rows))

  # Loop 2: Gk = Vnew dS'^T, Gw = dVnew S^T (dW = -Gw). With one V-tile, Vnew, S, dS' are in.
  def step2(j):
    tiles(j, [("dvn", "a")] + ([("vn", "b"), ("s", None), ("ds", None)] if nv > 1 else []),
          bar2)
    return [[(tb_s, tr(ds_s))], [(ta_s, tr(s_s))]], None
  (gk, gw), _ = accumulate([sk, sk], [step2] * nv)
  store(dw_s, -gw)
  m_s[...] = rowsum(load(k_s) * gk) * f_r  # its sum goes to the last row's dgamma
  sd_s[...] = sd
  plgpu.commit_smem()
  dk = gk * by_row(f_r, sk) + dot([(tr(sq_s), q_s)], sk)  # dk through O and S_n+1
  dg = dg - rowsum(load(k_s) * dk)
  dk = dk + by_row(dp_diag, sk) * load(q_s)

  # Loop 3: dTy = dVnew V^T (across the V-tiles); per tile dY = T^T dVnew, dv = diag(beta) dY,
  # dbeta += rowsum(dY * V). dVnew is in with one V-tile.
  def step3(j):
    tiles(j, ([("dvn", "a")] if nv > 1 else []) + [("v", "b")], bar3)
    d_y = dot([(tr(t_s), ta_s)], (c, bv))  # waits for every wgmma issued, dTy's too
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous dv tile has left ov_s
    ov_s[...] = (d_y * by_row(b_r, (c, bv))).astype(ov_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(ov_s, mgpu.head_tile(dv_g, bh, heads, rows, pl.ds(j * bv, bv)))
    return [[(ta_s, tr(tb_s))]], rowsum(d_y * load(tb_s))
  (dty,), db = accumulate([sq], [step3] * nv)

  # Through T: dT, M = T^T dT, dA = strict_lower(-M T^T), dAD = dA * Ds.
  d_t = (dty + dot([(dw_s, tr(k_s))], sq) * by_col(e_c, sq)) * by_col(b_c, sq)
  store(sq_s, d_t)
  store(sq_s, dot([(tr(t_s), sq_s)], sq))  # M
  d_ad = -dot([(sq_s, tr(t_s))], sq) * decay(ri > ci)
  store(sq_s, d_ad)
  z = dot([(sq_s, k_s)], sk)
  z_k = rowsum(load(k_s) * z)
  db = db + z_k
  dg = dg + b_r * z_k
  dk = dk + z * by_row(b_r, sk)
  store(sq_s, d_ad * by_row(b_r, sq))  # dKK
  z = dot([(tr(sq_s), k_s)], sk)
  dg = dg - rowsum(load(k_s) * z)
  dk = dk + z
  d_x = dot([(tr(t_s), dw_s)], sk)
  x_k = rowsum(load(k_s) * d_x)
  db = db + x_k * e_r
  dg = dg + x_k * b_r * e_r
  dk = dk + d_x * by_row(b_r * e_r, sk)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dq and dv have left ok_s and ov_s
  ok_s[...] = dk.astype(ok_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(ok_s, mgpu.head_tile(dk_g, bh, heads, rows))

  # The last row: sum_r f_r <k_r, Gk_r> + exp(g_last) <dS', S>, summed in the column layout.
  total = (plgpu.load(m_s, layout=COLS).sum()
           + jnp.exp(g_last) * plgpu.load(sd_s, layout=COLS).sum())
  last = plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=ROWS) == c - 1
  dg_s[...] = dg + jnp.where(last, total, 0.0)
  db_s[...] = db
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(dg_s, dgam_g.at[bh, rows])
  plgpu.copy_smem_to_gmem(db_s, dbeta_g.at[bh, rows])
  plgpu.wait_smem_to_gmem(0)


def chunk_grads(q, k, v, gamma, beta, t_inv, do, v_new, dv_new, states, d_states, *,
                interpret):
  """dq, dk, dv (input dtype), dgamma, dbeta (float32) of every chunk, as
  `pallas_mosaic_gpu._chunk_grads`, by one Mosaic GPU kernel, grid (B*H, N). q, k, v, do and dq,
  dk, dv [B, T, H, *], the other arrays [B*H, T, *], T a multiple of CHUNK and K a multiple of 64;
  states, d_states [B*H, N, K, V] (S_n, dS_n+1); float32 arrays are split into bf16 hi/lo
  operand parts here (`_array_parts`)."""
  b, t, heads, dk = q.shape
  bh = b * heads
  dv = v.shape[-1]
  bv = min(mgpu.BLOCK_V, dv)
  dtype = q.dtype
  n_parts = 1 if dtype == bf16 else 2
  c = mgpu.CHUNK
  if not fits(dtype, dk, dv):
    need = _smem_bytes(n_parts, dk, bv, dtype)
    raise NotImplementedError(f"{KERNEL}: K = {dk} in {jnp.dtype(dtype).name} needs "
                              f"{need // 1024} KiB of SMEM, over {mgpu.SMEM_LIMIT // 1024} KiB")
  smem = plgpu.SMEM
  vec = smem((c,), f32)
  scratch = ([smem((c, dk), bf16)] * (3 * n_parts) + [smem((c, c), bf16)] * (2 * n_parts)
             + [smem((c, bv), bf16)] * (2 * n_parts) + [smem((dk, bv), bf16)] * (2 * n_parts)
             + [smem((c, dk), dtype), smem((c, bv), dtype)] + [vec] * 5 + [smem((dk,), f32)]
             + [vec] * 2
             + [plgpu.Barrier(num_arrivals=3 * n_parts + 4),
                plgpu.Barrier(num_arrivals=4 * n_parts),
                plgpu.Barrier(num_arrivals=(4 if dv > bv else 1) * n_parts),
                plgpu.Barrier(num_arrivals=(2 if dv > bv else 1) * n_parts)])
  out_type = (jax.ShapeDtypeStruct((b, t, heads, dk), dtype),
              jax.ShapeDtypeStruct((b, t, heads, dk), dtype),
              jax.ShapeDtypeStruct((b, t, heads, dv), dtype), jax.ShapeDtypeStruct((bh, t), f32),
              jax.ShapeDtypeStruct((bh, t), f32))
  arrays = (q, k, v, do, v_new, dv_new, t_inv, states, d_states)
  parts = [x for a in arrays for x in mgpu._array_parts(a.astype(dtype))]
  return plgpu.kernel(
      functools.partial(_kernel, n_parts=n_parts, bv=bv, nv=dv // bv, heads=heads),
      out_type=out_type,
      grid=(bh, t // c), grid_names=("bh", "n"), scratch_types=scratch, interpret=interpret,
      kernel_name=KERNEL,
  )(*parts, gamma.astype(f32), beta.astype(f32))


def chunk_grads_or_jax(q, k, v, gamma, beta, t_inv, do, v_new, dv_new, states, d_states, *,
                       interpret):
  """`chunk_grads` where its SMEM fits, else the pure-JAX `pallas_mosaic_gpu._chunk_grads`
  (float32 at K = 128 with V = 32, which the forward accepts)."""
  args = (q, k, v, gamma, beta, t_inv, do, v_new, dv_new, states, d_states)
  if fits(q.dtype, q.shape[-1], v.shape[-1]):
    return chunk_grads(*args, interpret=interpret)
  return mgpu._chunk_grads(*args)


def make_implementation(*, wy_kernel: bool = True):
  """`pallas_mosaic_gpu` with the per-chunk gradients by this kernel: with `wy_kernel` the
  registered "pallas_mosaic_gpu", without it "pallas_mosaic_gpu[jax_wy]"."""
  return mgpu.make_implementation(wy_kernel=wy_kernel, chunk_grads=chunk_grads_or_jax)


# Registered (api.REGISTRY) as "pallas_mosaic_gpu"; in no default order: slower than
# pallas_triton (docs/kernels.md).
IMPLEMENTATION = make_implementation()
