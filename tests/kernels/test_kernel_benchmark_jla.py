"""The jla adapter of experiments/kernel_benchmark.py, on a CPU.

jax-linear-attention (import name `jla`) is a benchmark dependency, never a runtime one; it is in
the test extras, and this file is skipped where it is not installed. Its Mosaic GPU kernels need a
Hopper GPU (and their triangular inverse is inline MGPU code, which Pallas's GPU interpreter
cannot run), but every jla impl shares one contract, so the adapter's mapping of our op's inputs
onto jla's call is tested through jla's pure-JAX `reference` (and `chunked`) against our float32
`recurrent` oracle; the benchmark then calls the same adapter with impl="mosaic_gpu".
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jla.ops", reason="jax-linear-attention (import name jla), an optional "
                                      "benchmark dependency, is not installed")

from experiments import kernel_benchmark as kb  # noqa: E402
from kernels.gated_delta_rule import api  # noqa: E402

TOL = 1e-5  # float32, relative RMS; both sides are token-by-token scans at HIGHEST precision
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state")


def _inputs(b, t, h, dk, dv, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q, k = (jax.random.normal(ks[i], (b, t, h, dk)) for i in (0, 1))
  v = jax.random.normal(ks[2], (b, t, h, dv))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 2.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
  s0 = 0.1 * jax.random.normal(ks[5], (b, h, dk, dv))
  cots = (jax.random.normal(ks[6], (b, t, h, dv)), jax.random.normal(ks[7], (b, h, dk, dv)))
  return (q, k, v, g, beta, s0), cots


def _outputs(fn, inputs, cots, grads=True, **options):
  """o, the final state and (with `grads`) the gradients of all six inputs of
  fn(q, k, v, g, beta, initial_state=s0, **options)."""
  def f(q, k, v, g, beta, s0):
    return fn(q, k, v, g, beta, initial_state=s0, **options)

  @jax.jit
  def run(inputs, cots):
    if not grads:
      return f(*inputs)
    out, vjp = jax.vjp(f, *inputs)
    return (*out, *vjp(cots))

  with jax.default_matmul_precision("highest"):
    return run(inputs, cots)


def _oracle(inputs, cots, **options):
  return _outputs(functools.partial(api.gated_delta_rule, implementation="recurrent"), inputs,
                  cots, **options)


def _errors(outputs, reference):
  names = NAMES[:len(outputs)]  # the forward only: o and the final state
  return {n: kb.rel_rms(a, r) for n, a, r in zip(names, outputs, reference, strict=True)}


def _jla(impl):
  return lambda *args, **kw: kb.jla_gated_delta_rule(*args, impl=impl, **kw)


def test_benchmark_op_matches_our_oracle():
  """`jla_op` (what the benchmark times, with its options) against `op` (ours: the recurrent
  oracle) through the benchmark's own check, inputs and cotangents."""
  errors = kb.check(kb.jla_op("reference"), (2, 11, 2, 16), jnp.float32)
  assert max(errors.values()) < TOL, errors


def test_adapter_with_other_options_matches_our_oracle():
  """K != V, no q/k norm, a scale other than K**-0.5."""
  options = dict(use_qk_l2norm=False, scale=0.3)
  inputs, cots = _inputs(2, 11, 2, 16, 8)
  errors = _errors(_outputs(_jla("reference"), inputs, cots, **options),
                   _oracle(inputs, cots, **options))
  assert max(errors.values()) < TOL, errors


# Each entry is the adapter with one plausible convention mistake; the oracle must catch it.
MISTAKES = {
    "gate sign": lambda f, q, k, v, g, beta, **kw: f(q, k, v, -g, beta, **kw),
    "gate as exp(g)": lambda f, q, k, v, g, beta, **kw: f(q, k, v, jnp.exp(g), beta, **kw),
    "gate in log2": lambda f, q, k, v, g, beta, **kw: f(q, k, v, g / jnp.log(2.0), beta, **kw),
    "beta as a logit": lambda f, q, k, v, g, beta, **kw: f(q, k, v, g, jnp.log(beta / (1 - beta)),
                                                           **kw),
    "no scale": lambda f, *a, scale=None, **kw: f(*a, scale=1.0, **kw),
    "no qk norm": lambda f, *a, use_qk_l2norm, **kw: f(*a, use_qk_l2norm=False, **kw),
    "state transposed": lambda f, *a, initial_state, **kw: tuple(
        x if x.ndim != 4 or x.shape[-1] != x.shape[-2] or i == 0 else jnp.swapaxes(x, -1, -2)
        for i, x in enumerate(f(*a, initial_state=jnp.swapaxes(initial_state, -1, -2), **kw))),
}


def test_the_oracle_catches_convention_mistakes():
  """Forward only (o and the final state): every mistake shows there, at half the compiling."""
  inputs, cots = _inputs(2, 11, 2, 16, 16)
  oracle = _oracle(inputs, cots, grads=False, use_qk_l2norm=True)
  f = _jla("reference")
  assert max(_errors(_outputs(f, inputs, cots, grads=False, use_qk_l2norm=True),
                     oracle).values()) < TOL
  for name, mistake in MISTAKES.items():
    wrong = functools.partial(mistake, f)
    errors = _errors(_outputs(wrong, inputs, cots, grads=False, use_qk_l2norm=True), oracle)
    assert max(errors.values()) > 100 * TOL, (name, errors)


def test_off_hopper_mosaic_gpu_is_skipped_with_a_reason(capsys):
  device = jax.devices()[0]
  if device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0":
    pytest.skip("a Hopper GPU: jla's kernels run here")
  assert kb.load_jla("mosaic_gpu") is None
  assert "need a Hopper (sm_90) GPU" in capsys.readouterr().out
  assert callable(kb.load_jla("chunked"))


def test_smoke_run_times_jla_chunked(tmp_path, capsys):
  """The benchmark's jla plumbing (timing, agreement, tables) with jla's chunked standing in."""
  out = tmp_path / "gdr.json"
  kb.main(["--shapes", "smoke_b1_t40_h1_d16", "--impls", "chunked", "--no-check", "--no-fla",
           "--jla-impl", "chunked", "--samples", "1", "--inner", "1", "--out", str(out)])
  results = json.loads(out.read_text())
  row = results["timings"]["smoke_b1_t40_h1_d16"]
  assert results["jla"]["impl"] == "chunked"
  assert row["jla"]["fwd_bwd"]["median_ms"] > 0
  assert max(row["agree_jla"].values()) < 2e-2, row["agree_jla"]
  printed = capsys.readouterr().out
  assert "x jla" in printed and "byte floor" in printed
