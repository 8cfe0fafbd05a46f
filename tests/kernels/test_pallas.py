"""Pallas kernels of the gated delta rule vs the float32 token-by-token oracle.

On a CPU (CI) the kernels run interpreted (Triton kernels with interpret=True, the TPU kernel in
TPU interpret mode); on the GPU machine the same tests run the compiled Triton kernel:
  python3 -m pytest tests/kernels/test_pallas.py -q      (on either machine)
Errors are relative RMS errors per output and per gradient, with random cotangents on both o and
the final state.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.gated_delta_rule import api
from tests.lowering import TRITON_CALL, abstract_gpu
from tests.numerics import rel_rms

BACKEND = jax.default_backend()
# Compiled where the hardware is, interpreted on a CPU; the TPU kernel has no GPU interpreter.
IMPLS = {"gpu": ["pallas_triton"], "tpu": ["pallas_mosaic_tpu"],
         "cpu": ["pallas_triton", "pallas_mosaic_tpu"]}[BACKEND]
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state")
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def make_inputs(seed, b, t, h, dk, dv, dtype, *, g_offset=2.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, h, dk), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + g_offset)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
  s0 = jax.random.normal(ks[5], (b, h, dk, dv))
  do = jax.random.normal(ks[6], (b, t, h, dv), jnp.float32).astype(dtype)
  dsf = jax.random.normal(ks[7], (b, h, dk, dv))
  return (q, k, v, g, beta, s0), (do, dsf)


def outputs_and_grads_of(f, inputs, cotangents):
  out, vjp = jax.vjp(f, *inputs)
  return (*out, *vjp(cotangents))


def outputs_and_grads(impl, inputs, cotangents, **kwargs):
  def f(q, k, v, g, beta, s0):
    return kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0, implementation=impl,
                                    **kwargs)
  return outputs_and_grads_of(f, inputs, cotangents)


def reference(inputs, cotangents, **kwargs):
  up = lambda xs: tuple(x.astype(jnp.float32) for x in xs)
  with jax.default_matmul_precision("highest"):
    return outputs_and_grads("recurrent", up(inputs), up(cotangents), **kwargs)


def assert_close(got, want, tolerance, names=NAMES):
  errors = {n: rel_rms(a, b) for n, a, b in zip(names, got, want, strict=True)}
  for name, a in zip(names, got, strict=True):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{name} is not finite"
  bad = {n: e for n, e in errors.items() if not e <= tolerance}
  assert not bad, f"relative RMS error above {tolerance}: {bad} (all: {errors})"


# (B, T, H, K, V, chunk, dtype, l2norm): awkward T, every chunk size, non-power-of-2 K and V.
CASES = [
    (1, 1, 2, 32, 16, 64, jnp.float32, True),
    (1, 63, 1, 16, 32, 16, jnp.float32, False),
    (2, 75, 1, 48, 24, 32, jnp.float32, True),
    (1, 130, 2, 32, 32, 64, jnp.bfloat16, True),
    (1, 40, 1, 128, 64, 32, jnp.float32, True),  # several K-tiles in the backward kernels
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}K{c[3]}V{c[4]}"
                         f"C{c[5]}{jnp.dtype(c[6]).name}{'-l2' if c[7] else ''}")
def test_matches_reference(impl, case):
  b, t, h, dk, dv, chunk, dtype, l2norm = case
  inputs, cotangents = make_inputs(t, b, t, h, dk, dv, dtype)
  kwargs = dict(use_qk_l2norm=l2norm, chunk_size=chunk)
  if not l2norm:  # keep the un-normalised recurrence well scaled
    inputs = (inputs[0] * 0.3, inputs[1] * 0.3, *inputs[2:])
  got = outputs_and_grads(impl, inputs, cotangents, **kwargs)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  assert_close(got, reference(inputs, cotangents, **kwargs), TOLERANCE[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_larger(impl, dtype):
  inputs, cotangents = make_inputs(7, 2, 300, 2, 128, 128, dtype)
  kwargs = dict(use_qk_l2norm=True, chunk_size=64)
  got = outputs_and_grads(impl, inputs, cotangents, **kwargs)
  assert_close(got, reference(inputs, cotangents, **kwargs), TOLERANCE[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_state_round_trip(impl):
  """Prefix then suffix, with the state handed over, equals one pass."""
  (q, k, v, g, beta, s0), _ = make_inputs(3, 1, 90, 2, 32, 32, jnp.float32)
  run = lambda sl, s: kernels.gated_delta_rule(
      q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=s, use_qk_l2norm=True,
      chunk_size=32, implementation=impl)
  o_full, s_full = run(slice(None), s0)
  o_a, s_a = run(slice(0, 37), s0)
  o_b, s_b = run(slice(37, None), s_a)
  assert rel_rms(jnp.concatenate([o_a, o_b], axis=1), o_full) < 1e-4
  assert rel_rms(s_b, s_full) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_gates(impl):
  """g = -30 (decay to ~0) stays finite; beta = 0 with g = 0 leaves the state unchanged."""
  inputs, cotangents = make_inputs(5, 1, 40, 1, 16, 16, jnp.float32)
  q, k, v, g, beta, s0 = inputs
  kwargs = dict(use_qk_l2norm=True, chunk_size=16)
  tiny = (q, k, v, jnp.full_like(g, -30.0), beta, s0)
  got = outputs_and_grads(impl, tiny, cotangents, **kwargs)
  want = reference(tiny, cotangents, **kwargs)
  dg_index = NAMES.index("dg")  # dg ~ exp(-30): compare it absolutely, the rest relatively
  np.testing.assert_allclose(got[dg_index], want[dg_index], atol=1e-6)
  drop = lambda xs: xs[:dg_index] + xs[dg_index + 1:]
  assert_close(drop(got), drop(want), 1e-4, names=drop(NAMES))
  _, s = kernels.gated_delta_rule(q, k, v, jnp.zeros_like(g), jnp.zeros_like(beta),
                                  initial_state=s0, implementation=impl, **kwargs)
  np.testing.assert_allclose(s, s0, rtol=1e-6, atol=1e-6)


def test_registered_and_dispatched():
  names = kernels.available_implementations()
  assert {"pallas_triton", "pallas_mosaic_tpu"} <= set(names)
  assert kernels.default_implementations("gpu") == ("pallas_triton", "chunked")
  # The Mosaic TPU kernel has never run on a TPU: by name only there.
  assert kernels.default_implementations("tpu") == ("chunked",)
  assert kernels.default_implementations("cpu") == ("chunked",)


def test_registry_is_immutable():
  with pytest.raises(TypeError):
    api.REGISTRY["mine"] = api.REGISTRY["chunked"]
  with pytest.raises(TypeError):
    api.DEFAULT_ORDER["gpu"] = ("chunked",)
  assert all(isinstance(order, tuple) for order in api.DEFAULT_ORDER.values())
  assert all(impl.name == name for name, impl in api.REGISTRY.items())


def test_tuned_implementation_matches_default():
  """A Tuning builds its own implementation record, passed as `implementation=`; here smaller
  K- and V-tiles (several tiles in kernels 4a/4b) and float32 intermediates for bf16 inputs."""
  from kernels.gated_delta_rule import pallas_triton
  tuning = pallas_triton.Tuning(block_k=16, grads_block_v=16, block_v=16,
                                wide_intermediates=True)
  impl = pallas_triton.make_implementation(tuning)
  assert impl.name == ("pallas_triton[block_k=16,block_v=16,grads_block_v=16,"
                       "wide_intermediates=True]")
  assert impl.name not in kernels.available_implementations()
  assert pallas_triton.IMPLEMENTATION.name == "pallas_triton"
  inputs, cotangents = make_inputs(2, 1, 40, 1, 32, 32, jnp.bfloat16)
  kwargs = dict(use_qk_l2norm=True, chunk_size=16)
  got = outputs_and_grads(impl, inputs, cotangents, **kwargs)
  assert_close(got, reference(inputs, cotangents, **kwargs), TOLERANCE[jnp.bfloat16])


def test_gpu_default_passes_float32_over_to_chunked():
  """bf16 inputs get the Triton kernels by default on a GPU; float32 (measured slower) chunked."""
  x16, x32 = jnp.zeros((1, 8, 1, 16), jnp.bfloat16), jnp.zeros((1, 8, 1, 16), jnp.float32)
  assert api.default_candidates(x16, "gpu") == (("pallas_triton", "chunked"), [])
  names, skipped = api.default_candidates(x32, "gpu")
  assert names == ("chunked",)
  assert len(skipped) == 1 and skipped[0].startswith("pallas_triton: float32")
  assert api.default_candidates(x32, "cpu") == (("chunked",), [])


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_rule_not_implemented(impl):
  (q, k, v, g, beta, _), _ = make_inputs(0, 1, 8, 1, 16, 16, jnp.float32)
  with pytest.raises(NotImplementedError, match="gated delta rule only"):
    kernels.gated_linear_rule(q, k, v, g, beta, implementation=impl)
  # Without a name the dispatcher falls back to the chunked path.
  o, _ = kernels.gated_linear_rule(q, k, v, g, beta)
  assert np.all(np.isfinite(o))


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_l2norm_matches_jax_l2norm(impl):
  """The norm fused into kernel 1 (and its hand-written backward) equals normalising in JAX
  (api.prepare_qk, differentiated by autodiff) before the un-normalised kernels."""
  inputs, cotangents = make_inputs(11, 1, 50, 2, 48, 32, jnp.float32)
  scale = 0.37

  def fused(q, k, *rest):
    return kernels.gated_delta_rule(q, k, *rest[:3], initial_state=rest[3], scale=scale,
                                    use_qk_l2norm=True, chunk_size=16, implementation=impl)

  def in_jax(q, k, *rest):
    q, k = api.prepare_qk(q, k, scale=scale, use_qk_l2norm=True)
    return kernels.gated_delta_rule(q, k, *rest[:3], initial_state=rest[3], scale=1.0,
                                    use_qk_l2norm=False, chunk_size=16, implementation=impl)

  got, want = (outputs_and_grads_of(f, inputs, cotangents) for f in (fused, in_jax))
  assert_close(got, want, 1e-5)


def test_dispatcher_falls_back_when_a_kernel_refuses(monkeypatch):
  """On a GPU the Triton kernel is tried first for bf16; it refuses the linear rule, so "chunked"
  runs (the kernel raises before it would launch anything, so this runs on a CPU too)."""
  monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
  assert kernels.default_implementations()[0] == "pallas_triton"
  (q, k, v, g, beta, s0), _ = make_inputs(1, 1, 20, 2, 16, 16, jnp.bfloat16)
  assert api.default_candidates(q) == (("pallas_triton", "chunked"), [])
  got = kernels.gated_linear_rule(q, k, v, g, beta, initial_state=s0)
  want = kernels.gated_linear_rule(q, k, v, g, beta, initial_state=s0, implementation="chunked")
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


# warps: kernels 1, 2, 3, 4a, 4b. At chunk 32 with K, V <= 64 (the Rule 110 window) kernels 1, 4a
# and 4b run 2 warps (`Tuning.narrow_warps`); float32 inputs run 4a with 8 (a Triton miscompile).
@pytest.mark.parametrize("dtype,chunk,dk,dv,l2norm,warps", [
    (jnp.bfloat16, 64, 256, 256, True, (4, 4, 4, 4, 4)),
    (jnp.bfloat16, 32, 64, 64, True, (2, 4, 4, 2, 2)),
    (jnp.bfloat16, 32, 128, 64, True, (4, 4, 4, 4, 4)),
    (jnp.float32, 32, 64, 48, False, (2, 4, 4, 8, 2)),
    (jnp.float32, 16, 100, 60, False, (4, 4, 4, 8, 4))])
def test_triton_kernels_lower_for_a_gpu(monkeypatch, dtype, chunk, dk, dv, l2norm, warps):
  """On any machine: the compiled (not interpreted) Triton kernels of fwd+bwd lower to Triton IR
  for an H200 (every primitive has a Triton lowering rule), launched with the tuned warps; Triton
  itself compiles on the GPU."""
  from kernels.gated_delta_rule import pallas_triton
  monkeypatch.setattr(pallas_triton, "_on_gpu", lambda: True)
  inputs, cotangents = make_inputs(0, 2, 100, 2, dk, dv, dtype)

  def f(inputs, cotangents):
    return outputs_and_grads("pallas_triton", inputs, cotangents, use_qk_l2norm=l2norm,
                             chunk_size=chunk)

  with abstract_gpu():
    text = jax.jit(f).trace(inputs, cotangents).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if TRITON_CALL in line]
  assert len(calls) == 5  # kernels 1 and 2 (under the VJP), 3, 4a, 4b
  assert tuple(int(re.search(r"num_warps = (\d+)", c).group(1)) for c in calls) == warps


def test_triton_refuses_float32_large_k_at_chunk_64(monkeypatch):
  """Compiled, float32 inputs at chunk 64 with K padded above 128 would need more shared memory
  in kernel 1 than an H100/H200 block has: NotImplementedError with the reason and the fallback
  (raised before anything compiles, so this runs on a CPU). Dispatch without a name still runs:
  float32 goes to "chunked" on a GPU by default."""
  from kernels.gated_delta_rule import pallas_triton
  monkeypatch.setattr(pallas_triton, "_on_gpu", lambda: True)
  (q, k, v, g, beta, s0), _ = make_inputs(0, 1, 100, 1, 200, 64, jnp.float32)  # K pads to 256
  with pytest.raises(NotImplementedError, match=r"K padded to 256 at chunk 64 do not fit kernel 1 "
                     r"in shared memory when compiled.*Use 'chunked'"):
    kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=64,
                             implementation="pallas_triton")
  refusal = lambda dtype, chunk, dk, interpret=False: pallas_triton._refusal(
      chunk, dk, jnp.dtype(dtype), interpret)
  assert refusal(jnp.float32, 64, 256)
  assert not any([refusal(jnp.float32, 64, 128), refusal(jnp.float32, 32, 256),
                  refusal(jnp.bfloat16, 64, 256), refusal(jnp.float16, 64, 256),
                  refusal(jnp.float32, 64, 256, interpret=True)])
  monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
  got = kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=64)
  want = kernels.gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=64,
                                  implementation="chunked")
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_sequential_kernels_pipeline_depth():
  """The tuned depths where they were measured (K <= 128); fewer stages where one step's loads
  would overflow an H100's shared memory (K = 256, chunk 64)."""
  from kernels.gated_delta_rule import pallas_triton
  stages = lambda dtype, dk: pallas_triton._state_stages(jnp.dtype(dtype), 64, dk, 64,
                                                          pallas_triton.DEFAULT_TUNING)
  assert [stages(jnp.bfloat16, dk) for dk in (64, 128, 256)] == [3, 3, 2]
  assert [stages(jnp.float32, dk) for dk in (64, 128, 256)] == [2, 2, 1]


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("decay", [False, True])
def test_unit_lower_inverse_is_exact(chunk, decay):
  """Kernel 1's T = (I + A)^-1 (16x16 diagonal blocks substituted together, then doubling) on
  values, against float64, where the product form failed: no decay, beta near 1 and keys drawn
  as fla draws them (uniform in [0, 1), unit length: ~0.75 apart in cosine)."""
  from kernels.gated_delta_rule import _pallas_common as common
  rng = np.random.default_rng(chunk)
  k = rng.random((chunk, 64))
  k /= np.linalg.norm(k, axis=1, keepdims=True)
  beta = 1.0 - 0.01 * rng.random(chunk)
  gamma = np.cumsum(np.log(rng.uniform(0.9, 1.0, chunk))) if decay else np.zeros(chunk)
  kk = (k @ k.T).astype(np.float32)
  d = np.exp(np.tril(gamma[:, None] - gamma[None, :], -1))
  a = np.tril(kk * d * beta[:, None], -1).astype(np.float32)
  cfg = common.KernelConfig(chunk_size=chunk, block_v=16, block_k=16, grads_block_v=16,
                            compute_dtype="float32", intermediate_dtype="float32",
                            fp32_precision=jax.lax.Precision.HIGHEST, interpret=True)
  col = lambda x: jnp.asarray(x, jnp.float32)[:, None]
  t = common.unit_lower_inverse(
      jnp.asarray(a), common.diagonal_blocks_t(jnp.asarray(kk), col(gamma), col(gamma).T,
                                               col(beta).T), cfg)
  want = np.linalg.inv(np.eye(chunk) + a.astype(np.float64))
  assert rel_rms(np.eye(chunk) - a, want) > 0.1  # far from first order: A's powers matter
  assert np.all(np.triu(np.asarray(t), 1) == 0)
  assert rel_rms(t, want) < 1e-6
