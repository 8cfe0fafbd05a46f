"""The Mosaic GPU per-chunk gradient kernel (`pallas_mosaic_gpu_grads`: the registered
"pallas_mosaic_gpu", opt-in by name; without the WY kernel `make_implementation(wy_kernel=False)`).

On a CPU it runs in GPU interpret mode (slow: small cases by default, the others under -m slow)
and is lowered for CUDA (Mosaic GPU layout inference included); compiled on an H200 the whole
file passed (2026-12-04 and 2026-12-05, docs/kernels.md).
Against the pure-JAX `pallas_mosaic_gpu._chunk_grads` on fresh random inputs (the kernel alone)
and, through the whole VJP, against the `recurrent` oracle as `test_matches_oracle`. Everything:
  python -m pytest -q -n 0 tests/kernels/test_mosaic_gpu_grads.py -m "slow or not slow"
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from test_pallas import assert_close, make_inputs
from test_pallas_mosaic_gpu import (
  CASES,
  TOLERANCE,
  _kernel_calls,
  case_id,
  case_inputs,
  names_of,
  op,
  oracle_vjp,
  vjp_of,
)

from kernels.gated_delta_rule import _pallas_common as common
from kernels.gated_delta_rule import api, pallas_mosaic_gpu
from kernels.gated_delta_rule import pallas_mosaic_gpu_grads as grads

m = pallas_mosaic_gpu
IMPL = grads.make_implementation(wy_kernel=False)  # W, U, T, P in pure JAX: one kernel tested
NAMES = ("dq", "dk", "dv", "dgamma", "dbeta")


def chunk_inputs(seed, bh, t, dk, dv, dtype):
  """Fresh inputs of `_chunk_grads` (T a multiple of 64): q, k, v, dO [B, T, H, *] (the op's
  layout; B = 2 where B*H is a multiple of 4, else 1), gamma (the chunk-local cumsum of log
  decays), beta, T (unit lower triangular), Vnew, dVnew [B*H, T, *], S_n and dS_n+1
  [B*H, N, K, V]."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 11)
  rnd = lambda i, shape: jax.random.normal(keys[i], shape)
  n = t // 64
  q, k = 0.2 * rnd(0, (bh, t, dk)), 0.2 * rnd(1, (bh, t, dk))
  gamma = common.chunk_local_cumsum(
      jax.nn.log_sigmoid(rnd(3, (bh, t)) + 2.0)[..., None], 64)[..., 0]
  beta = jax.nn.sigmoid(rnd(4, (bh, t)))
  t_inv = (jnp.eye(64) + 0.1 * jnp.tril(rnd(5, (bh, n, 64, 64)), -1)).reshape(bh, t, 64)
  rest = (rnd(2, (bh, t, dv)), t_inv, rnd(6, (bh, t, dv)), rnd(7, (bh, t, dv)),
          rnd(8, (bh, t, dv)), rnd(9, (bh, n, dk, dv)), rnd(10, (bh, n, dk, dv)))
  v, t_inv, do, vn, dvn, s, ds = (x.astype(dtype) for x in rest)
  b = 2 if bh % 4 == 0 else 1
  bthd = lambda x: m._from_bh(x.astype(dtype), b)
  return bthd(q), bthd(k), bthd(v), gamma, beta, t_inv, bthd(do), vn, dvn, s, ds


