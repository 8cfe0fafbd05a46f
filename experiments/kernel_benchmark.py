r"""Benchmark of the gated delta rule: our Pallas kernels and pure-JAX chunked path vs fla and jla.

The peers, in the same process: flash-linear-attention (fla, torch/Triton) and
jax-linear-attention (jla, JAX with Pallas Mosaic GPU kernels, Hopper only). Both are optional
benchmark dependencies, never sleep_lm's: each is skipped, with the reason printed, when it
cannot be imported (jla also off a Hopper GPU).

Run on the GPU machine from the repository root (the wheels of fla, einops and
jax-linear-attention 0.1.0 carried in .whl/); `--samples 11 --inner 10` is issue 24's protocol:
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:. python3 -m experiments.kernel_benchmark --impls pallas_triton chunked \
      --samples 11 --inner 10 --profile-dir /tmp/pk --out $OUT/gdr_bench.json

Checks correctness first (fresh random inputs, relative RMS error of every output and gradient
against the float32 recurrent oracle, one case with no decay and correlated keys; jla's bf16
outputs and gradients against our chunked op on float32 inputs), then times forward and
forward+backward (cotangents on both o and the final state; gradients of q, k, v, g, beta and
the initial state) per registry shape: median with 20/80 percentiles of loops of calls with one
sync. bf16 inputs, fp32 state, q/k L2 norm in the op, chunk 64. For timing only, fla's
backward's guard against a Triton < 3.7.1 bug is lifted
(`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`), so its gradients are never used. jla is
called through `jla_gated_delta_rule`, a thin adapter (its docstring maps the conventions).
Prints a table last (with ours/peer ratios) and the forward's distance to its byte floor on an
H200, and writes JSON. With --profile-dir it also prints device time by kernel (jax.profiler for
ours and jla, torch.profiler for fla) and a table of summed device times, which leaves out fla's
PyTorch launch gaps. `--variants` also checks and times pallas_triton built with other `Tuning`s;
`--impls 'pallas_mosaic_gpu[jax_wy,jax_grads]'` times the Mosaic GPU op with those parts in
pure JAX instead of its kernels (`implementation_of`).

A CPU smoke run (kernels interpreted; jla skipped: tests/kernels/test_kernel_benchmark.py runs
it; with `--jla-impl chunked`, jla's pure-JAX path stands in for its kernels, as in
tests/kernels/test_kernel_benchmark_jla.py):
  python -m experiments.kernel_benchmark --shapes smoke_b1_t40_h1_d16 --no-check --no-fla \
      --samples 1 --inner 1 --variants block_k=16 --out /tmp/gdr_smoke.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.gated_delta_rule import api, pallas_mosaic_gpu, pallas_mosaic_gpu_grads, pallas_triton
from sleep_lm.common import profiling

# name -> (B, T, H, D); K = V = D. The registry shapes are timed by default.
SHAPES = {
    "b4_t4096_h16_d128": (4, 4096, 16, 128),
    "b2_t16384_h16_d128": (2, 16384, 16, 128),
    "b16_t2048_h16_d128": (16, 2048, 16, 128),
    "b64_t2048_h16_d64": (64, 2048, 16, 64),
    "rule110_b512_t24_h4_d64": (512, 24, 4, 64),  # one 24-token window of the Rule 110 model
}
SMOKE_SHAPES = {"smoke_b1_t40_h1_d16": (1, 40, 1, 16)}  # for a CPU run of this script
# HBM bandwidth of an H200 used for the forward's byte floor (the figure of issue 24; the floors
# table in docs/kernels.md used 4.27 TB/s).
H200_BYTES_PER_S = 4.3e12


def make_inputs(key, b, t, h, d, dtype, *, no_decay_correlated_keys=False):
  """Normal q, k, v; g = log sigmoid(N(0,1) + 2), beta = sigmoid(N(0,1)); cotangents.

  With `no_decay_correlated_keys`, drawn as fla's tests draw their hardest case: q, k uniform in
  [0, 1) (their directions correlate) and g = 0.
  """
  ks = jax.random.split(key, 8)
  if no_decay_correlated_keys:
    q = jax.random.uniform(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.uniform(ks[1], (b, t, h, d), jnp.float32).astype(dtype)
  else:
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, h, d), dtype)
  v = jax.random.normal(ks[2], (b, t, h, d), dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h), jnp.float32) + 2.0)
  if no_decay_correlated_keys:
    g = jnp.zeros_like(g)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h), jnp.float32))
  s0 = 0.1 * jax.random.normal(ks[5], (b, h, d, d), jnp.float32)
  do = jax.random.normal(ks[6], (b, t, h, d), dtype)
  dsf = jax.random.normal(ks[7], (b, h, d, d), jnp.float32)
  return (q, k, v, g, beta, s0), (do, dsf)


MOSAIC_OPT_OUTS = (pallas_mosaic_gpu.JAX_WY, pallas_mosaic_gpu.JAX_GRADS)


def implementation_of(name):
  """`--impls` names: a registered implementation as is; "pallas_mosaic_gpu[a,b]" that op with
  parts a and b of MOSAIC_OPT_OUTS in pure JAX instead of its Mosaic GPU kernels (unregistered)."""
  base, bracket, flags = name.partition("[")
  if not bracket:
    return name
  opts = set(flags[:-1].split(",")) if flags.endswith("]") else set()
  if base != pallas_mosaic_gpu.NAME or not opts or not opts <= set(MOSAIC_OPT_OUTS):
    raise SystemExit(f"--impls: {name!r} must be a registered name or "
                     f"'{pallas_mosaic_gpu.NAME}[...]' with one or more of {MOSAIC_OPT_OUTS}")
  wy = pallas_mosaic_gpu.JAX_WY not in opts
  if pallas_mosaic_gpu.JAX_GRADS in opts:
    return pallas_mosaic_gpu.make_implementation(wy_kernel=wy)
  return pallas_mosaic_gpu_grads.make_implementation(wy_kernel=wy)


def op(implementation):
  """Our op with the benchmark's options; a callable (q, k, v, g, beta, s0) -> (o, S) as is."""
  if callable(implementation):  # e.g. jla's op (`jla_op`)
    return implementation
  if isinstance(implementation, str):
    implementation = implementation_of(implementation)

  def f(q, k, v, g, beta, s0):
    return api.gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True,
                                chunk_size=64, implementation=implementation)
  return f


