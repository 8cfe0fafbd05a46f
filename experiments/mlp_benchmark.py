r"""The SwiGLU MLP: `kernels.swiglu` against XLA's products and fusions, forward and forward +
backward, at the MLP shapes of the Rule 110 train step.

On the GPU machine, from the repository root:
  python3 -m experiments.mlp_benchmark --json $OUT/mlp_bench.json

Per shape (rows M = tokens of one window-pass summed over the batch and seeds, width D, hidden F;
bf16): both implementations checked against a float32 MLP at HIGHEST precision (relative RMS of
the output and of dx, dWg, dWu, dWd), then timed as one jitted call of the forward and of the
forward + backward (`kernel_benchmark.time_jax`: loops of 10 calls with one sync, median of 25),
with the ratio kernels / XLA, and ("at BW") each plan's HBM bytes (`sleep_lm.common.kernel_plan`
on the compiled program) over the device's bandwidth, so that time and bytes can be compared.

CPU smoke run (kernels interpreted, tiny shapes; times nothing real):
  python -m experiments.mlp_benchmark --quick --json /tmp/mlp_quick.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments.kernel_benchmark import rel_rms, time_jax
from kernels.swiglu import swiglu_mlp
from sleep_lm.common import kernel_plan

# (M, D, F): the Rule 110 step's MLP (window 24 x batch 512, x 3 seeds), width 256, hidden 1024.
SHAPES = {"rule110_1seed": (12288, 256, 1024), "rule110_3seeds": (36864, 256, 1024),
          "wide": (16384, 1024, 4096)}
QUICK_SHAPES = {"tiny": (96, 64, 128)}


def xla_mlp(x, wg, wu, wd):
  """SwiGLU as `sleep_lm.model.layers.SwiGLU` computes it in the training layout."""
  dot = lambda a, b: jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))
  return dot(jax.nn.silu(dot(x, wg)) * dot(x, wu), wd)


def oracle(x, wg, wu, wd):
  x, wg, wu, wd = (a.astype(jnp.float32) for a in (x, wg, wu, wd))
  dot = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return dot(jax.nn.silu(dot(x, wg)) * dot(x, wu), wd)


IMPLEMENTATIONS = {"xla": xla_mlp, "pallas_triton": swiglu_mlp}


def fwd_bwd(fn):
  def run(x, wg, wu, wd, dy):
    y, vjp = jax.vjp(fn, x, wg, wu, wd)
    return y, vjp(dy)
  return run


def inputs(m, d, f, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (m, d))
  wg, wu = (jax.random.normal(k, (d, f)) / np.sqrt(d) for k in ks[1:3])
  wd = jax.random.normal(ks[3], (f, d)) / np.sqrt(f)
  dy = jax.random.normal(ks[4], (m, d))
  return [a.astype(dtype) for a in (x, wg, wu, wd, dy)]


def bench(name, shape, dtype, bandwidth, quick) -> list[dict]:
  args = inputs(*shape, dtype)
  want_y, want_vjp = jax.vjp(oracle, *args[:4])
  want = [want_y, *want_vjp(args[4].astype(jnp.float32))]
  rows = []
  for impl, fn in IMPLEMENTATIONS.items():
    row = {"shape": name, "m_d_f": shape, "implementation": impl}
    both = jax.jit(fwd_bwd(fn))
    y, grads = both(*args)
    row["errors"] = dict(zip(("y", "dx", "dw_gate", "dw_up", "dw_down"),
                             (rel_rms(g, w) for g, w in zip([y, *grads], want, strict=True)),
                             strict=True))
    for label, f, a in (("fwd", jax.jit(fn), args[:4]), ("fwd_bwd", both, args)):
      text = f.lower(*a).compile().as_text()
      row[f"{label}_plan_ms"] = kernel_plan.plan(text, bandwidth=bandwidth)["ms_at_bandwidth"]
      row[label] = time_jax(f, a, inner=2 if quick else 10, samples=2 if quick else 25)
    rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
  parser.add_argument("--bandwidth", type=float,
                      default=kernel_plan.GPU_TARGETS["h200"]["bandwidth"],
                      help="bytes/s that the plan's bytes are read at (default: H200's copy rate)")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  dtype = jnp.float32 if args.quick else jnp.bfloat16
  rows = []
  for name, shape in (QUICK_SHAPES if args.quick else SHAPES).items():
    rows += bench(name, shape, dtype, args.bandwidth, args.quick)
  print(f"device: {jax.devices()[0].device_kind}   dtype: {jnp.dtype(dtype).name}")
  print(f"{'shape':<16}{'impl':<15}{'fwd ms':>8}{'at BW':>7}{'f+b ms':>8}{'at BW':>7}"
        f"{'ratio f+b':>10}{'max rel err':>12}")
  base = {r["shape"]: r for r in rows if r["implementation"] == "xla"}
  for r in rows:
    ratio = r["fwd_bwd"]["median_ms"] / base[r["shape"]]["fwd_bwd"]["median_ms"]
    print(f"{r['shape']:<16}{r['implementation']:<15}{r['fwd']['median_ms']:8.3f}"
          f"{r['fwd_plan_ms']:7.3f}{r['fwd_bwd']['median_ms']:8.3f}{r['fwd_bwd_plan_ms']:7.3f}"
          f"{ratio:10.2f}{max(r['errors'].values()):12.2e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "dtype": jnp.dtype(dtype).name,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
