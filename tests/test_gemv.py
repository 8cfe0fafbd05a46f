"""kernels.gemv against a float64 numpy oracle (interpreted on the CPU, compiled on a GPU).

Small shapes by default, chosen so the blocks exercise several programs, several K steps and both
remainders (rows past the last full block, columns past the last full K chunk); the decode shapes
of the 300m model run too (the interpreter runs the grid as one loop: well under a second each),
in float32 only under -m slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gemv import default_blocks, gemv, resolve_blocks
from tests.numerics import rel_rms


def _inputs(n, k, dtype, seed):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.standard_normal(k), dtype)
  w = jnp.asarray(r.standard_normal((n, k)) / np.sqrt(k), dtype)
  return x, w


def _oracle(x, w):
  """w @ x in float64 from the inputs as given (already rounded to their dtype)."""
  return np.asarray(w, np.float64) @ np.asarray(x, np.float64)


# (n, k, block_rows, block_k): None = the default blocks.
SMALL = [(64, 128, 16, 32),       # 4 programs x 4 K steps, no remainder
         (37, 300, 8, 64),        # 32 rows + 5 in jnp; 256 columns + 44 in jnp
         (37, 300, None, None),   # default blocks (1, 256): 37 programs, a column remainder
         (5, 8, 8, 16),           # blocks clamped to (4, 8): one program, a row remainder
         (3, 5, None, None)]      # default blocks (1, 4): three programs, a column remainder
BIG = [(1024, 1024), (3072, 1024), (1024, 4096)]


@pytest.mark.parametrize("n,k,bn,bk", SMALL)
def test_float32_matches_float64_oracle(n, k, bn, bk):
  x, w = _inputs(n, k, jnp.float32, seed=n + k)
  got = jax.jit(lambda x, w: gemv(x, w, block_rows=bn, block_k=bk))(x, w)
  assert got.shape == (n,) and got.dtype == jnp.float32
  err = rel_rms(got, _oracle(x, w))
  assert err < 1e-6, err


def _check_bf16(got, want):
  """Rounding the result to bfloat16 costs up to half a bf16 ulp (relative 2^-9); float32
  accumulation adds ~1e-7. So every element lies within one bf16 ulp of the exact value (with a
  floor for elements near zero, where cancellation leaves the accumulation error the larger)."""
  assert got.dtype == jnp.bfloat16
  got64 = np.asarray(got, np.float64)
  assert rel_rms(got, want) < 1e-2
  ulp = np.abs(want) * 2.0 ** -7 + 1e-5 * np.sqrt(np.mean(want ** 2))
  bad = np.abs(got64 - want) > ulp
  assert not bad.any(), (np.flatnonzero(bad), got64[bad], want[bad])


@pytest.mark.parametrize("n,k,bn,bk", SMALL[:2])
def test_bfloat16_accumulates_in_float32(n, k, bn, bk):
  x, w = _inputs(n, k, jnp.bfloat16, seed=2 * n + k)
  _check_bf16(jax.jit(lambda x, w: gemv(x, w, block_rows=bn, block_k=bk))(x, w), _oracle(x, w))


def test_w_is_cast_to_x_dtype():
  x, w = _inputs(64, 128, jnp.float32, seed=3)
  xb = x.astype(jnp.bfloat16)
  got = gemv(xb, w, block_rows=16, block_k=32)
  _check_bf16(got, _oracle(xb, w.astype(jnp.bfloat16)))


@pytest.mark.parametrize("n,k,bn,bk", SMALL[:2])
def test_gradients_match_analytic(n, k, bn, bk):
  x, w = _inputs(n, k, jnp.float32, seed=5 * n + k)
  c = jnp.asarray(np.random.default_rng(7).standard_normal(n), jnp.float32)
  loss = lambda x, w: jnp.sum(c * gemv(x, w, block_rows=bn, block_k=bk))
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  c64 = np.asarray(c, np.float64)
  assert rel_rms(dx, c64 @ np.asarray(w, np.float64)) < 1e-6
  assert rel_rms(dw, np.outer(c64, np.asarray(x, np.float64))) < 1e-6


def test_default_blocks():
  # Two programs per SM of a 132-SM GPU where N allows, at most [8, 1024] (measured).
  assert default_blocks(1024, 1024) == (2, 1024)
  assert default_blocks(8192, 1024) == (8, 1024)
  assert default_blocks(32000, 1024) == (8, 1024)
  assert default_blocks(1024, 4096) == (2, 1024)
  assert default_blocks(37, 300) == (1, 256)
  assert default_blocks(5, 8) == (1, 16)
  assert resolve_blocks(5, 8) == (1, 8)                       # clamped to the matrix
  assert resolve_blocks(1024, 1024, 64, 4096) == (64, 1024)
  assert resolve_blocks(1024, 4096, None, 2048) == (2, 2048)


def test_refuses_bad_arguments():
  x, w = _inputs(8, 16, jnp.float32, seed=0)
  with pytest.raises(ValueError, match="x: must be a vector"):
    gemv(x[None], w)
  with pytest.raises(ValueError, match="w: must be a matrix"):
    gemv(x[:8], w)
  with pytest.raises(ValueError, match="block_rows: must be a power of two"):
    gemv(x, w, block_rows=3)
  with pytest.raises(ValueError, match="block_k: must be a power of two"):
    gemv(x, w, block_k=0)
  with pytest.raises(ValueError, match="num_warps: must be a positive int"):
    gemv(x, w, num_warps=0)
  with pytest.raises(ValueError, match="x: must have a floating dtype"):
    gemv(jnp.arange(16), w)


@pytest.mark.parametrize("n,k", BIG)
@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.bfloat16])
def test_decode_shapes(n, k, dtype):
  x, w = _inputs(n, k, dtype, seed=n ^ k)
  got = jax.jit(gemv)(x, w)
  if dtype == jnp.float32:
    assert rel_rms(got, _oracle(x, w)) < 1e-6
  else:
    _check_bf16(got, _oracle(x, w))