@pytest.mark.parametrize("dtype,shape", [
    (jnp.float32, (4, 64, 64, 32)),  # two batch rows of two heads: head_tile's indices
    (jnp.bfloat16, (1, 64, 64, 64)),
    pytest.param(jnp.float32, (2, 128, 64, 128), marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, (2, 128, 128, 128), marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, (1, 128, 192, 16), marks=pytest.mark.slow),
], ids=lambda x: jnp.dtype(x).name if not isinstance(x, tuple) else "BH{}T{}K{}V{}".format(*x))
def test_kernel_matches_chunk_grads(dtype, shape):
  """The kernel alone against `_chunk_grads` on the upcast inputs at HIGHEST: float32 (hi/lo
  products) ~1.5e-5, bf16 (bf16 operands and intermediates, as `_chunk_grads` at bf16) ~2e-3.
  The slow cases: two heads and chunks, two V-tiles (V = 128 > 64), K = 128 and 192, V = 16."""
  bh, t, dk, dv = shape
  args = chunk_inputs(1, bh, t, dk, dv, dtype)
  got = grads.chunk_grads(*args, interpret=m._interpret())
  assert [x.dtype for x in got] == [dtype] * 3 + [jnp.float32] * 2
  b = 2 if bh % 4 == 0 else 1
  assert [x.shape for x in got] == ([(b, t, bh // b, dk)] * 2
                                    + [(b, t, bh // b, dv), (bh, t), (bh, t)])
  with jax.default_matmul_precision("highest"):
    want = m._chunk_grads(*(x.astype(jnp.float32) for x in args))
  tolerance = 1e-4 if dtype == jnp.float32 else 1e-2
  assert_close(got, want, tolerance, names=NAMES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_oracle(case):
  """o, the final state and the gradients of every input through the VJP with the kernel (as
  test_pallas_mosaic_gpu.test_matches_oracle, whose cases these are)."""
  l2norm, dtype = case[6], case[5]
  inputs, cotangents = case_inputs(case)
  got = vjp_of(op, inputs, cotangents, implementation=IMPL, use_qk_l2norm=l2norm)
  assert all(x.dtype == y.dtype for x, y in zip(got[2:], inputs, strict=False))
  assert_close(got, oracle_vjp(inputs, cotangents, use_qk_l2norm=l2norm), TOLERANCE[dtype],
               names=names_of(inputs))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_oracle_larger(dtype):
  """Two V-tiles, two heads, several chunks; K = 128 in bf16, 64 in float32."""
  dk = 128 if dtype == jnp.bfloat16 else 64
  inputs, cotangents = make_inputs(11, 2, 300, 2, dk, 128, dtype)
  assert_close(vjp_of(op, inputs, cotangents, implementation=IMPL, use_qk_l2norm=True),
               oracle_vjp(inputs, cotangents, use_qk_l2norm=True), TOLERANCE[dtype])


@pytest.mark.parametrize("dk,dv,dtype,kernel", [
    (32, 16, jnp.float32, True), (64, 128, jnp.bfloat16, True),
    (128, 32, jnp.float32, False)])  # float32 K = 128: over 200 KiB at V = 32, pure JAX then
def test_backward_kernels(dk, dv, dtype, kernel):
  """Traced only: the VJP is the forward kernel, the reverse kernel and the gradient kernel (no
  `lax.scan` outside them); where the gradient kernel's SMEM does not fit (float32, K = 128,
  V = 32: the forward fits) the per-chunk gradients fall back to pure JAX."""
  inputs, cotangents = make_inputs(0, 1, 70, 1, dk, dv, dtype)
  jaxpr = jax.make_jaxpr(lambda xs, cts: vjp_of(op, xs, cts, implementation=IMPL,
                                                use_qk_l2norm=True))(inputs, cotangents)
  names, outside = _kernel_calls(jaxpr)
  assert names == [m.FWD_KERNEL, m.OUT_KERNEL, m.BWD_KERNEL] + [grads.KERNEL] * kernel
  assert not outside & {"scan", "while", "custom_vjp_call", "custom_vjp_call_jaxpr"}, outside


def test_names():
  assert IMPL.name == "pallas_mosaic_gpu[jax_wy]"
  assert grads.make_implementation().name == m.NAME
  assert api.REGISTRY[m.NAME] is grads.IMPLEMENTATION
  assert m.make_implementation().name == "pallas_mosaic_gpu[jax_grads]"
  assert m.make_implementation(wy_kernel=False).name == "pallas_mosaic_gpu[jax_wy,jax_grads]"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_smem(dtype):
  """SMEM at V-tiles of 64: it fits wherever the op's other kernels do (bf16 up to K = 192;
  float32 K = 64, 178 KiB, not K = 128, which the op refuses too). With V = 16 (one narrow
  tile) float32 K = 128 fits; at V = 32 it does not (the fallback to pure JAX where the op
  would run). `chunk_grads` refuses what does not fit."""
  n_parts = 1 if dtype == jnp.bfloat16 else 2
  for dk in (64, 128, 192, 256):
    op = max(m._smem_bytes(n_parts, dk, 64, dtype), m._out_smem_bytes(n_parts, dk, 64, dtype),
             m._bwd_smem_bytes(n_parts, dk, 64))
    assert grads.fits(dtype, dk, 128) == (op <= m.SMEM_LIMIT)
  assert grads.fits(dtype, 128, 16)
  assert grads.fits(dtype, 128, 32) == (dtype == jnp.bfloat16)
  args = [jax.ShapeDtypeStruct(s, d) for s, d in (  # q, k, v, do [B,T,H,*], the rest [B*H,T,*]
      ((1, 64, 1, 256), dtype), ((1, 64, 1, 256), dtype), ((1, 64, 1, 64), dtype),
      ((1, 64), jnp.float32), ((1, 64), jnp.float32), ((1, 64, 64), dtype),
      ((1, 64, 1, 64), dtype), ((1, 64, 64), dtype), ((1, 64, 64), dtype),
      ((1, 1, 256, 64), dtype), ((1, 1, 256, 64), dtype))]
  with pytest.raises(NotImplementedError, match="KiB of SMEM"):
    jax.eval_shape(lambda *a: grads.chunk_grads(*a, interpret=m._interpret()), *args)


@pytest.mark.parametrize("dtype,dk,dv", [(jnp.bfloat16, 128, 128), (jnp.float32, 64, 64),
                                         (jnp.bfloat16, 64, 16)])
def test_kernel_lowers_for_a_gpu(monkeypatch, dtype, dk, dv):
  """On any machine: the VJP with the gradient kernel compiled (not interpreted) lowers through
  Mosaic GPU for CUDA, layout inference included (~1-2 s each on a CPU)."""
  monkeypatch.setattr(m, "_interpret", lambda: False)
  inputs, cotangents = make_inputs(0, 1, 70, 2, dk, dv, dtype)

  def f(xs, cts):
    out, pullback = jax.vjp(lambda *ys: op(ys, implementation=IMPL, use_qk_l2norm=True), *xs)
    return (*out, *pullback(cts))
  text = jax.jit(f).trace(inputs, cotangents).lower(lowering_platforms=("cuda",)).as_text()
  assert all(name in text for name in (grads.KERNEL, m.FWD_KERNEL, m.OUT_KERNEL, m.BWD_KERNEL))
