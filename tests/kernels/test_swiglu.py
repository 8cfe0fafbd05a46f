"""kernels.swiglu: the SwiGLU MLP's Pallas kernels (interpreted here) against a plain float32
MLP at HIGHEST precision, outputs and every gradient, on fresh random inputs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.swiglu import swiglu_mlp
from tests.numerics import rel_rms

HIGHEST = jax.lax.Precision.HIGHEST


def oracle(x, wg, wu, wd):
  x, wg, wu, wd = (a.astype(jnp.float32) for a in (x, wg, wu, wd))
  dot = lambda a, b: jnp.matmul(a, b, precision=HIGHEST)
  return dot(jax.nn.silu(dot(x, wg)) * dot(x, wu), wd)


def inputs(seed, lead, d, f, dtype):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (*lead, d))
  wg, wu = (jax.random.normal(k, (d, f)) / np.sqrt(d) for k in ks[1:3])
  wd = jax.random.normal(ks[3], (f, d)) / np.sqrt(f)
  dy = jax.random.normal(ks[4], (*lead, d))
  return [a.astype(dtype) for a in (x, wg, wu, wd)], dy.astype(dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("lead,d,f,blocks", [
    ((2, 64), 64, 256, {}),                                   # rows divide the 64-row block
    ((3, 25), 128, 128, {}),                                  # 75 rows: padded to 128
    ((96,), 64, 256, {"block_rows": 32, "block_hidden": 64}),
])
def test_matches_a_plain_mlp_with_gradients(dtype, tol, lead, d, f, blocks):
  args, dy = inputs(hash((lead, d, f)) % 2**31, lead, d, f, dtype)
  got, vjp = jax.vjp(lambda *a: swiglu_mlp(*a, **blocks), *args)
  want, vjp_want = jax.vjp(oracle, *(a.astype(jnp.float32) for a in args))
  assert got.dtype == dtype and got.shape == (*lead, d)
  assert rel_rms(got, want) < tol
  for name, g, w in zip(("dx", "dw_gate", "dw_up", "dw_down"), vjp(dy),
                        vjp_want(dy.astype(jnp.float32)), strict=True):
    assert g.dtype == dtype, name
    assert rel_rms(g, w) < tol, name


def test_jit_and_grad_of_a_loss():
  (x, wg, wu, wd), _ = inputs(7, (128,), 64, 128, jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(jnp.tanh(fn(*a)))
  got = jax.jit(jax.grad(loss(swiglu_mlp), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
  want = jax.grad(loss(oracle), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
  for g, w in zip(got, want, strict=True):
    assert rel_rms(g, w) < 1e-5


def test_vmapped_over_seeds_with_their_own_weights():
  """The trainer vmaps the step over model seeds: inputs and weights both get a leading axis."""
  per_seed = [inputs(s, (40,), 64, 128, jnp.float32) for s in (11, 12)]
  stacked = [jnp.stack(a) for a in zip(*(args for args, _ in per_seed), strict=True)]
  dy = jnp.stack([d for _, d in per_seed])
  got, vjp = jax.vjp(jax.vmap(swiglu_mlp), *stacked)
  want, vjp_want = jax.vjp(jax.vmap(oracle), *stacked)
  assert rel_rms(got, want) < 1e-5
  for g, w in zip(vjp(dy), vjp_want(dy), strict=True):
    assert rel_rms(g, w) < 1e-5


@pytest.mark.parametrize("change,match", [
    ({"w_up": jnp.zeros((64, 64))}, "w_gate and w_up"),
    ({"w_down": jnp.zeros((128, 64), jnp.bfloat16)}, "share a dtype"),
    ({"block_hidden": 48}, "block_hidden=48"),
    ({"block_hidden": 256}, "divides the hidden width F=128"),
    ({"block_rows": 8}, "block_rows=8"),
])
def test_bad_input_names_the_field(change, match):
  (x, wg, wu, wd), _ = inputs(0, (16,), 64, 128, jnp.float32)
  kw = {"w_gate": wg, "w_up": wu, "w_down": wd, **change}
  with pytest.raises(ValueError, match=match):
    swiglu_mlp(x, kw.pop("w_gate"), kw.pop("w_up"), kw.pop("w_down"), **kw)


def test_width_must_be_a_multiple_of_the_k_step():
  (x, wg, wu, wd), _ = inputs(0, (16,), 48, 64, jnp.float32)
  with pytest.raises(ValueError, match="D=48 must be a multiple of 64"):
    swiglu_mlp(x, wg, wu, wd)


def test_benchmark_quick_run(tmp_path):
  """experiments/mlp_benchmark.py on tiny shapes: both implementations checked and timed, with
  their plans' bytes."""
  from experiments import mlp_benchmark

  out = tmp_path / "mlp.json"
  mlp_benchmark.main(["--quick", "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["implementation"] for r in rows] == ["xla", "pallas_triton"]
  for r in rows:
    assert max(r["errors"].values()) < 1e-5
    assert r["fwd"]["median_ms"] > 0 and r["fwd_bwd_plan_ms"] > r["fwd_plan_ms"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("lead,d,f", [((3, 512, 24), 256, 1024), ((1000,), 1024, 4096)])
def test_compiled_on_the_gpu_matches_a_plain_mlp(dtype, tol, lead, d, f):
  """The compiled kernels at the Rule 110 step's MLP shape (3 seeds x 512 x 24 rows, 256 ->
  1024) and a wide one with padded rows, outputs and gradients."""
  args, dy = inputs(5, lead, d, f, dtype)
  got, vjp = jax.vjp(jax.jit(lambda *a: swiglu_mlp(*a, interpret=False)), *args)
  want, vjp_want = jax.vjp(oracle, *(a.astype(jnp.float32) for a in args))
  assert rel_rms(got, want) < tol
  for g, w in zip(vjp(dy), vjp_want(dy.astype(jnp.float32)), strict=True):
    assert rel_rms(g, w) < tol
