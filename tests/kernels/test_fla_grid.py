"""Every implementation on inputs drawn as flash-linear-attention's tests draw them, against a
float64 loop, values and gradients.

Drawing (after fla's `tests/ops/test_gdn.py`): q, k, v uniform in [0, 1) (so keys correlate:
their directions are ~0.75 apart in cosine); without the in-op L2 norm q and k are given unit
length; g = log sigmoid(U) / normalizer, set to 0 with probability mask_p (mask_p = 1: no decay
at all); beta = sigmoid(U) as in fla, or near 0, or near 1; an initial state of N(0, 1) or zeros;
random cotangents on o and the final state. This is the regime (little decay, aligned keys) that
broke the product-form inverse of the Pallas kernels (issue 15).

The grid: T never a chunk multiple (24 .. 200), K/V of 60, 64, 100, 128, 256 (and K != V), scale
1 and 0.1, gate normalizers 0.01 .. 10, mask_p 0 / 0.5 / 1, the three betas, L2 norm on and off,
initial state or not, chunks 16 / 32 / 64, float32 and bfloat16. Shapes and static options are
shared by several draws so that each implementation compiles about 17 times.

Runs:
- CI (default markers, CPU, Pallas interpreted): `CI_CASES`, the three cases of issue 15 that
  failed (B = 1, H = 2) for every implementation, two more for the Pallas kernels
  (`KERNEL_CASES`: bfloat16, chunk 16, padded K, beta near 1) and `MOSAIC_GPU_CASES`.
- The whole grid (`kernel_grid` marker), compiled on the GPU in one run, from the repo root:
    PYTHONUNBUFFERED=1 FLA_GRID_ERRORS=$OUT/fla_grid.jsonl PYTHONPATH=/tmp/site:. timeout 540 \
        python3 -m pytest tests/kernels/test_fla_grid.py -m "" -q -p no:cacheprovider \
        --durations=15 2>&1 | tee $OUT/fla_grid_log.txt
    python3 tests/kernels/test_fla_grid.py $OUT/fla_grid.jsonl | tee -a $OUT/fla_grid_log.txt
  (the second command prints the worst error per implementation, dtype and output). On a CPU the
  same `-m ""` run interprets the Pallas kernels: 244 tests, ~6.5 minutes on 2 cores.
- Compiled on the GPU, pallas_triton refuses float32 inputs at chunk 64 with K padded above 128
  (kernel 1 would need more shared memory than a block has; `pallas_triton._refusal`): for the
  two float32 K = V = 256, T = 200 cases the test asserts that NotImplementedError and its
  message (`refused`); interpreted, the kernels run them. `test_grid_refusals_as_on_a_gpu`
  checks that path on a CPU.
- pallas_mosaic_gpu (compiled on the GPU, in GPU interpret mode on a CPU: its 44 cases take ~2
  minutes on one core) runs every case at chunk 64, its only chunk, and refuses K padded above
  64 in float32 and above 192 in bfloat16 (SMEM; `test_grid_refusals_of_the_mosaic_gpu_kernel`
  checks which cases, on a CPU). CI also runs it on `MOSAIC_GPU_CASES`: the float32 case that
  failed compiled (dg off by 2e-5 absolutely where the true dg is ~1e-15) until its gradient
  kernel took dP's diagonal out of the products (`pallas_mosaic_gpu_grads`).

Tolerances, on the relative RMS error ||x - ref|| / ||ref|| of every output and gradient; as in
fla's `assert_close`, an output also passes when its largest absolute error is <= 1e-6 (with
normalizer 0.01 the true dg is ~1e-15: the chunked forms compute it as a difference of O(1)
terms, exact to ~1e-7 absolutely and to nothing relatively; the float32 oracle scan gets it
right):
- float32 inputs: 2e-4 forward, 1e-3 gradients (issue 15). Interpreted, every implementation
  sits at 1e-7 .. 2e-6; compiled on the GPU the kernels run float32 products as 3 tf32 passes.
- bfloat16 inputs: 2e-2 for o, the final state, dq, dk, dv, dh0 and 5e-2 for dg, dbeta. The
  oracle gets the rounded inputs; o, dq, dk, dv come back in bfloat16 (that rounding alone is
  ~2e-3), and the kernels store what passes between them (T, chunk states, dS, Vnew) in
  bfloat16 and multiply bfloat16 operands, as fla does. fla's own test (fp16, a rounding step
  8x finer than bfloat16's) allows 5e-3 (o), 8e-3 (dq, dk, dv, dh0) and 2e-2 (dbeta, dg): the
  gate gradients, sums of many products that largely cancel, get 2.5x the others there too.
  Measured worst interpreted, pallas_triton: 1.0e-2 (o), 1.1e-2 (dv), 1.3e-2 (dbeta), 2.7e-2
  (dg, no decay with aligned keys); float32 intermediates (`Tuning(wide_intermediates=True)`)
  give 9e-3 there, chunked and recurrent 4e-3.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from tests.numerics import rel_rms

BACKEND = jax.default_backend()
# Everything registered that runs here: on a CPU the Pallas kernels run interpreted; the TPU
# interpreter does not run on a GPU.
IMPLS = {"gpu": ("recurrent", "chunked", "pallas_triton", "pallas_mosaic_gpu"),
         "tpu": ("recurrent", "chunked", "pallas_mosaic_tpu"),
         "cpu": ("recurrent", "chunked", "pallas_triton", "pallas_mosaic_tpu",
                 "pallas_mosaic_gpu")}[BACKEND]
PALLAS = tuple(i for i in IMPLS if i.startswith("pallas"))
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state")
# (o and final state, dq dk dv dh0, dg and dbeta) per input dtype; see the module docstring.
TOLERANCE = {"float32": (2e-4, 1e-3, 1e-3), "bfloat16": (2e-2, 2e-2, 5e-2)}
ATOL = 1e-6  # fla's err_atol: an output whose largest absolute error is below this passes
EPS = 1e-6  # the op's L2-norm epsilon
T_REF = 256  # the float64 oracle runs padded to this length: one compile per shape and norm


@dataclasses.dataclass(frozen=True)
class Case:
  t: int
  dk: int
  dv: int
  chunk: int
  scale: float
  l2norm: bool
  dtype: str
  normalizer: float  # g = log sigmoid(U) / normalizer
  mask_p: float  # probability that g is set to 0
  beta: str = "fla"  # "fla": sigmoid(U); "zero": 0.01 U; "one": 1 - 0.01 U
  state: bool = False  # an N(0, 1) initial state, else zeros
  b: int = 2
  h: int = 2

  @property
  def id(self) -> str:
    return (f"T{self.t}K{self.dk}V{self.dv}C{self.chunk}s{self.scale:g}"
            f"{'-l2' if self.l2norm else ''}-{self.dtype}-n{self.normalizer:g}-m{self.mask_p:g}"
            f"-b{self.beta}{'-h0' if self.state else ''}-B{self.b}H{self.h}")


def _variants(t, dk, dv, chunk, scale, l2norm, dtype, draws):
  """One shape and static options, several draws (normalizer, mask_p, beta, state)."""
  return [Case(t, dk, dv, chunk, scale, l2norm, dtype, *d) for d in draws]


# The three failures of issue 15 (pallas o off by 21x interpreted, 60x compiled, in the first).
ISSUE_CASES = [
    Case(75, 64, 64, 64, 1.0, False, "float32", 1.0, 1.0, b=1),  # g = 0, unit keys
    Case(40, 128, 128, 64, 0.1, True, "float32", 10.0, 0.0, b=1),
    Case(40, 128, 128, 64, 0.1, True, "float32", 10.0, 1.0, b=1),  # g = 0
]
# For the kernels also: the first in bfloat16; chunk 16 with K = V = 60 (padded), the L2 norm,
# beta near 1 and a state, in bfloat16.
KERNEL_CASES = [
    dataclasses.replace(ISSUE_CASES[0], dtype="bfloat16"),
    Case(63, 60, 60, 16, 1.0, True, "bfloat16", 0.1, 0.0, "one", True, b=1),
]
# Full decay (normalizer 0.01: g in [-70, -30], each token forgets the state), float32: the
# true dg is ~1e-15, a difference of O(1) terms that cancel.
MOSAIC_GPU_CASES = [Case(75, 64, 64, 64, 1.0, False, "float32", 0.01, 0.0, "fla", True)]
CI_CASES = ([(c, impl) for c in ISSUE_CASES for impl in IMPLS]
            + [(c, impl) for c in KERNEL_CASES for impl in PALLAS]
            + [(c, i) for c in MOSAIC_GPU_CASES for i in PALLAS if i == "pallas_mosaic_gpu"])

F32, BF16 = "float32", "bfloat16"
GRID = [
    # float32
    *_variants(75, 64, 64, 64, 1.0, False, F32, [(1.0, 1.0), (0.01, 0.0, "fla", True),
                                                 (1.0, 0.5, "one", True), (10.0, 0.0, "zero")]),
    *_variants(40, 128, 128, 64, 0.1, True, F32, [(10.0, 0.0), (10.0, 1.0),
                                                  (0.1, 0.5, "one", True),
                                                  (1.0, 0.0, "zero", True)]),
    *_variants(63, 60, 60, 16, 1.0, False, F32, [(1.0, 0.0), (0.1, 1.0, "one", True),
                                                 (10.0, 0.5, "fla", True)]),
    *_variants(100, 100, 100, 32, 0.1, True, F32, [(1.0, 0.5), (0.01, 0.0, "one", True),
                                                   (10.0, 1.0, "fla", True)]),
    *_variants(130, 128, 128, 32, 1.0, False, F32, [(0.1, 0.0), (10.0, 1.0, "one"),
                                                    (1.0, 0.5, "zero", True)]),
    *_variants(90, 64, 128, 64, 1.0, True, F32, [(0.01, 0.5, "fla", True), (1.0, 1.0, "one")]),
    *_variants(200, 256, 256, 64, 0.1, True, F32, [(1.0, 0.0, "fla", True), (10.0, 1.0, "one")]),
    *_variants(50, 256, 256, 16, 1.0, False, F32, [(10.0, 1.0, "fla", True), (0.1, 0.5, "zero")]),
    # chunk 32 with K, V padded to <= 64: pallas_triton's 2-warp launch (`Tuning.narrow_warps`)
    *_variants(56, 60, 60, 32, 1.0, False, F32, [(1.0, 1.0), (0.1, 0.5, "one", True)]),
    # bfloat16
    *_variants(75, 64, 64, 64, 1.0, False, BF16, [(1.0, 1.0), (0.01, 0.0, "fla", True),
                                                  (1.0, 0.5, "one")]),
    *_variants(40, 128, 128, 64, 0.1, True, BF16, [(10.0, 0.0), (10.0, 1.0, "fla", True),
                                                   (1.0, 0.5, "zero")]),
    *_variants(63, 60, 60, 16, 1.0, True, BF16, [(0.1, 0.0, "one", True), (1.0, 1.0)]),
    *_variants(100, 100, 100, 32, 0.1, False, BF16, [(10.0, 0.5, "fla", True), (1.0, 0.0, "one")]),
    *_variants(130, 128, 128, 64, 0.1, True, BF16, [(1.0, 0.0, "fla", True), (10.0, 1.0, "one"),
                                                    (0.1, 0.5, "zero")]),
    *_variants(130, 64, 64, 16, 0.1, False, BF16, [(0.01, 0.0), (10.0, 1.0, "one", True)]),
    *_variants(200, 256, 256, 32, 1.0, True, BF16, [(1.0, 0.5, "fla", True), (10.0, 1.0, "one")]),
    # the Rule 110 window: T = 24 in one 32-token chunk, K = V = 64, at 2 warps as above
    *_variants(24, 64, 64, 32, 1.0, True, BF16, [(1.0, 1.0), (0.1, 0.0, "fla", True)]),
]
GRID_CASES = [(c, impl) for c in GRID for impl in IMPLS]


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 oracle.


def _unit(x):
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + EPS)


def draw(case: Case):
  """float64 inputs (rounded to the case's dtype, as the op gets them) and cotangents."""
  rng = np.random.default_rng(zlib.crc32(case.id.encode()))
  b, t, h = case.b, case.t, case.h
  q, k = rng.random((b, t, h, case.dk)), rng.random((b, t, h, case.dk))
  if not case.l2norm:
    q, k = _unit(q), _unit(k)
  v = rng.random((b, t, h, case.dv))
  g = -np.logaddexp(0.0, -rng.random((b, t, h))) / case.normalizer
  g = g * (rng.random((b, t, h)) >= case.mask_p)
  u = rng.random((b, t, h))
  beta = {"fla": 1.0 / (1.0 + np.exp(-u)), "zero": 0.01 * u, "one": 1.0 - 0.01 * u}[case.beta]
  s0 = (rng.standard_normal((b, h, case.dk, case.dv)) if case.state
        else np.zeros((b, h, case.dk, case.dv)))
  do = rng.standard_normal((b, t, h, case.dv))
  ds = rng.standard_normal((b, h, case.dk, case.dv))
  rounded = lambda x, dtype: np.asarray(jnp.asarray(x, jnp.float32).astype(dtype), np.float64)
  # q, k, v and do in the case's dtype; g, beta and the states in float32.
  args = tuple(rounded(x, case.dtype) for x in (q, k, v)) + tuple(
      rounded(x, "float32") for x in (g, beta, s0))
  return args, (rounded(do, case.dtype), rounded(ds, "float32"))


def _oracle(q, k, v, g, beta, s0, scale, *, l2norm):
  if l2norm:
    q, k = (x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + EPS) for x in (q, k))
  q = q * scale

  def step(s, x):
    q_t, k_t, v_t, g_t, b_t = x
    s = s * jnp.exp(g_t)[..., None, None]
    v_t = v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t, precision="highest")
    s = s + k_t[..., :, None] * (b_t[..., None] * v_t)[..., None, :]
    return s, jnp.einsum("bhkv,bhk->bhv", s, q_t, precision="highest")

  s, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)))
  return jnp.moveaxis(o, 0, 1), s