def fwd_bwd(implementation):
  def f(inputs, cotangents):
    out, vjp = jax.vjp(op(implementation), *inputs)
    return out, vjp(cotangents)
  return f


def rel_rms(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean((x - ref) ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-30))


NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state")


def check(implementation, shape, dtype, reference="recurrent", seed=0, **input_kwargs):
  """Relative RMS error of every output and gradient vs `reference` run on float32 inputs."""
  inputs, cots = make_inputs(jax.random.PRNGKey(seed), *shape, dtype, **input_kwargs)
  up = lambda xs: tuple(x.astype(jnp.float32) for x in xs)
  with jax.default_matmul_precision("highest"):
    (o_r, s_r), grads_r = jax.jit(fwd_bwd(reference))(up(inputs), up(cots))
  (o, s), grads = jax.jit(fwd_bwd(implementation))(inputs, cots)
  errors = [rel_rms(a, b) for a, b in zip((o, s, *grads), (o_r, s_r, *grads_r), strict=True)]
  return dict(zip(NAMES, errors, strict=True))


# Correctness cases (shape, dtype, no-decay correlated keys): awkward T, both dtypes. jla runs
# the same shapes in bf16 only (its kernels take no float32 inputs).
CHECKS = (((2, 75, 2, 64), jnp.float32, False), ((2, 75, 2, 64), jnp.float32, True),
          ((2, 130, 2, 128), jnp.bfloat16, False), ((1, 24, 4, 64), jnp.bfloat16, False),
          ((2, 24, 4, 64), jnp.float32, True))  # T = 24: the Rule 110 window's chunk 32


