r"""Micro-benchmark of kernels.gemv against XLA's batch-1 product, at the 300m decode shapes.

On the GPU machine, from the repository root:
  python3 -m experiments.gemv_bench --json $OUT/gemv_bench.json

For each (N, K) (bf16): (a) XLA's `x @ w.T` under jit, (b) the kernel at its default blocks and at
the --settings given. Each is one jitted function of `--inner` calls on distinct x vectors and
enough distinct copies of w (at least --rotate_mb MB in all) that w comes from HBM, not from the
50 MB L2 (a decode step reads every layer's weights once). Reported per call: the wall time of the
loop with one sync (median of --samples) and the device time (kernels summed, from a profiler
trace, `sleep_lm.common.profiling`), and the bandwidth, bytes of w over the device time. Correctness
is checked first against a float32 product on the same inputs.

CPU smoke run (kernel interpreted, tiny shapes; checks that the script runs, times nothing real):
  python -m experiments.gemv_bench --quick --json /tmp/gemv_quick.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.inference_latency import SIZES
from kernels.gemv import gemv, gemv_bytes, resolve_blocks
from sleep_lm.common import profiling
from sleep_lm.model.config import ModelConfig

# The decode benchmark's "300m" size: the shapes its batch-1 products have.
CONFIG_300M = ModelConfig(**SIZES["300m"])


def decode_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """name -> (N, K) of every fused decode product (sleep_lm.model.layers, the [out, in] layouts)."""
  d, f = cfg.d_model, cfg.hidden_dim
  attn = (cfg.num_attn_heads + 2 * cfg.num_kv_heads) * cfg.attn_head_dim
  h, hk = cfg.num_gdn_heads, cfg.num_gdn_heads * cfg.gdn_head_dim
  return {
      "attn_qkv": (attn, d),
      "gdn_in_proj": (4 * hk + 2 * h, d),       # q|k|v|gate (hk each), a|b (one per head)
      "mlp_gate_up": (2 * f, d),
      "mlp_down": (d, f),
      "attn_out": (d, cfg.num_attn_heads * cfg.attn_head_dim),
      "head": (cfg.vocab_size, d),
  }


QUICK_SHAPES = {"tiny_a": (40, 48), "tiny_b": (64, 128)}

# (block_rows, block_k, num_warps, num_stages); 0 = the kernel's default.
DEFAULT_SETTINGS = ["0,0,0,0", "0,0,4,3", "0,0,8,1", "0,512,4,3", "0,2048,8,3", "1,1024,8,3",
                    "4,1024,8,3", "16,512,4,3", "64,128,4,3", "0,0,8,4"]


def parse_setting(text: str) -> dict:
  try:
    bn, bk, warps, stages = (int(v) for v in text.split(","))
  except ValueError:
    raise SystemExit(f"--settings: each must be 'block_rows,block_k,num_warps,num_stages' "
                     f"(ints, 0 = default), got {text!r}") from None
  return {"block_rows": bn or None, "block_k": bk or None, "num_warps": warps or None,
          "num_stages": stages or None}


def make_loop(product, inner: int, copies: int):
  """One jitted function of `inner` products, call i on x i and copy i % copies of w.

  Each call's operands pass an optimization barrier: else XLA's dot merger turns the products
  that share a copy of w into one matrix-matrix product (measured: a "19 TB/s" head)."""
  def loop(xs, ws):
    return [product(*jax.lax.optimization_barrier((x, ws[i % copies])))
            for i, x in enumerate(xs)]
  return jax.jit(loop)


def time_loop(fn, args, samples: int) -> list[float]:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def bench_shape(name, n, k, products, args, log_dir) -> list[dict]:
  key = jax.random.key(n * 7919 + k)
  copies = max(1, min(args.inner, -(-args.rotate_mb * 2**20 // gemv_bytes(n, k, jnp.bfloat16))))
  kw, kx = jax.random.split(key)
  ws = [(jax.random.normal(jax.random.fold_in(kw, c), (n, k), jnp.float32) / np.sqrt(k))
        .astype(jnp.bfloat16) for c in range(copies)]
  xs = [jax.random.normal(jax.random.fold_in(kx, i), (k,), jnp.float32).astype(jnp.bfloat16)
        for i in range(args.inner)]
  want = np.asarray(jnp.dot(ws[0].astype(jnp.float32), xs[0].astype(jnp.float32)))
  assert ws[0].dtype == xs[0].dtype == jnp.bfloat16
  rows = []
  for label, product in products:
    got = np.asarray(jax.jit(product)(xs[0], ws[0]), np.float32)
    err = float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))
    fn = make_loop(product, args.inner, copies)
    wall = statistics.median(time_loop(fn, (xs, ws), args.samples)) / args.inner
    table = profiling.device_time_table(lambda fn=fn: fn(xs, ws), calls=args.profile_calls,
                                        log_dir=f"{log_dir}/{name}_{len(rows)}")
    dev = table["total_ms_per_call"] / 1e3 / args.inner
    nbytes = gemv_bytes(n, k, jnp.bfloat16)
    rows.append({"shape": name, "n": n, "k": k, "impl": label, "rel_rms_err": err,
                 "copies_of_w": copies, "wall_us": wall * 1e6,
                 "device_us": dev * 1e6 if dev else None,
                 "device_gb_s": nbytes / dev / 1e9 if dev else None,
                 "wall_gb_s": nbytes / wall / 1e9})
    r = rows[-1]
    dev_txt = (f"{r['device_us']:9.2f} {r['device_gb_s']:8.0f}" if dev else f"{'-':>9} {'-':>8}")
    print(f"{name:12} {n:6}x{k:<5} {label:28} {r['wall_us']:9.2f} {r['wall_gb_s']:8.0f} "
          f"{dev_txt} {err:9.1e}", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes, kernel interpreted on the CPU: only checks that it runs")
  parser.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
  parser.add_argument("--settings", nargs="*", default=None,
                      help=f"kernel 'block_rows,block_k,num_warps,num_stages' (0 = default); "
                           f"default {DEFAULT_SETTINGS}")
  parser.add_argument("--inner", type=int, default=100, help="calls per jitted loop")
  parser.add_argument("--samples", type=int, default=7, help="timed loops (median)")
  parser.add_argument("--profile_calls", type=int, default=3, help="traced loops")
  parser.add_argument("--rotate_mb", type=int, default=256,
                      help="at least this many MB of distinct copies of w (defeat the L2)")
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args(argv)
  if args.quick:
    args.inner, args.samples, args.profile_calls, args.rotate_mb = 2, 1, 1, 0
    shapes = QUICK_SHAPES
    settings = args.settings if args.settings is not None else ["0,0,4,3", "16,32,4,3"]
  else:
    shapes = decode_shapes(CONFIG_300M)
    settings = args.settings if args.settings is not None else DEFAULT_SETTINGS
  if args.shapes:
    unknown = sorted(set(args.shapes.split(",")) - set(shapes))
    if unknown:
      raise SystemExit(f"--shapes: unknown {unknown}; must be among {sorted(shapes)}")
    shapes = {s: shapes[s] for s in args.shapes.split(",")}
  print(f"backend {jax.default_backend()}, devices {jax.devices()}; bf16, {args.inner} calls "
        f"per loop, median of {args.samples}")
  print(f"{'shape':12} {'N x K':12} {'impl':28} {'wall_us':>9} {'wall_GBs':>8} {'dev_us':>9} "
        f"{'dev_GBs':>8} {'rel_err':>9}")
  rows = []
  with tempfile.TemporaryDirectory(prefix="gemv_bench_") as log_dir:
    for name, (n, k) in shapes.items():
      products = [("xla x@w.T", lambda x, w: x @ w.T)]
      seen = set()
      for text in settings:
        s = parse_setting(text)
        s["block_rows"], s["block_k"] = resolve_blocks(n, k, s["block_rows"], s["block_k"])
        label = (f"gemv bn={s['block_rows']} bk={s['block_k']} w={s['num_warps'] or 'd'} "
                 f"s={s['num_stages'] or 'd'}")
        if label in seen:
          continue
        seen.add(label)
        products.append((label, lambda x, w, s=s: gemv(x, w, **s)))
      rows += bench_shape(name, n, k, products, args, log_dir)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": jax.default_backend(), "inner": args.inner, "rows": rows}, f,
                indent=1)
  return rows


if __name__ == "__main__":
  main()