@functools.partial(jax.jit, static_argnames="l2norm")
def _oracle_vjp(args, cotangents, scale, *, l2norm):
  out, pullback = jax.vjp(lambda *a: _oracle(*a, scale, l2norm=l2norm), *args)
  return (*out, *pullback(cotangents))


@functools.lru_cache(maxsize=4)
def reference(case: Case):
  """(inputs, cotangents, the oracle's o, final state and 6 gradients), all float64.

  The oracle runs padded to T_REF tokens with q = k = v = 0, g = beta = 0 and a zero cotangent:
  they leave the state, the outputs and every gradient of the real tokens unchanged.
  """
  args, cotangents = draw(case)
  pad = lambda x: np.pad(x, [(0, 0), (0, T_REF - case.t)] + [(0, 0)] * (x.ndim - 2))
  with jax.enable_x64(True):
    padded = tuple(map(jnp.asarray, (*map(pad, args[:5]), args[5])))
    cots = (jnp.asarray(pad(cotangents[0])), jnp.asarray(cotangents[1]))
    outs = _oracle_vjp(padded, cots, jnp.float64(case.scale), l2norm=case.l2norm)
    outs = [np.asarray(x, np.float64) for x in outs]
  trim = lambda x: x[:, :case.t]
  outs = [trim(outs[0]), outs[1], *map(trim, outs[2:7]), outs[7]]
  return args, cotangents, outs