def print_check(label, errs, suffix=""):
  print(f"check {label:46s} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + suffix,
        flush=True)


def time_jax(fn, args, *, inner=10, samples=25):
  """Per-call ms of `samples` loops of `inner` back-to-back calls, each loop with one sync."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner * 1e3)
  return summarize(times)


def summarize(times_ms):
  q = np.percentile(times_ms, [50, 20, 80])
  return {"median_ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2])}


def load_fla():
  try:
    import fla.ops.common.chunk_o as chunk_o
    import torch  # noqa: F401
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
  except Exception as e:  # pylint: disable=broad-except
    print(f"fla not available ({type(e).__name__}: {e}); skipping it")
    return None
  # Timing only: fla 0.6.0 refuses its backward on Hopper with triton < 3.7.1 (a guard for a
  # Triton bug). Its gradients are never used as a reference here.
  chunk_o.TRITON_ABOVE_3_7_1 = True
  return chunk_gated_delta_rule


def fla_calls(fla_fn, shape):
  """fla's fwd and fwd+bwd on bf16 inputs like ours, as argument-less callables."""
  import torch
  b, t, h, d = shape
  dev = "cuda"
  torch.manual_seed(0)
  mk = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=dev, dtype=dt)
  q, k, v = (mk(b, t, h, d).requires_grad_() for _ in range(3))
  g = torch.nn.functional.logsigmoid(mk(b, t, h, dt=torch.float32) + 2.0).requires_grad_()
  beta = torch.sigmoid(mk(b, t, h, dt=torch.float32)).requires_grad_()
  s0 = (0.1 * mk(b, h, d, d, dt=torch.float32)).requires_grad_()
  do, dsf = mk(b, t, h, d), mk(b, h, d, d, dt=torch.float32)

  def fwd():
    return fla_fn(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                  use_qk_l2norm_in_kernel=True)

  def fwd_bwd_fla():
    o, s = fwd()
    torch.autograd.backward([o, s], [do, dsf])

  return fwd, fwd_bwd_fla


def time_fla(fla_fn, shape, *, inner=10, samples=25):
  """fla's fwd and fwd+bwd timed as ours are (`time_jax`: loops of back-to-back calls, one
  torch.cuda.synchronize per loop), and under "do_bench" the triton.testing.do_bench medians
  (wall time between CUDA events around each call) that earlier runs reported."""
  import torch
  from triton.testing import do_bench
  res = {"do_bench": {}}
  for name, fn in zip(("fwd", "fwd_bwd"), fla_calls(fla_fn, shape), strict=True):
    with torch.no_grad() if name == "fwd" else torch.enable_grad():
      fn()
      fn()
      torch.cuda.synchronize()
      times = []
      for _ in range(samples):
        start = time.perf_counter()
        for _ in range(inner):
          fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / inner * 1e3)
      res[name] = summarize(times)
      ms = do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
    res["do_bench"][name] = {"median_ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2]}
  return res


JLA_IMPLS = ("mosaic_gpu", "chunked", "reference")


def jla_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                         use_qk_l2norm=False, impl="mosaic_gpu"):
  """jax-linear-attention's gated DeltaNet called with `api.gated_delta_rule`'s arguments.

  Returns (o, final_state) as ours does. jla (`jla.ops.linear_attention("gated_deltanet", ...)`,
  every impl of it with one contract, `jla.ops.reference`'s docstring) follows fla's
  `chunk_gated_delta_rule`, as ours does, so the mapping is one of names, not of values:
  - layout: q, k [B,T,H,K], v [B,T,H,V], time first in both; nothing is transposed;
  - g: the natural-log decay (<= 0) [B,T,H] in both (jla's kernels rescale it to log2 inside);
  - beta: the write strength after its sigmoid, [B,T,H], in both;
  - use_qk_l2norm: q, k / sqrt(sum(x^2) + 1e-6) over K in both, then the scale multiplies q;
    the scale is resolved here as ours resolves it (K**-0.5 when None) and passed explicitly;
  - initial_state: [B,H,K,V] float32 in both (jla's kernels keep it as [V,K] inside);
  - final state: jla returns None unless output_final_state=True, ours always returns it;
  - o: jla's is in q's dtype, ours in v's (cast here; the same dtype in this benchmark).
  jla's Mosaic GPU kernels run chunk 64 only (ours runs chunk 64 here too). `impl` picks jla's
  implementation: "mosaic_gpu" (Hopper only; the peer timed here) or its pure-JAX "chunked" and
  "reference", which run anywhere (the CPU tests of this mapping use them).
  """
  from jla.ops import linear_attention
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  o, final_state = linear_attention(
      "gated_deltanet", q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
      output_final_state=True, use_qk_l2norm=use_qk_l2norm, impl=impl)
  return o.astype(v.dtype), final_state.astype(jnp.float32)


