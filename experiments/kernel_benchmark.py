r"""Benchmark of the gated delta rule: Pallas kernels vs the pure-JAX chunked path vs fla (Triton).

Run on the GPU machine from the repository root (fla's wheel and einops carried in .whl/):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:. python3 -m experiments.kernel_benchmark --impls pallas_triton chunked \
      --profile-dir /tmp/pk --out $OUT/gdr_bench.json

Checks correctness first (fresh random inputs, relative RMS error of every output and gradient
against the float32 recurrent oracle, one case with no decay and correlated keys), then times
forward and forward+backward (cotangents on both o and the final state; gradients of q, k, v, g,
beta and the initial state) per registry shape: median with 20/80 percentiles of loops of calls
with one sync. bf16 inputs, fp32 state, q/k L2 norm in the op, chunk 64. fla is skipped when it
cannot be imported; for timing only, its backward's guard against a Triton < 3.7.1 bug is
lifted (`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`), so its gradients are never used.
Prints a table last and writes JSON. With --profile-dir it also prints device time by kernel
(jax.profiler for ours, torch.profiler for fla) and a table of summed device times, which leaves
out fla's PyTorch launch gaps. `--variants` also times pallas_triton built with other `Tuning`s.

A CPU smoke run (kernels interpreted; tests/kernels/test_kernel_benchmark.py runs it):
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

from kernels.gated_delta_rule import api, pallas_triton
from sleep_lm import profiling

# name -> (B, T, H, D); K = V = D. The registry shapes are timed by default.
SHAPES = {
    "b4_t4096_h16_d128": (4, 4096, 16, 128),
    "b2_t16384_h16_d128": (2, 16384, 16, 128),
    "b16_t2048_h16_d128": (16, 2048, 16, 128),
    "rule110_b512_t24_h4_d64": (512, 24, 4, 64),  # one 24-token window of the Rule 110 model
}
SMOKE_SHAPES = {"smoke_b1_t40_h1_d16": (1, 40, 1, 16)}  # for a CPU run of this script


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


def op(implementation):
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


def torch_device_time_table(fn, *, calls, top=25):
  """Device time per call by CUDA kernel name, as sleep_lm.profiling.device_time_table returns.

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

  # Correctness first: small shapes with awkward T, both dtypes, vs the float32 oracle.
  for impl in [] if args.no_check else args.impls:
    for shape, dtype, hard in (((2, 75, 2, 64), jnp.float32, False),
                               ((2, 75, 2, 64), jnp.float32, True),
                               ((2, 130, 2, 128), jnp.bfloat16, False),
                               ((1, 24, 4, 64), jnp.bfloat16, False)):
      errs = check(impl, shape, dtype, no_decay_correlated_keys=hard)
      label = f"{impl}/{shape}/{jnp.dtype(dtype).name}" + ("/g0_uniform_qk" if hard else "")
      results["checks"][label] = errs
      print(f"check {label:46s} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()),
            flush=True)

  fla_fn = None if args.no_fla else load_fla()
  for name in args.shapes:
    shape = {**SHAPES, **SMOKE_SHAPES}[name]
    inputs, cots = make_inputs(jax.random.PRNGKey(1), *shape, jnp.bfloat16)
    row = {"shape": shape, "floors": floors(shape)}
    outs = {}
    for impl in args.impls:
      f = jax.jit(op(impl))
      fb = jax.jit(fwd_bwd(impl))
      outs[impl] = f(*inputs)
      row[impl] = {"fwd": timer(f, inputs), "fwd_bwd": timer(fb, (inputs, cots))}
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
    if len(args.impls) > 1:  # same inputs, bf16: ours vs chunked
      a, ref = outs[args.impls[0]], outs[args.impls[1]]
      row["agree"] = {"o": rel_rms(a[0], ref[0]), "final_state": rel_rms(a[1], ref[1])}
      print(f"{name} agreement {args.impls[0]} vs {args.impls[1]}: {row['agree']}", flush=True)
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
          + (["fla"] if fla_fn is not None else []))
  print("\nmedian ms (p20-p80), loops of calls with one sync  " + " | ".join(cols))
  for name, row in results["timings"].items():
    for mode in ("fwd", "fwd_bwd"):
      cells = []
      for c in cols:
        r = row.get(c, {}).get(mode)
        cells.append(f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})" if r else "-")
      ours = row[args.impls[0]][mode]["median_ms"]
      ratios = [f"{ours / row[c][mode]['median_ms']:.2f}x {c}" for c in cols[1:] if c in row]
      if "fla" in row:
        ratios.append(f"{ours / row['fla']['do_bench'][mode]['median_ms']:.2f}x fla do_bench")
      print(f"{name:26s} {mode:7s} " + " | ".join(cells) + "   ours/: " + ", ".join(ratios))
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