# ---------------------------------------------------------------------------------------------
# The op under test.


@functools.partial(jax.jit, static_argnames=("impl", "chunk", "scale", "l2norm"))
def _op_vjp(args, cotangents, *, impl, chunk, scale, l2norm):
  def f(q, k, v, g, beta, s0):
    return kernels.gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=s0,
                                    use_qk_l2norm=l2norm, chunk_size=chunk, implementation=impl)
  out, pullback = jax.vjp(f, *args)
  return (*out, *pullback(cotangents))


def run(case: Case, impl: str, args, cotangents):
  dtype = jnp.dtype(case.dtype)
  to = lambda x, dt: jnp.asarray(x, jnp.float32).astype(dt)
  args = tuple(to(x, dtype) for x in args[:3]) + tuple(to(x, jnp.float32) for x in args[3:])
  cotangents = (to(cotangents[0], dtype), to(cotangents[1], jnp.float32))
  # "recurrent" ignores the chunk: one value shares its compilations; pallas_mosaic_gpu runs
  # chunk 64 only (a warpgroup's wgmma M), so it runs every shape of the grid at 64.
  chunk = 64 if impl in FIXED_CHUNK_64 else case.chunk
  outs = _op_vjp(args, cotangents, impl=impl, chunk=chunk, scale=case.scale, l2norm=case.l2norm)
  return [np.asarray(x.astype(jnp.float32), np.float64) for x in outs]