def jla_op(impl="mosaic_gpu"):
  """jla's op with the benchmark's options, as `op` gives ours: (q, k, v, g, beta, s0) -> (o, S)."""
  def f(q, k, v, g, beta, s0):
    return jla_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True, impl=impl)
  return f


def load_jla(impl="mosaic_gpu"):
  """jla's op (`jla_op`), or None, with the reason printed, when it cannot run here.

  jax-linear-attention (import name `jla`) is an optional benchmark dependency, never one of
  sleep_lm's: it is imported here only. Its Mosaic GPU kernels need an sm_90 (Hopper) GPU;
  its pure-JAX impls (`--jla-impl chunked`) run anywhere, for a CPU run of this script.
  """
  try:
    import jla
    import jla.ops  # noqa: F401
  except Exception as e:  # pylint: disable=broad-except
    print(f"jla (jax-linear-attention) not available ({type(e).__name__}: {e}); skipping jla")
    return None
  device = jax.devices()[0]
  if impl == "mosaic_gpu" and not (device.platform == "gpu"
                                   and getattr(device, "compute_capability", None) == "9.0"):
    print(f"jla {jla.__version__}: its Mosaic GPU kernels need a Hopper (sm_90) GPU, this is "
          f"{device.platform} ({device.device_kind}); skipping jla")
    return None
  try:  # imports jla's kernel modules now (they register themselves), not inside the first check
    have = jla.ops.available("gated_deltanet")
  except Exception as e:  # pylint: disable=broad-except
    print(f"jla {jla.__version__}: its kernels failed to load ({type(e).__name__}: {e}); "
          "skipping jla")
    return None
  if impl not in have:
    print(f"jla {jla.__version__} has no {impl!r} gated_deltanet here (has {have}); skipping jla")
    return None
  print(f"jla {jla.__version__} (jax-linear-attention), impl={impl}")
  return jla_op(impl)


