"""The SwiGLU MLP y = (SiLU(x Wg) * (x Wu)) Wd with its hidden activations kept off HBM where
they need not be there: two Pallas kernels (Triton back end) around XLA's matrix products.

Why: in the Rule 110 train step (width 256, hidden 1024) the MLP's [tokens, hidden] tensors are
a third of the HBM bytes the compiled step moves (`experiments/throughput.py --plan h200`,
docs/performance.md). XLA writes x Wg and x Wu to HBM, reads them back to form the product, and in
the backward reads both again with the incoming gradient. Here:

  forward   kernel `_up`: per [BM rows, BF hidden] tile, x Wg and x Wu accumulate in registers
            (float32) and only h = SiLU(g) * u is written; y = h Wd is XLA's product.
  backward  kernel `_up_bwd`: per tile, recomputes g and u from x and forms dh = dy Wd^T in the
            same K loop (the MLP's width is both products' K), then writes dg and du only, side
            by side in one [M, 2, F] buffer; dWd = h^T dy, [dWg | dWu] = x^T [dg | du] and
            dx = [dg | du] [Wg | Wu]^T are XLA's, one product each.

Compiled for an H200 (`sleep_lm.common.kernel_plan`) at the Rule 110 shape (36,864 rows, 256 ->
1,024, bf16), the gradient of sum(MLP(x) * dy) moves 10.2 hidden-sized tensors' worth of HBM
bytes instead of XLA's 21.5, for two more [BM, K] x [K, BF] products per tile in the backward
(+22% of the MLP's FLOPs); docs/kernels.md.

Off a GPU (CI) the kernels run with `interpret=True`. Float32 inputs use 3-pass tf32 products in
the kernels on a GPU (float32 accuracy), HIGHEST when interpreted.
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

_BLOCK_K = 64          # the K step of the in-kernel products (the MLP's width is a multiple)
_DEFAULT_ROWS = 64
_DEFAULT_HIDDEN = 128


class _Config(NamedTuple):
  block_rows: int
  block_hidden: int
  block_k: int
  num_warps: int
  num_stages: int
  precision: object
  interpret: bool


def _dot(a, b, precision, *, trans_b=False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _up_kernel(x_ref, wg_ref, wu_ref, h_ref, *, cfg: _Config, steps: int):
  def step(k, acc):
    cols = pl.ds(pl.multiple_of(k * cfg.block_k, cfg.block_k), cfg.block_k)
    x = x_ref[:, cols]
    return (acc[0] + _dot(x, wg_ref[cols, :], cfg.precision),
            acc[1] + _dot(x, wu_ref[cols, :], cfg.precision))

  zeros = jnp.zeros(h_ref.shape, f32)
  g, u = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
  h_ref[...] = (g * jax.nn.sigmoid(g) * u).astype(h_ref.dtype)


def _up_bwd_kernel(x_ref, dy_ref, wg_ref, wu_ref, wd_ref, dgu_ref, *, cfg: _Config, steps: int):
  def step(k, acc):
    cols = pl.ds(pl.multiple_of(k * cfg.block_k, cfg.block_k), cfg.block_k)
    x = x_ref[:, cols]
    return (acc[0] + _dot(x, wg_ref[cols, :], cfg.precision),
            acc[1] + _dot(x, wu_ref[cols, :], cfg.precision),
            acc[2] + _dot(dy_ref[:, cols], wd_ref[:, cols], cfg.precision, trans_b=True))

  zeros = jnp.zeros((dgu_ref.shape[0], dgu_ref.shape[2]), f32)
  g, u, dh = jax.lax.fori_loop(0, steps, step, (zeros, zeros, zeros))
  s = jax.nn.sigmoid(g)
  dgu_ref[:, 0, :] = (dh * u * s * (1 + g * (1 - s))).astype(dgu_ref.dtype)
  dgu_ref[:, 1, :] = (dh * g * s).astype(dgu_ref.dtype)


def _call(kernel, name: str, cfg: _Config, rows: int, hidden: int, in_specs, parts: int, dtype):
  """The kernel over a (rows, hidden) grid of tiles; its output [rows, hidden] (parts 1) or
  [rows, parts, hidden] (each tile of every part written by the same program)."""
  grid = (rows // cfg.block_rows, hidden // cfg.block_hidden)
  if parts == 1:
    tile = pl.BlockSpec((cfg.block_rows, cfg.block_hidden), lambda i, j: (i, j))
    shape = (rows, hidden)
  else:
    tile = pl.BlockSpec((cfg.block_rows, parts, cfg.block_hidden), lambda i, j: (i, 0, j))
    shape = (rows, parts, hidden)
  params = None if cfg.interpret else pltr.CompilerParams(num_warps=cfg.num_warps,
                                                          num_stages=cfg.num_stages)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=tile,
                        out_shape=jax.ShapeDtypeStruct(shape, dtype), interpret=cfg.interpret,
                        compiler_params=params, name=name)


def _specs(cfg: _Config, d: int):
  rows = pl.BlockSpec((cfg.block_rows, d), lambda i, j: (i, 0))       # x, dy: whole width
  cols = pl.BlockSpec((d, cfg.block_hidden), lambda i, j: (0, j))     # Wg, Wu: [D, BF]
  down = pl.BlockSpec((cfg.block_hidden, d), lambda i, j: (j, 0))     # Wd: [BF, D]
  return rows, cols, down


def _up(x, wg, wu, cfg: _Config):
  (m, d), f = x.shape, wg.shape[1]
  rows, cols, _ = _specs(cfg, d)
  kernel = functools.partial(_up_kernel, cfg=cfg, steps=d // cfg.block_k)
  return _call(kernel, "swiglu_up", cfg, m, f, [rows, cols, cols], 1, x.dtype)(x, wg, wu)


def _up_bwd(x, dy, wg, wu, wd, cfg: _Config):
  """[dg | du] as [M, 2, F]: one buffer, so that dx and the two matrices' gradients are one
  product each."""
  (m, d), f = x.shape, wg.shape[1]
  rows, cols, down = _specs(cfg, d)
  kernel = functools.partial(_up_bwd_kernel, cfg=cfg, steps=d // cfg.block_k)
  return _call(kernel, "swiglu_up_bwd", cfg, m, f, [rows, rows, cols, cols, down], 2,
               x.dtype)(x, dy, wg, wu, wd)


def _mm(a, b, dims):
  return jax.lax.dot_general(a, b, (dims, ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mlp(x, wg, wu, wd, cfg):
  return _mm(_up(x, wg, wu, cfg), wd, ((1,), (0,)))


def _mlp_fwd(x, wg, wu, wd, cfg):
  h = _up(x, wg, wu, cfg)
  return _mm(h, wd, ((1,), (0,))), (x, wg, wu, wd, h)


def _mlp_bwd(cfg, res, dy):
  x, wg, wu, wd, h = res
  dgu = _up_bwd(x, dy, wg, wu, wd, cfg)                    # [M, 2, F]
  dx = _mm(dgu, jnp.stack([wg, wu], axis=1), ((1, 2), (1, 2)))
  dw = _mm(x, dgu, ((0,), (0,)))                           # [D, 2, F]
  return dx, dw[:, 0], dw[:, 1], _mm(h, dy, ((0,), (0,)))


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def _valid_block(value, hidden: int | None = None) -> bool:
  return (isinstance(value, int) and value >= 16 and not value & (value - 1)
          and not (hidden or value) % value)


def default_tiles_fit(d: int, f: int) -> bool:
  """Whether `swiglu_mlp` with its default tiles takes width D and hidden width F (D a multiple
  of 64; F a multiple of 128, or 16, 32 or 64)."""
  return d % _BLOCK_K == 0 and _valid_block(min(_DEFAULT_HIDDEN, f), f)


def _check_block(name: str, value, hidden: int | None = None) -> None:
  if not _valid_block(value, hidden):
    raise ValueError(f"swiglu_mlp: {name}={value!r} must be a power of two >= 16 (Triton tiles "
                     f"are)" + (f" that divides the hidden width F={hidden}" if hidden else ""))


def swiglu_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
               block_rows: int | None = None, block_hidden: int | None = None,
               num_warps: int = 4, num_stages: int = 2,
               interpret: bool | None = None) -> jax.Array:
  """(SiLU(x Wg) * (x Wu)) Wd for x [..., D], Wg and Wu [D, F], Wd [F, D], in x's dtype (pass
  the weights in it too); float32 accumulation, the gate and product formed in float32 before h
  is rounded to x's dtype. Differentiable in every argument (`jax.custom_vjp`).

  D must be a multiple of 64 and F of `block_hidden` (default 128, at most F); rows that
  `block_rows` (default 64) does not divide are zero-padded. interpret: None runs the kernels
  compiled when the traced computation targets a GPU (`kernels.platform.target_platform`)."""
  d, f = w_gate.shape
  if x.shape[-1] != d or w_up.shape != (d, f) or w_down.shape != (f, d):
    raise ValueError(f"swiglu_mlp: need x [..., D], w_gate and w_up [D, F], w_down [F, D]; got "
                     f"x {x.shape}, w_gate {w_gate.shape}, w_up {w_up.shape}, "
                     f"w_down {w_down.shape}")
  if not x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype:
    raise ValueError(f"swiglu_mlp: x and the weights must share a dtype, got {x.dtype}, "
                     f"{w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")
  if d % _BLOCK_K:
    raise ValueError(f"swiglu_mlp: the width D={d} must be a multiple of {_BLOCK_K}")
  bf = block_hidden or min(_DEFAULT_HIDDEN, f)
  bm = block_rows or _DEFAULT_ROWS
  _check_block("block_hidden", bf, f)
  _check_block("block_rows", bm)
  if interpret is None:
    interpret = target_platform() != "gpu"
  if interpret:
    precision = jax.lax.Precision.HIGHEST
  elif x.dtype == f32:
    precision = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  else:
    precision = None
  cfg = _Config(bm, bf, _BLOCK_K, num_warps, num_stages, precision, bool(interpret))
  lead = x.shape[:-1]
  rows = math.prod(lead)
  flat = x.reshape(rows, d)
  pad = -rows % bm
  if pad:
    flat = jnp.pad(flat, ((0, pad), (0, 0)))
  y = _mlp(flat, w_gate, w_up, w_down, cfg)
  return (y[:rows] if pad else y).reshape(*lead, d)