def _record(case, impl, errors, max_abs, refused=None):
  path = os.environ.get("FLA_GRID_ERRORS")
  if path:
    record = {"case": case.id, "impl": impl, "dtype": case.dtype, "backend": BACKEND,
              "errors": errors, "max_abs": max_abs}
    if refused:
      record["refused"] = refused
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


FIXED_CHUNK_64 = ("recurrent", "pallas_mosaic_gpu")


def refused(case: Case, impl: str) -> bool:
  """Whether the implementation refuses the case here:
  - the compiled Triton kernels take no float32 inputs at chunk 64 with K padded above 128
    (kernel 1 would need more shared memory than an H100/H200 block has;
    pallas_triton._refusal). The chunk is the one the kernels run: a sequence shorter than the
    chunk runs with a smaller power of 2 (>= 16);
  - pallas_mosaic_gpu (every backend: its check runs before anything compiles) keeps its chunk
    operands in SMEM, with K padded to a multiple of 64: float32 (bf16 hi/lo operand pairs) only
    at K <= 64, bfloat16 at K <= 192 (the backward kernel's limits; the other kernels fit
    wherever it does, test_pallas_mosaic_gpu.test_smem_limits)."""
  if impl == "pallas_mosaic_gpu":
    k_padded = -(-case.dk // 64) * 64
    return k_padded > (64 if case.dtype == "float32" else 192)
  chunk = min(case.chunk, max(16, _next_power_of_2(case.t)))
  return (impl == "pallas_triton" and BACKEND == "gpu" and case.dtype == "float32"
          and chunk == 64 and _next_power_of_2(case.dk) > 128)


REFUSALS = {"pallas_triton": "do not fit kernel 1 in shared memory",
            "pallas_mosaic_gpu": "KiB of SMEM, over"}


def check(case: Case, impl: str):
  if refused(case, impl):
    args, cotangents = draw(case)
    with pytest.raises(NotImplementedError, match=REFUSALS[impl]) as e:
      run(case, impl, args, cotangents)
    _record(case, impl, None, None, refused=str(e.value))
    return
  args, cotangents, want = reference(case)
  got = run(case, impl, args, cotangents)
  for name, x in zip(NAMES, got, strict=True):
    assert np.all(np.isfinite(x)), f"{name} is not finite"
  errors = {n: rel_rms(x, w) for n, x, w in zip(NAMES, got, want, strict=True)}
  max_abs = {n: float(np.max(np.abs(x - w))) for n, x, w in zip(NAMES, got, want, strict=True)}
  _record(case, impl, errors, max_abs)
  bad = {n: f"{e:.2e}" for n, e in errors.items()
         if not (e <= tolerance(case.dtype, n) or max_abs[n] <= ATOL)}
  assert not bad, (f"relative RMS error above tolerance {TOLERANCE[case.dtype]}: {bad}; all: "
                   f"{ {n: f'{e:.1e}' for n, e in errors.items()} }")


def tolerance(dtype: str, name: str) -> float:
  fwd, grads, gate_grads = TOLERANCE[dtype]
  return fwd if name in ("o", "final_state") else gate_grads if name in ("dg", "dbeta") else grads


@pytest.mark.parametrize("case,impl", [pytest.param(c, i, id=f"{c.id}-{i}") for c, i in CI_CASES])
def test_issue_cases(case, impl):
  check(case, impl)


def test_grid_refusals_as_on_a_gpu(monkeypatch):
  """The grid cases that the compiled Triton kernels refuse (on a CPU, with the GPU pretended:
  the refusal comes before anything compiles): exactly the two float32 K = V = 256 cases at
  chunk 64, and each with the message."""
  from kernels.gated_delta_rule import pallas_triton
  monkeypatch.setattr(sys.modules[__name__], "BACKEND", "gpu")
  monkeypatch.setattr(pallas_triton, "_on_gpu", lambda: True)
  cases = [c for c in GRID if refused(c, "pallas_triton")]
  assert [(c.t, c.dk, c.dv, c.chunk, c.dtype) for c in cases] == [(200, 256, 256, 64, F32)] * 2
  for case in cases:
    check(case, "pallas_triton")


def test_grid_refusals_of_the_mosaic_gpu_kernel():
  """The grid cases pallas_mosaic_gpu refuses (its SMEM check runs before anything compiles, so
  on a CPU too): float32 at K = 100, 128, 256 and bfloat16 at K = 256, each with the message;
  it runs the other 28 cases (on the GPU: `-m kernel_grid`)."""
  cases = [c for c in GRID if refused(c, "pallas_mosaic_gpu")]
  assert sorted({(c.dk, c.dtype) for c in cases}) == [
      (100, F32), (128, F32), (256, BF16), (256, F32)]
  assert len(GRID) - len(cases) == 28
  for case in cases:
    args, cotangents = draw(case)
    with pytest.raises(NotImplementedError, match=REFUSALS["pallas_mosaic_gpu"]):
      run(case, "pallas_mosaic_gpu", args, cotangents)


@pytest.mark.kernel_grid
@pytest.mark.parametrize("case,impl",
                         [pytest.param(c, i, id=f"{c.id}-{i}") for c, i in GRID_CASES])
def test_grid(case, impl):
  check(case, impl)


def summarize(path: str) -> str:
  """The worst relative error per implementation, dtype and output of a FLA_GRID_ERRORS file,
  leaving out errors that pass on ATOL and the cases refused as expected (both listed apart)."""
  worst, on_atol, refusals = {}, [], []
  for line in open(path):
    r = json.loads(line)
    if r.get("refused"):
      refusals.append(f"{r['impl']} {r['case']}")
      continue
    for name, err in r["errors"].items():
      if err > tolerance(r["dtype"], name) and r["max_abs"][name] <= ATOL:
        on_atol.append(f"{r['impl']} {r['case']} {name} rel {err:.1e} max abs "
                       f"{r['max_abs'][name]:.1e}")
        continue
      key = (r["impl"], r["dtype"], name)
      if err > worst.get(key, (-1.0, ""))[0]:
        worst[key] = (err, r["case"])
  rows = ["impl dtype output worst-relative-RMS (tolerance) case"]
  rows += [f"{i} {d} {n} {e:.2e} ({tolerance(d, n):g}) {c}"
           for (i, d, n), (e, c) in sorted(worst.items())]
  rows += [f"passed on max abs error <= {ATOL:g}: {len(on_atol)}", *on_atol]
  rows += [f"refused as expected (NotImplementedError): {len(refusals)}", *refusals]
  return "\n".join(rows)


if __name__ == "__main__":
  print(summarize(sys.argv[1]))