def torch_device_time_table(fn, *, calls, top=25):
  """Device time per call by CUDA kernel name, as
  sleep_lm.common.profiling.device_time_table returns.

  Run it after every JAX trace of the process: once torch's profiler has subscribed to CUPTI,
  jax.profiler cannot (CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED)."""
  import torch
  from torch.profiler import ProfilerActivity
  fn()
  torch.cuda.synchronize()
  with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      fn()
    torch.cuda.synchronize()
  events = [(e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.self_device_time_total > 0]
  events.sort(key=lambda e: -e[1])
  total = sum(ms for _, ms, _ in events)
  rows = [{"name": n, "ms_per_call": ms / calls, "count_per_call": c / calls,
           "share": ms / total if total else 0.0} for n, ms, c in events[:top]]
  rest = events[top:]
  if rest:
    rows.append({"name": "(other)", "ms_per_call": sum(ms for _, ms, _ in rest) / calls,
                 "count_per_call": sum(c for *_, c in rest) / calls,
                 "share": sum(ms for _, ms, _ in rest) / total})
  return {"total_ms_per_call": total / calls, "rows": rows}


def floors(shape, in_bytes=2):
  """Minimum bytes and flops of one call (inputs read once, outputs written once)."""
  b, t, h, d = shape
  c = min(64, max(16, 1 << (t - 1).bit_length()))
  tokens, state = b * t * h, b * h * d * d
  fwd_bytes = in_bytes * 3 * tokens * d + 4 * 2 * tokens + in_bytes * tokens * d + 8 * state
  bwd_bytes = fwd_bytes + (in_bytes * 4 * tokens * d + 4 * 2 * tokens + 8 * state)
  # Per token: K K^T, Q K^T, W, U, intra output (2 C D each), W S, Q S, K^T Vnew (2 D^2 each),
  # plus the inverse's doubling products (2 log2(C/16) of C^3 per chunk: 2 log2(C/16) 2 C^2).
  per_token = 2 * c * d * 5 + 2 * d * d * 3 + 2 * ((c // 16).bit_length() - 1) * 2 * c * c
  fwd_flops = tokens * per_token
  return {"fwd_bytes": fwd_bytes, "fwd_bwd_bytes": bwd_bytes, "fwd_flops": fwd_flops,
          "fwd_bwd_flops": 3 * fwd_flops}


def parse_variant(variant: str) -> pallas_triton.Tuning:
  """'qk_grads_warps=8,block_k=128' -> the default Tuning with those fields replaced."""
  fields = {f.name: f for f in dataclasses.fields(pallas_triton.Tuning)}
  changes = {}
  for item in variant.split(","):
    key, sep, value = item.partition("=")
    if not sep or key not in fields or not value.isdigit():
      raise SystemExit(f"--variants: {item!r} must be KEY=INT with KEY one of {sorted(fields)}")
    changes[key] = bool(int(value)) if fields[key].type in (bool, "bool") else int(value)
  return dataclasses.replace(pallas_triton.DEFAULT_TUNING, **changes)


def write_json(path, results):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="*", default=list(SHAPES),
                      choices=[*SHAPES, *SMOKE_SHAPES])
  parser.add_argument("--impls", nargs="*", default=["pallas_triton", "chunked"])
  parser.add_argument("--no-fla", action="store_true")
  parser.add_argument("--no-jla", action="store_true",
                      help="do not time jax-linear-attention's GDN op (skipped anyway when it "
                           "cannot be imported, or off Hopper with --jla-impl mosaic_gpu)")
  parser.add_argument("--jla-impl", default="mosaic_gpu", choices=JLA_IMPLS,
                      help="jla's implementation to time: mosaic_gpu is the peer kernel; its "
                           "pure-JAX chunked and reference run on a CPU (to test this script)")
  parser.add_argument("--variants", nargs="*", default=[],
                      help="also time pallas_triton built with these changes to its default "
                           "Tuning, each like 'qk_grads_warps=8,block_k=128'")
  parser.add_argument("--no-check", action="store_true")
  parser.add_argument("--profile-dir", default=None,
                      help="also trace fwd+bwd per shape and implementation; print device time "
                           "by kernel")
  parser.add_argument("--samples", type=int, default=25, help="timed loops per measurement")
  parser.add_argument("--inner", type=int, default=10, help="calls per timed loop")
  parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gdr_bench.json"))
  args = parser.parse_args(argv)
  variants = {v: pallas_triton.make_implementation(parse_variant(v)) for v in args.variants}
  timer = functools.partial(time_jax, inner=args.inner, samples=args.samples)
  print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__)
  results = {"device": jax.devices()[0].device_kind, "checks": {}, "timings": {}}
  jla_fn = None if args.no_jla else load_jla(args.jla_impl)
  if jla_fn is not None:
    import jla
    results["jla"] = {"version": jla.__version__, "impl": args.jla_impl}

  # Correctness first: small shapes with awkward T, both dtypes, vs the float32 oracle.
  failed = results["failed"] = {}  # impl -> why; one that failed is not run again
  # The tunings too: launch settings change no math, but Triton has miscompiled some (Tuning).
  checked = [(impl, impl) for impl in args.impls] + [(v.name, v) for v in variants.values()]
  for name, impl in [] if args.no_check else checked:
    for shape, dtype, hard in CHECKS:
      label = f"{name}/{shape}/{jnp.dtype(dtype).name}" + ("/g0_uniform_qk" if hard else "")
      try:
        errs = check(impl, shape, dtype, no_decay_correlated_keys=hard)
      except Exception as e:  # pylint: disable=broad-except  (e.g. a kernel that does not compile)
        failed[name] = f"{type(e).__name__}: {e}"[:400]
        print(f"check {label} failed: {failed[name]}", flush=True)
        break
      results["checks"][label] = errs
      print_check(label, errs)
  # jla vs our chunked op on float32 inputs (jla's kernels take bf16/fp16 only).
  for shape, _, hard in ([] if args.no_check or jla_fn is None else CHECKS):
    label = f"jla/{shape}/bfloat16" + ("/g0_uniform_qk" if hard else "")
    try:
      errs = check(jla_fn, shape, jnp.bfloat16, reference="chunked", no_decay_correlated_keys=hard)
    except Exception as e:  # pylint: disable=broad-except
      print(f"check {label} failed: {type(e).__name__}: {e}"[:400], flush=True)
      continue
    results["checks"][label] = errs
    print_check(label, errs, "  (vs chunked, f32)")

  fla_fn = None if args.no_fla else load_fla()
  # Forward byte floor on an H200 (see `floors`: bytes of the inputs read once and the outputs
  # written once).
  floor_ms = lambda shape: floors(shape)["fwd_bytes"] / H200_BYTES_PER_S * 1e3
  for name in args.shapes:
    shape = {**SHAPES, **SMOKE_SHAPES}[name]
    inputs, cots = make_inputs(jax.random.PRNGKey(1), *shape, jnp.bfloat16)
    row = {"shape": shape, "floors": {**floors(shape), "fwd_floor_ms_h200": floor_ms(shape)}}
    outs = {}
    for impl in args.impls:
      if impl in failed:
        continue
      f = jax.jit(op(impl))
      fb = jax.jit(fwd_bwd(impl))
      try:
        outs[impl] = f(*inputs)
        row[impl] = {"fwd": timer(f, inputs), "fwd_bwd": timer(fb, (inputs, cots))}
      except Exception as e:  # pylint: disable=broad-except
        failed[impl] = f"{type(e).__name__}: {e}"[:400]
        print(f"{name} {impl} failed: {failed[impl]}", flush=True)
        continue
      print(f"{name} {impl}: {row[impl]}", flush=True)
      if args.profile_dir:
        table = profiling.device_time_table(functools.partial(fb, inputs, cots), calls=3,
                                            log_dir=os.path.join(args.profile_dir, name, impl))
        row[impl]["profile"] = table
        print(profiling.format_table(table), flush=True)
    for variant, impl in variants.items():  # other tunings of the Triton kernels
      try:
        row[f"pallas_triton[{variant}]"] = {
            "fwd": timer(jax.jit(op(impl)), inputs),
            "fwd_bwd": timer(jax.jit(fwd_bwd(impl)), (inputs, cots))}
        print(f"{name} pallas_triton[{variant}]: {row[f'pallas_triton[{variant}]']}", flush=True)
      except Exception as e:  # pylint: disable=broad-except  (a tuning that does not compile)
        print(f"{name} pallas_triton[{variant}] failed: {type(e).__name__}: {e}"[:400])
    timed = [impl for impl in args.impls if impl in outs]
    if len(timed) > 1:  # same inputs, bf16: ours vs the next (e.g. chunked)
      a, ref = outs[timed[0]], outs[timed[1]]
      row["agree"] = {"o": rel_rms(a[0], ref[0]), "final_state": rel_rms(a[1], ref[1])}
      print(f"{name} agreement {timed[0]} vs {timed[1]}: {row['agree']}", flush=True)
    if jla_fn is not None:
      try:
        f, fb = jax.jit(jla_fn), jax.jit(fwd_bwd(jla_fn))
        out = f(*inputs)
        row["jla"] = {"fwd": timer(f, inputs), "fwd_bwd": timer(fb, (inputs, cots))}
        print(f"{name} jla: {row['jla']}", flush=True)
        if timed:  # same bf16 inputs: jla vs ours
          ref = outs[timed[0]]
          row["agree_jla"] = {"o": rel_rms(out[0], ref[0]), "final_state": rel_rms(out[1], ref[1])}
          print(f"{name} agreement jla vs {timed[0]}: {row['agree_jla']}", flush=True)
        if args.profile_dir:
          table = profiling.device_time_table(functools.partial(fb, inputs, cots), calls=3,
                                              log_dir=os.path.join(args.profile_dir, name, "jla"))
          row["jla"]["profile"] = table
          print(profiling.format_table(table), flush=True)
      except Exception as e:  # pylint: disable=broad-except  (e.g. a shape jla refuses)
        print(f"{name} jla failed: {type(e).__name__}: {e}"[:400], flush=True)
    if fla_fn is not None:
      try:
        row["fla"] = time_fla(fla_fn, shape, inner=args.inner, samples=args.samples)
        print(f"{name} fla: {row['fla']}", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name} fla failed: {type(e).__name__}: {e}")
    results["timings"][name] = row
    write_json(args.out, results)  # after every shape: a run cut off still leaves its numbers

  if args.profile_dir and fla_fn is not None:  # last: see torch_device_time_table
    for name, row in results["timings"].items():
      if "fla" in row:
        row["fla"]["profile"] = torch_device_time_table(fla_calls(fla_fn, row["shape"])[1],
                                                        calls=3)
        print(f"{name} fla fwd+bwd\n" + profiling.format_table(row["fla"]["profile"]), flush=True)
    write_json(args.out, results)

  cols = ([*args.impls] + [f"pallas_triton[{v}]" for v in variants]
          + (["jla"] if jla_fn is not None else []) + (["fla"] if fla_fn is not None else []))
  print("\nmedian ms (p20-p80), loops of calls with one sync  " + " | ".join(cols))
  for name, row in results["timings"].items():
    for mode in ("fwd", "fwd_bwd"):
      cells = []
      for c in cols:
        r = row.get(c, {}).get(mode)
        cells.append(f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})" if r else "-")
      first = next((c for c in cols if c in row), None)
      if first is None:
        print(f"{name:26s} {mode:7s} " + " | ".join(cells))
        continue
      ours = row[first][mode]["median_ms"]
      ratios = [f"{ours / row[c][mode]['median_ms']:.2f}x {c}" for c in cols
                if c in row and c != first]
      if "fla" in row:
        ratios.append(f"{ours / row['fla']['do_bench'][mode]['median_ms']:.2f}x fla do_bench")
      print(f"{name:26s} {mode:7s} " + " | ".join(cells) + "   ours/: " + ", ".join(ratios))
  print(f"\nfwd vs its byte floor on an H200 (fwd_bytes / {H200_BYTES_PER_S / 1e12:.1f} TB/s: "
        "q, k, v read and o written in bf16, g, beta read in fp32, the state read and written "
        "in fp32; see floors()): median / floor  " + " | ".join(cols))
  for name, row in results["timings"].items():
    floor = row["floors"]["fwd_floor_ms_h200"]
    cells = [f"{row[c]['fwd']['median_ms'] / floor:.2f}x" if c in row else "-" for c in cols]
    print(f"{name:26s} floor {floor * 1e3:9.3f} us  " + " | ".join(cells))
  profiled = {name: {c: row[c]["profile"]["total_ms_per_call"] for c in cols
                     if "profile" in row.get(c, {})}
              for name, row in results["timings"].items()}
  if any(profiled.values()):
    print("\nfwd+bwd device time per call, ms (kernels summed; no launch gaps)  "
          + " | ".join(cols))
    for name, dev in profiled.items():
      cells = [f"{dev[c]:.3f}" if c in dev else "-" for c in cols]
      ratios = [f"{dev[cols[0]] / dev[c]:.2f}x {c}" for c in cols[1:]
                if c in dev and cols[0] in dev]
      print(f"{name:26s} " + " | ".join(cells) + "   ours/: " + ", ".join(ratios))
  print("wrote", args.out)


if __name__ == "__main__":
  main()
