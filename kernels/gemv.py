"""Matrix-vector product y = w @ x for batch-1 decode, a Pallas kernel (Triton back end).

Why: at batch 1 XLA's GPU compiler rewrites a product with a matrix under 10M elements as
multiply + reduce, which reads some decode shapes at a third of the bandwidth (issue 20,
docs/kernels.md "GEMV for batch-1 decode"). This kernel streams the matrix once, near bandwidth.

w is [N, K] row-major (the decode layouts' [out, in]). The grid runs over blocks of `block_rows`
(BN) output rows: each program reads its [BN, K] slab of w (contiguous in memory) in [BN, BK]
tiles, multiplies each by the matching chunk of x, accumulates elementwise in float32 and reduces
the [BN, BK] accumulator to [BN] once at the end.

Shapes that the blocks do not divide: the kernel only ever reads in bounds. It covers the first
N0 = BN * (N // BN) rows and the first K0 = BK * (K // BK) columns; the rest (fewer than BN rows,
fewer than BK columns) is a plain jnp product added around it. The decode shapes of the model
sizes in configs have no remainder, so they run the kernel alone.

Off a GPU (CI) the kernel runs with `interpret=True`. Differentiable (`jax.custom_vjp`, backward
in plain jnp), though decode never differentiates it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.platform import target_platform

f32 = jnp.float32

# At least this many programs where N allows: two per SM of a 132-SM H100/H200.
_TARGET_PROGRAMS = 264
# Measured on an H200 (bf16, the 300m decode shapes, docs/kernels.md): [8, 1024] tiles with 8
# warps were the fastest or within 2% of it at every shape; 64-row or 128-column tiles, more
# pipeline stages, or reducing at every K step instead of once were not faster.
_MAX_BLOCK_ROWS = 8
_MAX_BLOCK_K = 1024
# The float32 accumulator tile [BN, BK] lives in registers: at most this many elements by default.
_MAX_TILE = 8192
_WIDE_TILE = 2048   # tiles at least this large get 8 warps by default, smaller ones 4


class _Config(NamedTuple):
  block_rows: int
  block_k: int
  num_warps: int
  num_stages: int
  interpret: bool


def _pow2_floor(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)


def _check_pow2(name: str, value: int | None) -> None:
  if value is not None and (not isinstance(value, int) or value < 1 or value & (value - 1)):
    raise ValueError(f"{name}: must be a power of two >= 1 (Triton tiles are), got {value!r}")


def default_blocks(n: int, k: int) -> tuple[int, int]:
  """(block_rows, block_k) for w [n, k]: BN the largest power of two <= n / 264 in [1, 8] (so
  the grid has about two programs per SM when n allows), BK the largest power of two <= k in
  [16, 1024] that keeps the [BN, BK] accumulator at most 8192 elements."""
  bn = min(_MAX_BLOCK_ROWS, _pow2_floor(n // _TARGET_PROGRAMS))
  bk = max(16, min(_MAX_BLOCK_K, _pow2_floor(k), _MAX_TILE // bn))
  return bn, bk


def resolve_blocks(n: int, k: int, block_rows: int | None = None, block_k: int | None = None
                   ) -> tuple[int, int]:
  """The (BN, BK) that `gemv` runs: the given ones, else `default_blocks`, clamped to the
  largest powers of two <= n and <= k (a block larger than the matrix would leave the whole
  product to the jnp remainder path)."""
  bn, bk = default_blocks(n, k)
  return min(block_rows or bn, _pow2_floor(n)), min(block_k or bk, _pow2_floor(k))


def _kernel(x_ref, w_ref, o_ref, *, block_rows, block_k, steps):
  row0 = pl.program_id(0) * block_rows

  def step(j, acc):
    cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    w = w_ref[pl.ds(row0, block_rows), cols].astype(acc.dtype)
    return acc + w * x_ref[cols].astype(acc.dtype)[None, :]

  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_rows, block_k), o_ref.dtype))
  o_ref[...] = jnp.sum(acc, axis=1)


def _accum_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, f32)


def _forward(x: jax.Array, w: jax.Array, cfg: _Config) -> jax.Array:
  n, k = w.shape
  bn, bk = cfg.block_rows, cfg.block_k
  n0, k0 = bn * (n // bn), bk * (k // bk)
  acc_dtype = _accum_dtype(x.dtype)
  parts = []
  if n0 and k0:
    params = None if cfg.interpret else pltr.CompilerParams(num_warps=cfg.num_warps,
                                                            num_stages=cfg.num_stages)
    # x and w unblocked (whole arrays): the kernel indexes its own rows and K chunks.
    main = pl.pallas_call(
        functools.partial(_kernel, block_rows=bn, block_k=bk, steps=k0 // bk),
        grid=(n0 // bn,),
        in_specs=[pl.BlockSpec(x.shape, lambda i: (0,)), pl.BlockSpec(w.shape, lambda i: (0, 0))],
        out_specs=pl.BlockSpec((bn,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((n0,), acc_dtype),
        interpret=cfg.interpret, compiler_params=params, name="gemv")(x, w)
    if k0 < k:     # the last K - K0 columns, fewer than BK
      main = main + jnp.dot(w[:n0, k0:], x[k0:], preferred_element_type=acc_dtype)
    parts.append(main)
  elif n0:
    parts.append(jnp.dot(w[:n0], x, preferred_element_type=acc_dtype))
  if n0 < n:       # the last N - N0 rows, fewer than BN
    parts.append(jnp.dot(w[n0:], x, preferred_element_type=acc_dtype))
  y = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gemv(x, w, cfg):
  return _forward(x, w, cfg)


def _gemv_fwd(x, w, cfg):
  return _forward(x, w, cfg), (x, w)


def _gemv_bwd(cfg, res, g):
  x, w = res
  acc = _accum_dtype(x.dtype)
  dx = jnp.dot(g.astype(acc), w.astype(acc)).astype(x.dtype)
  dw = jnp.outer(g.astype(acc), x.astype(acc)).astype(w.dtype)
  return dx, dw


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


def gemv(x: jax.Array, w: jax.Array, *, interpret: bool | None = None,
         block_rows: int | None = None, block_k: int | None = None,
         num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """y [N] = w [N, K] @ x [K], in x's dtype, accumulated in float32 (float64 for float64 x).

  w is cast to x's dtype first (as `sleep_lm.model.layers.Linear` casts both to its compute dtype);
  pass equal dtypes, or the cast is a copy of w at every call.

  interpret: run the kernel in Pallas' interpreter; None: unless the computation
    targets a GPU (`kernels.platform.target_platform`).
  block_rows, block_k: the [BN, BK] tile (powers of two, clamped to the matrix:
    `resolve_blocks`); None: `default_blocks`.
  num_warps, num_stages: Triton launch settings (ignored when interpreted); None: 4 warps (8
    when the tile has 2048 elements or more), 3 stages.
  """
  if jnp.ndim(x) != 1:
    raise ValueError(f"x: must be a vector [K] (batch 1; reshape first), got shape {x.shape}")
  if jnp.ndim(w) != 2 or w.shape[1] != x.shape[0]:
    raise ValueError(f"w: must be a matrix [N, K] with K = x.shape[0] = {x.shape[0]}, got "
                     f"shape {w.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x: must have a floating dtype, got {x.dtype}")
  _check_pow2("block_rows", block_rows)
  _check_pow2("block_k", block_k)
  for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{name}: must be a positive int, got {value!r}")
  n, k = w.shape
  bn, bk = resolve_blocks(n, k, block_rows, block_k)
  if num_warps is None:
    num_warps = 8 if bn * bk >= _WIDE_TILE else 4
  if interpret is None:
    interpret = target_platform() != "gpu"
  cfg = _Config(bn, bk, num_warps, 3 if num_stages is None else num_stages, bool(interpret))
  return _gemv(x, w.astype(x.dtype), cfg)


def gemv_bytes(n: int, k: int, dtype) -> int:
  """Bytes of w [n, k] in `dtype`: what one call has to read (x and y are negligible)."""
  return math.prod((n, k)) * jnp.dtype(dtype).itemsize
