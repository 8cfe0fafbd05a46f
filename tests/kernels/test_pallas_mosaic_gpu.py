"""The Pallas Mosaic GPU forward kernel (`pallas_mosaic_gpu`) vs the float32 token-by-token oracle.

On a CPU it runs in GPU interpret mode (slow: small shapes here, bigger ones under -m slow); on
a GPU it compiles (all of these passed on an H200). Errors are relative RMS errors against
`recurrent` on upcast inputs at HIGHEST matmul precision. The backward is `chunked`'s autodiff
(recomputed), checked once against the oracle's gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas import (
                         NAMES,
                         assert_close,
                         make_inputs,
                         outputs_and_grads,
                         reference,
                         rel_rms,
)

import kernels
from kernels.gated_delta_rule import api, pallas_mosaic_gpu

IMPL = pallas_mosaic_gpu.NAME
# float32 inputs run as bf16 hi/lo splits (3 wgmmas a product): ~2^-16 relative per product.
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def forward(inputs, **kwargs):
  q, k, v, g, beta, s0 = inputs
  return kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0, implementation=IMPL,
                                  chunk_size=64, **kwargs)


def oracle(inputs, **kwargs):
  q, k, v, g, beta, s0 = (None if x is None else x.astype(jnp.float32) for x in inputs)
  with jax.default_matmul_precision("highest"):
    return kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                    implementation="recurrent", **kwargs)


# (B, T, H, K, V, dtype, l2norm, initial state): T not a multiple of 64, K and V padded.
# The default suite runs the first two (interpret mode is slow); the others run under -m slow.
CASES = [
    (1, 70, 2, 32, 16, jnp.float32, True, True),
    (1, 130, 1, 64, 32, jnp.bfloat16, True, False),
    pytest.param((2, 40, 1, 48, 24, jnp.float32, False, False), marks=pytest.mark.slow),
    pytest.param((1, 100, 1, 64, 64, jnp.bfloat16, False, True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}K{c[3]}V{c[4]}"
                         f"{jnp.dtype(c[5]).name}{'-l2' if c[6] else ''}{'-s0' if c[7] else ''}")
def test_forward_matches_oracle(case):
  b, t, h, dk, dv, dtype, l2norm, with_s0 = case
  (q, k, v, g, beta, s0), _ = make_inputs(t + dk, b, t, h, dk, dv, dtype)
  if not l2norm:  # keep the un-normalised recurrence well scaled
    q, k = q * 0.3, k * 0.3
  inputs = (q, k, v, g, beta, s0 if with_s0 else None)
  o, s = forward(inputs, use_qk_l2norm=l2norm)
  assert o.dtype == dtype and o.shape == v.shape
  assert s.dtype == jnp.float32 and s.shape == (b, h, dk, dv)
  assert_close((o, s), oracle(inputs, use_qk_l2norm=l2norm), TOLERANCE[dtype],
               names=("o", "final_state"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_matches_oracle_larger(dtype):
  """Several V-tiles (V = 128 > BV = 64), several heads and chunks; K = 128 in bf16 and K = 64 in
  float32 (whose hi/lo SMEM buffers do not fit at K = 128)."""
  dk = 128 if dtype == jnp.bfloat16 else 64
  (q, k, v, g, beta, s0), _ = make_inputs(11, 2, 300, 2, dk, 128, dtype)
  inputs = (q, k, v, g, beta, s0)
  assert_close(forward(inputs, use_qk_l2norm=True), oracle(inputs, use_qk_l2norm=True),
               TOLERANCE[dtype], names=("o", "final_state"))


@pytest.mark.slow   # CI time; the backward is chunked's autodiff, whose gradients the default
                    # suite checks (test_gated_delta_rule.py)
def test_gradients_match_oracle():
  inputs, cotangents = make_inputs(4, 1, 70, 1, 32, 16, jnp.float32)
  kwargs = dict(use_qk_l2norm=True, chunk_size=64)
  got = outputs_and_grads(IMPL, inputs, cotangents, **kwargs)
  assert_close(got, reference(inputs, cotangents, **kwargs), 1e-4, names=NAMES)


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
  assert IMPL in api.available_implementations()
  for backend in ("cpu", "gpu", "tpu"):
    assert IMPL not in api.default_implementations(backend)


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
           "k_128_float32": "SMEM", "k_256_bfloat16": "SMEM"}[what]
  with pytest.raises(NotImplementedError, match=match):
    rule(q, k, v, g, beta, chunk_size=chunk, implementation=IMPL)


def test_bf16_split_is_exact_to_2_pow_16():
  """float32 operands become hi + lo bf16 parts whose sum is within ~2^-16 of the value."""
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 64))
  hi, lo = pallas_mosaic_gpu._parts(x)
  assert hi.dtype == lo.dtype == jnp.bfloat16
  err = np.abs(np.asarray(hi, np.float32) + np.asarray(lo, np.float32) - np.asarray(x))
  assert np.all(err <= 2.0 ** -16 * np.abs(np.asarray(x)))
