"""The Pallas Mosaic GPU kernels (`pallas_mosaic_gpu`) vs the float32 token-by-token oracle.

On a CPU they run in GPU interpret mode (slow: two small cases by default, the others under
-m slow); on a GPU they compile (the forward's tests passed on an H200; the backward kernel has
not run on a GPU yet). Errors are relative RMS errors against `recurrent` on upcast inputs at
HIGHEST matmul precision, of the outputs and of the gradients of every input (q, k, v, g, beta
and the initial state when there is one), with random cotangents on o and the final state. On
the GPU machine, everything:
  python3 -m pytest -q -n 0 tests/kernels/test_pallas_mosaic_gpu.py -m "slow or not slow"
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas import NAMES, assert_close, make_inputs, rel_rms

import kernels
from kernels.gated_delta_rule import api, pallas_mosaic_gpu

# The state chains with W, U, T, P and the per-chunk gradients in pure JAX: these tests check the
# forward and reverse kernels; the WY kernel below, the gradient kernel in test_mosaic_gpu_grads.
IMPL = pallas_mosaic_gpu.make_implementation(wy_kernel=False)
# float32 inputs run as bf16 hi/lo splits (3 wgmmas a product): ~2^-16 relative per product.
# bf16 inputs: bf16 operands and bf16 states, dS, Vnew, dVnew between the kernels (as fla and
# pallas_triton; dg is the worst, 1.6e-2 in the bf16 l2 case where pallas_triton has 1.3e-2).
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


# W, U, T, P by the Mosaic GPU kernel too (compiled on an H200, 2026-12-04).
WY_IMPL = pallas_mosaic_gpu.make_implementation(wy_kernel=True)


def op(inputs, implementation=IMPL, **kwargs):
  """(o, final_state) of the kernel; `inputs` ends with the initial state or None."""
  q, k, v, g, beta, s0 = inputs
  return kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                  implementation=implementation, chunk_size=64, **kwargs)


def oracle_op(inputs, **kwargs):
  q, k, v, g, beta, s0 = inputs
  return kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0, implementation="recurrent",
                                  **kwargs)


def forward(inputs, **kwargs):
  return op(inputs, **kwargs)


def oracle(inputs, **kwargs):
  q, k, v, g, beta, s0 = (None if x is None else x.astype(jnp.float32) for x in inputs)
  with jax.default_matmul_precision("highest"):
    return oracle_op((q, k, v, g, beta, s0), **kwargs)


def vjp_of(f, inputs, cotangents, **kwargs):
  """Outputs and the gradients of the inputs that are not None (the initial state may be), in
  one jit as training runs them (XLA then optimizes across the kernels' boundaries)."""
  given = [i for i, x in enumerate(inputs) if x is not None]

  def run(xs, cts):
    def g(*ys):
      full = [None] * len(inputs)
      for i, y in zip(given, ys, strict=True):
        full[i] = y
      return f(tuple(full), **kwargs)
    out, pullback = jax.vjp(g, *xs)
    return (*out, *pullback(cts))
  return jax.jit(run)(tuple(inputs[i] for i in given), cotangents)


def oracle_vjp(inputs, cotangents, **kwargs):
  up = lambda xs: tuple(None if x is None else x.astype(jnp.float32) for x in xs)
  with jax.default_matmul_precision("highest"):
    return vjp_of(oracle_op, up(inputs), up(cotangents), **kwargs)


def names_of(inputs):
  return NAMES if inputs[-1] is not None else NAMES[:-1]


def case_id(c):
  return (f"B{c[0]}T{c[1]}H{c[2]}K{c[3]}V{c[4]}{jnp.dtype(c[5]).name}{'-l2' if c[6] else ''}"
          f"{'-s0' if c[7] else ''}")


def case_inputs(case):
  b, t, h, dk, dv, dtype, l2norm, with_s0 = case
  (q, k, v, g, beta, s0), cotangents = make_inputs(t + dk, b, t, h, dk, dv, dtype)
  if not l2norm:  # keep the un-normalised recurrence well scaled
    q, k = q * 0.3, k * 0.3
  return (q, k, v, g, beta, s0 if with_s0 else None), cotangents


# (B, T, H, K, V, dtype, l2norm, initial state): T not a multiple of 64, K and V padded.
# The default suite runs the first two (interpret mode is slow); the others run under -m slow.
CASES = [
    (1, 70, 2, 32, 16, jnp.float32, True, True),
    (1, 130, 1, 64, 32, jnp.bfloat16, False, False),
    pytest.param((2, 40, 1, 48, 24, jnp.float32, False, False), marks=pytest.mark.slow),
    pytest.param((1, 150, 1, 64, 64, jnp.float32, True, False), marks=pytest.mark.slow),
    pytest.param((1, 130, 1, 64, 32, jnp.bfloat16, True, False), marks=pytest.mark.slow),
    pytest.param((1, 100, 1, 64, 64, jnp.bfloat16, False, True), marks=pytest.mark.slow),
    pytest.param((1, 200, 1, 100, 40, jnp.bfloat16, True, True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_oracle(case):
  """o, the final state and the gradients of every input, through the VJP (the forward that
  saves the states and Vnew, the reverse kernel, the per-chunk gradients)."""
  b, t, h, dk, dv, dtype, l2norm, _ = case
  inputs, cotangents = case_inputs(case)
  got = vjp_of(op, inputs, cotangents, use_qk_l2norm=l2norm)
  assert got[0].dtype == dtype and got[0].shape == (b, t, h, dv)
  assert got[1].dtype == jnp.float32 and got[1].shape == (b, h, dk, dv)
  assert all(x.dtype == y.dtype for x, y in zip(got[2:], inputs, strict=False))
  assert_close(got, oracle_vjp(inputs, cotangents, use_qk_l2norm=l2norm), TOLERANCE[dtype],
               names=names_of(inputs))


@pytest.mark.parametrize("case", [CASES[0], pytest.param(CASES[1], marks=pytest.mark.slow)],
                         ids=case_id)
def test_forward_alone_matches_oracle(case):
  """The forward outside a VJP (the kernel that saves nothing; what inference runs)."""
  inputs, _ = case_inputs(case)
  l2norm, dtype = case[6], case[5]
  assert_close(forward(inputs, use_qk_l2norm=l2norm), oracle(inputs, use_qk_l2norm=l2norm),
               TOLERANCE[dtype], names=("o", "final_state"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_oracle_larger(dtype):
  """Several V-tiles (V = 128 > BV = 64), several heads and chunks; K = 128 in bf16 and K = 64 in
  float32 (whose hi/lo SMEM buffers do not fit at K = 128); outputs and gradients."""
  dk = 128 if dtype == jnp.bfloat16 else 64
  inputs, cotangents = make_inputs(11, 2, 300, 2, dk, 128, dtype)
  assert_close(vjp_of(op, inputs, cotangents, use_qk_l2norm=True),
               oracle_vjp(inputs, cotangents, use_qk_l2norm=True), TOLERANCE[dtype])


def _kernel_calls(jaxpr):
  """(names of the Mosaic GPU kernels, primitives outside them) in a jaxpr, nested ones too."""
  kernel_names, outside = [], set()

  def walk(j):
    for eqn in j.eqns:
      name = eqn.params.get("name")
      if eqn.primitive.name in ("mpmd_map", "pallas_call"):
        kernel_names.append(name if isinstance(name, str)
                            else getattr(eqn.params.get("name_and_src_info"), "name", None))
        continue
      outside.add(eqn.primitive.name)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else [param]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)
  walk(jaxpr.jaxpr)
  return kernel_names, outside


@pytest.mark.parametrize("wy_kernel", [False, True])
def test_backward_is_the_reverse_kernel(wy_kernel):
  """Traced only (no kernel runs): forward and backward are the forward chain, the outputs
  kernel and one reverse kernel, in that order, with no sequential loop outside them (the old
  backward recomputed the op with `chunked`, a lax.scan over chunks, and autodiffed it), and
  the module no longer imports `chunked`."""
  m = pallas_mosaic_gpu
  impl = WY_IMPL if wy_kernel else IMPL
  inputs, cotangents = make_inputs(0, 1, 70, 1, 32, 16, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda xs, cts: vjp_of(op, xs, cts, implementation=impl,
                                                use_qk_l2norm=True))(inputs, cotangents)
  kernel_names, outside = _kernel_calls(jaxpr)
  forward_kernels = ([m.INTRA_KERNEL] if wy_kernel else []) + [m.FWD_KERNEL, m.OUT_KERNEL]
  assert kernel_names == [*forward_kernels, m.BWD_KERNEL]
  assert not outside & {"scan", "while", "custom_vjp_call", "custom_vjp_call_jaxpr"}, outside
  assert not hasattr(m, "chunked")
  # The forward alone: the forward kernels only.
  names, _ = _kernel_calls(jax.make_jaxpr(
      lambda xs: op(xs, implementation=impl, use_qk_l2norm=True))(inputs))
  assert names == forward_kernels


@pytest.mark.slow
@pytest.mark.parametrize("dv", [128, 32])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reverse_kernel_matches_jax_steps(dtype, dv):
  """The reverse kernel alone (two V-tiles of 64, or one of 32; two batch rows of two heads)
  against `_pallas_common.state_bwd_step` looped in JAX at HIGHEST: dVnew, dS leaving each
  chunk, dS_0. q, k and dO enter in the op's [B, T, H, *] layout (`head_tile`); the kernel
  scales q and k into Qe and Ke itself. V = 32 calls the kernel directly, past the op's refusal
  on a GPU: it tells whether the reverse chain is where V-tile 32 goes wrong compiled (12-04d,
  docs/kernels.md)."""
  from kernels.gated_delta_rule import _pallas_common as common
  m = pallas_mosaic_gpu
  b, bh, t, dk = 2, 4, 192, 64
  keys = jax.random.split(jax.random.PRNGKey(5), 8)
  rnd = lambda i, shape: jax.random.normal(keys[i], shape)
  q, k, w = (0.3 * rnd(i, (bh, t, dk)) for i in range(3))
  gamma = common.chunk_local_cumsum(
      jax.nn.log_sigmoid(rnd(3, (bh, t)) + 2.0)[..., None], 64)[..., 0]
  p = jnp.tril(rnd(4, (bh, t // 64, 64, 64))).reshape(bh, t, 64) * 0.1
  do, ds_final = rnd(5, (bh, t, dv)), rnd(6, (bh, dk, dv))
  q, k, w, p, do = (x.astype(dtype) for x in (q, k, w, p, do))
  e_out, e_end, s_decay = pallas_mosaic_gpu._decays(gamma)
  bthd = lambda x: m._from_bh(x, b)
  dv_new, d_states, ds0 = pallas_mosaic_gpu.state_bwd(
      bthd(q), bthd(k), e_out, e_end, -w, p, bthd(do),
      jnp.broadcast_to(s_decay, (bh, t // 64, dk)), ds_final,
      interpret=pallas_mosaic_gpu._interpret())
  cfg = pallas_mosaic_gpu._config(dk, dv, jnp.float32)
  want_dvn, want_ds = [], []
  d_state = ds_final
  up = lambda x: x.astype(jnp.float32)
  for n in reversed(range(t // 64)):
    rows = slice(n * 64, (n + 1) * 64)
    want_ds.insert(0, d_state)
    step = jax.vmap(lambda *a: common.state_bwd_step(*a, cfg))
    dvn, d_state = step(d_state, up(q[:, rows]), up(k[:, rows]), up(w[:, rows]), up(do[:, rows]),
                        up(p[:, rows]), gamma[:, rows, None])
    want_dvn.insert(0, dvn)
  assert_close((dv_new, d_states, ds0),
               (jnp.concatenate(want_dvn, axis=1), jnp.stack(want_ds, axis=1), d_state),
               TOLERANCE[dtype], names=("dv_new", "d_states", "ds0"))


def _wy_inputs(seed, bh, t, dk, dv, dtype, hard=False):
  """q, k, v [B,T,H,*] (the op's layout; B = 2 where B*H is a multiple of 4, else 1), gamma,
  beta [B*H,T] (gamma the chunk-local cumsum).
  `hard`: no decay, unit keys of uniform [0,1) entries (~0.75 apart in cosine), beta near 1:
  the regime of issue 15."""
  from kernels.gated_delta_rule import _pallas_common as common
  from kernels.gated_delta_rule import base
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  if hard:
    q, k = (base.l2_normalize(jax.random.uniform(keys[i], (bh, t, dk))) for i in (0, 1))
    gamma = jnp.zeros((bh, t))
    beta = 1.0 - 0.01 * jax.random.uniform(keys[4], (bh, t))
  else:
    q, k = (0.2 * jax.random.normal(keys[i], (bh, t, dk)) for i in (0, 1))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (bh, t)) + 2.0)
    gamma = common.chunk_local_cumsum(g[..., None], 64)[..., 0]
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (bh, t)))
  v = jax.random.normal(keys[2], (bh, t, dv))
  bthd = lambda x: pallas_mosaic_gpu._from_bh(x.astype(dtype), 2 if bh % 4 == 0 else 1)
  return bthd(q), bthd(k), bthd(v), gamma, beta


@pytest.mark.parametrize("dtype,hard", [
    (jnp.float32, False),
    pytest.param(jnp.float32, True, marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, False, marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, True, marks=pytest.mark.slow)])
def test_wy_kernel_matches_jax(dtype, hard):
  """The WY kernel alone (W, U, T by block doubling, P; two V-tiles) against `_intra_chunk` on
  the upcast inputs at HIGHEST. float32: ~2e-5 in the hard case (hi/lo products), ~5e-6
  otherwise; bf16 as the pure-JAX bf16 path (bf16 operands and outputs)."""
  m = pallas_mosaic_gpu
  q, k, v, gamma, beta = _wy_inputs(1, 4, 64, 64, 128, dtype, hard)  # 2 batch rows x 2 heads
  got = m.intra_fwd(q, k, v, gamma, beta, interpret=m._interpret())
  assert [x.dtype for x in got] == [dtype] * 4
  with jax.default_matmul_precision("highest"):
    want = m._intra_chunk(*(x.astype(jnp.float32) for x in (q, k, v)), gamma, beta, jnp.float32)
  tolerance = 1e-4 if dtype == jnp.float32 else 1e-2
  assert_close(got, want, tolerance, names=("w", "u", "t", "p"))


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5].values[0]], ids=case_id)
def test_wy_kernel_matches_oracle(case):
  """End to end with the WY kernel: outputs and every gradient, as `test_matches_oracle`."""
  l2norm, dtype = case[6], case[5]
  inputs, cotangents = case_inputs(case)
  got = vjp_of(op, inputs, cotangents, implementation=WY_IMPL, use_qk_l2norm=l2norm)
  assert_close(got, oracle_vjp(inputs, cotangents, use_qk_l2norm=l2norm), TOLERANCE[dtype],
               names=names_of(inputs))


@pytest.mark.slow
def test_state_round_trip():
  """Prefix then suffix, with the state handed over, equals one pass (and the oracle)."""
  (q, k, v, g, beta, s0), _ = make_inputs(3, 1, 90, 1, 32, 16, jnp.float32)
  run = lambda sl, s: forward((q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], s),
                              use_qk_l2norm=True)
  o_full, s_full = run(slice(None), s0)
  o_a, s_a = run(slice(0, 37), s0)
  o_b, s_b = run(slice(37, None), s_a)
  assert rel_rms(jnp.concatenate([o_a, o_b], axis=1), o_full) < 1e-4
  assert rel_rms(s_b, s_full) < 1e-4


def test_registered_by_name_only():
  assert pallas_mosaic_gpu.NAME in api.available_implementations()
  for backend in ("cpu", "gpu", "tpu"):
    assert pallas_mosaic_gpu.NAME not in api.default_implementations(backend)


@pytest.mark.parametrize("what", ["linear_rule", "chunk_32", "float16", "mixed_dtypes",
                                  "k_128_float32", "k_256_bfloat16"])
def test_refusals(what):
  dk = {"k_128_float32": 128, "k_256_bfloat16": 256}.get(what, 32)
  dtype = {"float16": jnp.float16, "k_256_bfloat16": jnp.bfloat16}.get(what, jnp.float32)
  (q, k, v, g, beta, s0), _ = make_inputs(0, 1, 8, 1, dk, 64, dtype)  # V-tile 64
  if what == "mixed_dtypes":
    v = v.astype(jnp.bfloat16)
  rule = kernels.gated_linear_rule if what == "linear_rule" else kernels.gated_delta_rule
  chunk = 32 if what == "chunk_32" else 64
  match = {"linear_rule": "gated delta rule only", "chunk_32": "chunk_size 64 only",
           "float16": "bfloat16 or float32", "mixed_dtypes": "bfloat16 or float32",
           "k_128_float32": SMEM_MESSAGE, "k_256_bfloat16": SMEM_MESSAGE}[what]
  with pytest.raises(NotImplementedError, match=match):
    rule(q, k, v, g, beta, chunk_size=chunk, implementation=IMPL)


SMEM_MESSAGE = (r"KiB of SMEM, over 200 KiB \(forward kernel \d+ KiB, outputs kernel \d+ KiB, "
                r"backward kernel \d+ KiB")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_smem_limits(dtype):
  """With V-tiles of 64 the forward chain (states only) and the outputs kernel need less SMEM
  than the backward, and the WY kernel fits wherever the backward does (it needs more at
  float32 K = 64: 145 against 129 KiB), so the refusals are the backward's
  (test_fla_grid.refused): float32 above K = 64, bf16 above K = 192 (K padded to a multiple of
  64)."""
  m = pallas_mosaic_gpu
  limit = 64 if dtype == jnp.float32 else 192
  n_parts = 2 if dtype == jnp.float32 else 1
  for dk in (48, 64, 100, 128, 192, 256):
    x = jax.ShapeDtypeStruct((1, 8, 1, dk), dtype)
    v = jax.ShapeDtypeStruct((1, 8, 1, 128), dtype)
    padded = -(-dk // 64) * 64
    backward_bytes = m._bwd_smem_bytes(n_parts, padded, 64)
    assert m._smem_bytes(n_parts, padded, 64, dtype) < backward_bytes
    assert m._out_smem_bytes(n_parts, padded, 64, dtype) < backward_bytes
    wy_bytes = m._intra_smem_bytes(n_parts, padded, 64, dtype)
    assert (wy_bytes <= m.SMEM_LIMIT) or (backward_bytes > m.SMEM_LIMIT)  # never the WY alone
    for wy_kernel in (False, True):
      if padded > limit:
        with pytest.raises(NotImplementedError, match=SMEM_MESSAGE):
          m._check(x, x, v, 64, True, wy_kernel)
      else:
        m._check(x, x, v, 64, True, wy_kernel)


@pytest.mark.parametrize("split,jit", [("_parts", False), ("_array_parts", True)])
def test_bf16_split_is_exact_to_2_pow_16(split, jit):
  """float32 operands become hi + lo bf16 parts whose sum is within ~2^-16 of the value.
  `_array_parts`, the split done outside the kernels, holds under jit. `_parts` runs only inside
  kernels, where Mosaic GPU lowers its casts; under XLA's jit on a GPU the float32 -> bf16 ->
  float32 round trip is folded away (lo is 0: measured on an H200, 2026-12-04), so it is checked
  op by op here, and inside the kernels by the float32 oracle tests."""
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 64)) * jnp.logspace(-20, 20, 64)
  fn = getattr(pallas_mosaic_gpu, split)
  hi, lo = (jax.jit(fn) if jit else fn)(x)
  assert hi.dtype == lo.dtype == jnp.bfloat16
  err = np.abs(np.asarray(hi, np.float32) + np.asarray(lo, np.float32) - np.asarray(x))
  assert np.all(err <= 2.0 ** -16 * np.abs(np.asarray(x)))
  assert np.mean(np.asarray(lo, np.float32) != 0) > 0.9


@pytest.mark.parametrize("dtype,dk,dv,wy_kernel", [
    (jnp.bfloat16, 64, 64, False), (jnp.float32, 64, 64, False),
    (jnp.bfloat16, 64, 64, True), (jnp.float32, 64, 64, True), (jnp.bfloat16, 128, 64, True),
    (jnp.bfloat16, 64, 32, True), (jnp.float32, 48, 24, False), (jnp.bfloat16, 64, 16, False)])
def test_kernels_lower_for_a_gpu(monkeypatch, dtype, dk, dv, wy_kernel):
  """On any machine: the compiled (not interpreted) kernels of the VJP lower through Mosaic GPU
  for CUDA, layout inference included (what fails before a GPU is needed): the forward and the
  reverse kernel, and with `wy_kernel` the WY kernel too (its layout inference found no
  solution until gamma and beta were loaded as rows and as columns from separate SMEM copies).
  At V-tile 32 the reverse kernel's inference ran out of search steps until Qe's layout was
  declared (the 12-04d failures at V padded to 32). Lowering only: the later Mosaic GPU passes
  and the PTX compilation need a GPU."""
  m = pallas_mosaic_gpu
  monkeypatch.setattr(m, "_interpret", lambda: False)
  inputs, cotangents = make_inputs(0, 1, 70, 2, dk, dv, dtype)
  impl = WY_IMPL if wy_kernel else IMPL

  def f(xs, cts):
    out, pullback = jax.vjp(lambda *ys: op(ys, implementation=impl, use_qk_l2norm=True), *xs)
    return (*out, *pullback(cts))
  text = jax.jit(f).trace(inputs, cotangents).lower(lowering_platforms=("cuda",)).as_text()
  assert m.FWD_KERNEL in text and m.OUT_KERNEL in text and m.BWD_KERNEL in text
  assert (m.INTRA_KERNEL in text) == wy_kernel
