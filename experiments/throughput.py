r"""Training-step throughput of a config: ms/step, tokens/s, model FLOPs and MFU, memory, copies.

  python -m experiments.throughput --config experiments/rule110.py:dtype=bfloat16 \
      --passes 1,4 --seeds 1,3 --json $OUT/throughput.json [--profile-dir /tmp/prof]
  python -m experiments.throughput --config experiments/depo.py:paper --passes 1,4
  python -m experiments.throughput --config experiments/rule110.py:large --passes 4 \
      --scan-layers 0,1 --iters 5          # issue 24: the 16-layer compile with the layer scan

Each row times the jitted train step (forward, backward through every pass of every window, the
optimizer) of one (N, seeds, remat, unroll, scan_layers, implementation, mlp, merged projections)
combination after warm-up, on one batch held on the device (per seed: the config's batch), and
reports:
  compile            seconds to trace, lower and compile the step (compile_s in the JSON; apart:
                     trace_s, lower_s to StableHLO, xla_compile_s; with JAX_COMPILATION_CACHE_DIR
                     set, a cache hit makes xla_compile_s the load from the cache);
  ms/step            median over --iters steps (20th/80th percentiles in the JSON);
  tokens/s           summed over the seeds;
  TFLOP/step         model FLOPs: 6 x (matrix parameters) x (token-passes) for the projections
                     and MLPs, plus attention scores (4 L^2 d per window-pass and layer, x3 for
                     the backward) and the fast-weight op (6 dk dv per token and head, x3);
  MFU                TFLOP/s over the device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s);
  XLA GB             the compiled step's buffers from XLA's memory analysis: temporaries plus
                     arguments (the train state and batch); peak GB: the device's peak bytes in
                     use so far in the process (GPU only; rows run in order, so it only grows);
  copy share         with --profile-dir: the share of device time in copy kernels (memcpy, XLA
                     copy/transpose fusions), from a trace of 3 steps; the trace's largest
                     kernels and its device time by kernel family (`profiling.STEP_FAMILIES`),
                     then, from 3 steps of the same step compiled without XLA's command buffers
                     (CUDA graphs hide each kernel's HLO instruction from the tracer), the device
                     time by part of the model (each kernel's HLO instruction -> its op_name ->
                     `profiling.model_component`, forward and backward apart) and the bandwidth
                     each family, and each layer part's family, reaches (that program's bytes
                     per kernel, `kernel_plan.achieved_bandwidth`, over its traced time) are
                     printed and kept in the JSON ("profile", "families",
                     "profile_without_command_buffers", "components", "achieved_bandwidth",
                     "achieved_bandwidth_by_layer_part"); that program's text is written beside
                     its trace (<profile-dir>/<row>/without_command_buffers/module.hlo.txt.gz),
                     to regroup the kernels later.
Prints a table last; --json writes every row.

With --plan h200 (or h100) nothing runs: each row's step is compiled for that GPU on this
machine, which needs none (the CUDA PJRT plugin, `pip install -e '.[plan]'`), and the compiled
program's kernels are read by `sleep_lm.common.kernel_plan`: the HBM bytes they move, by kernel
family and by model part, and those bytes over the device's bandwidth ("ms at BW", the time this
fusion plan cannot beat however fast its kernels run). The compile omits autotuning (XLA cannot
time kernels without the device), so gemm configurations, never the bytes, may differ.

  python -m experiments.throughput --config experiments/rule110.py:dtype=bfloat16 --passes 4 \
      --seeds 3 --plan h200 --json plan.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import time

import jax
import numpy as np

from experiments.sweep import load_module
from sleep_lm.common import kernel_plan, profiling
from sleep_lm.model.sleep import window_length
from sleep_lm.training import trainer
from sleep_lm.training.run_config import RunConfig

# Dense bf16 peak by device kind (vendor datasheets, SXM parts).
BF16_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H200": 989.4, "H100": 989.4,
                    "H200": 989.4}

def load_config(path_and_arg: str):
  """'experiments/rule110.py:smoke' -> that file's get_config('smoke')."""
  path, _, arg = path_and_arg.partition(":")
  return load_module(path).get_config(arg or None)


def peak_tflops(device) -> float | None:
  kind = device.device_kind
  return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in kind), None)


def model_flops_per_step(run: RunConfig) -> float:
  """Model FLOPs of one train step of one model (forward + backward), see the module docstring."""
  cfg, t = run.model, run.task.seq_len
  length = window_length(cfg, t)
  schedule = trainer.task_schedule(run)
  window_passes = sum(cfg.passes if s else 1 for s in schedule)
  d, f = cfg.d_model, cfg.hidden_dim
  attn = 4 * d * d
  gdn = 5 * d * d + 2 * d * cfg.num_gdn_heads           # q, k, v, gate, out; a, b
  mlp = 3 * d * f
  matrix_params = sum(attn if kind == "attn" else gdn for kind in cfg.layers)
  matrix_params += len(cfg.layers) * mlp + d * cfg.vocab_size
  tokens = run.batch_size * length * window_passes
  dense = 6 * matrix_params * tokens
  scores = 3 * 4 * length * length * d * cfg.num_attn_layers * run.batch_size * window_passes
  k = cfg.gdn_head_dim
  fast_weight = 3 * 6 * k * k * cfg.num_gdn_heads * cfg.num_gdn_layers * tokens
  return float(dense + scores + fast_weight)


def _example_batch(run: RunConfig) -> dict:
  idx = np.arange(run.batch_size)
  examples = [run.task.train_examples(s, idx) for s in run.model_seeds]
  return {k: np.stack([e[k] for e in examples]) for k in ("inputs", "targets", "loss_mask")}


# XLA's option (a list of command kinds) emptied: no command buffers (CUDA graphs) in the program.
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def _compile(jitted, mesh, state, batch, compiler_options=None) -> tuple[object, dict]:
  """The compiled step and its compile time, traced, lowered and compiled apart: where a long
  compile goes (Python tracing, StableHLO emission, or XLA's passes, autotuning and kernel
  compilation). `compiler_options`: XLA options for this program only."""
  stage_s = {}
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    traced = jitted.trace(state, batch)
    stage_s["trace_s"] = time.perf_counter() - t0
    lowered = traced.lower()
    stage_s["lower_s"] = time.perf_counter() - t0 - stage_s["trace_s"]
    compiled = lowered.compile(compiler_options)
  stage_s["compile_s"] = time.perf_counter() - t0
  stage_s["xla_compile_s"] = stage_s["compile_s"] - stage_s["trace_s"] - stage_s["lower_s"]
  memory = compiled.memory_analysis()
  stage_s["xla_gb"] = ((memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 1e9
                       if memory is not None else None)
  return compiled, stage_s


def _trace_steps(step, state, batch, log_dir: str) -> tuple[dict, object]:
  """Device time by kernel over 3 traced steps (`profiling.device_time_table`, every kernel
  kept), and the train state after them (the step donates it)."""
  holder = [state]

  def one_step():
    holder[0], _ = step(holder[0], batch)
    return holder[0]

  table = profiling.device_time_table(one_step, calls=3, log_dir=log_dir, top=None)
  return table, holder[0]


def plan_step(run: RunConfig, target: str) -> dict:
  """Compiles the step for `target` (a `kernel_plan.GPU_TARGETS` key) without its device and
  reads the compiled program's kernel plan: bytes moved by family and by model part."""
  devices = kernel_plan.gpu_topology(target).devices
  mesh, boxed = trainer.setup(run, devices=devices)
  state, optimizer = trainer.initial_state(run, mesh, boxed, abstract=True)
  jitted, batch_sh = trainer.sharded_train_step(run, mesh, boxed, optimizer)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in _example_batch(run).items()}
  compiled, stage_s = _compile(jitted, mesh, state, batch)
  plan = kernel_plan.plan(compiled.as_text(),
                          bandwidth=kernel_plan.GPU_TARGETS[target]["bandwidth"])
  print(profiling.format_breakdown(plan["top_kernels"], title="kernel (ms = GB / bandwidth)"))
  print(profiling.format_breakdown(plan["families"], title="family"))
  print(profiling.format_breakdown(dict(list(plan["components"].items())[:30]),
                                   title="model part (forward/backward)"), flush=True)
  return {**stage_s, "tflop_per_step": model_flops_per_step(run) * run.seeds / 1e12,
          "plan_target": target, **plan}


def time_step(run: RunConfig, *, warmup: int, iters: int, profile_dir: str | None = None) -> dict:
  mesh, boxed = trainer.setup(run)
  state, optimizer = trainer.initial_state(run, mesh, boxed)
  jitted, batch_sh = trainer.sharded_train_step(run, mesh, boxed, optimizer)
  batch = jax.device_put(_example_batch(run), batch_sh)
  device = jax.devices()[0]

  def step(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  _, stage_s = _compile(jitted, mesh, state, batch)   # the step below runs this executable
  for _ in range(warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  stats = device.memory_stats() or {}
  ms = 1e3 * float(np.median(times))
  flops = model_flops_per_step(run) * run.seeds
  peak = peak_tflops(device)
  row = {"ms_per_step": ms, "p20_ms": 1e3 * float(np.percentile(times, 20)),
         "p80_ms": 1e3 * float(np.percentile(times, 80)), **stage_s,
         "tokens_per_s": run.tokens_per_step / (ms / 1e3), "tflop_per_step": flops / 1e12,
         "tflops": flops / 1e12 / (ms / 1e3),
         "mfu": flops / 1e12 / (ms / 1e3) / peak if peak else None,
         "peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9 if stats else None}
  if profile_dir:  # where the step's device time goes, by kernel
    # Every kernel name kept in the JSON (to regroup later); the printed table has the largest.
    table, state = _trace_steps(step, state, batch, profile_dir)
    families = profiling.family_table(table, profiling.STEP_FAMILIES)
    # Model parts and bandwidth need each kernel's HLO instruction. On a GPU, XLA runs the step
    # as command buffers (CUDA graphs), whose kernels the tracer tags with the buffer's
    # instruction (`command_buffer_1`), so these two tables trace the same step compiled without
    # command buffers (the same kernels, launched one by one) and read that program's text.
    plain, _ = _compile(jitted, mesh, state, batch, compiler_options=NO_COMMAND_BUFFERS)
    plain_dir = f"{profile_dir}/without_command_buffers"
    plain_table, state = _trace_steps(plain, state, batch, plain_dir)
    text = plain.as_text()           # read once for both tables below
    # Kept beside its trace: the tables below can be regrouped later from the two files.
    with gzip.open(pathlib.Path(plain_dir) / "module.hlo.txt.gz", "wt") as f:
      f.write(text)
    components = profiling.component_table(plain_table, profiling.hlo_op_names(text),
                                           kernel_plan.kernel_launches(text))
    print(profiling.format_table({**table, "rows": table["rows"][:25]}), flush=True)
    print(profiling.format_breakdown(families), flush=True)
    print(profiling.format_breakdown(
        dict(list(components.items())[:30]),
        title="model part (forward/backward; traced without command buffers)"), flush=True)
    # The same program's bytes per kernel: how close each family, and each layer part's
    # family, runs to the bandwidth.
    achieved = kernel_plan.achieved_bandwidth(text, plain_table["ops"], rows=plain_table["rows"])
    by_part = kernel_plan.achieved_bandwidth(text, plain_table["ops"], by_layer_part=True)
    for title, bandwidth in (("family", achieved),
                             ("layer part: family", dict(list(by_part.items())[:30]))):
      print("\n".join(
          [f"{'GB/s':>7} {'GB':>7} {'ms/call':>8}  {title} (planned bytes / traced time)"]
          + [f"{r['gb_per_s']:7.0f} {r['gb']:7.2f} {r['ms_per_call']:8.3f}  {name}"
             for name, r in bandwidth.items()]), flush=True)
    row["profile"] = table
    row["families"] = families
    row["profile_without_command_buffers"] = plain_table
    row["components"] = components
    row["achieved_bandwidth"] = achieved
    row["achieved_bandwidth_by_layer_part"] = by_part
    row["copy_share"] = table["groups"]["copies"]["share"]
    row["device_ms_per_step"] = table["total_ms_per_call"]
    row["device_ms_per_step_without_command_buffers"] = plain_table["total_ms_per_call"]
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/rule110.py")
  parser.add_argument("--passes", default="1,2,3,4")
  parser.add_argument("--seeds", default="1", help="comma-separated seed counts (vmapped)")
  parser.add_argument("--implementations", default="default",
                      help="comma-separated kernel implementation names ('default': the op's "
                           "own choice)")
  parser.add_argument("--mlp", default=None,
                      help="comma-separated model.mlp_implementation values (xla, pallas_triton)")
  parser.add_argument("--merge-projections", default=None,
                      help="comma-separated 0/1: model.merge_projections")
  parser.add_argument("--remat", default=None, help="comma-separated remat policies")
  parser.add_argument("--unroll", default=None, help="comma-separated 0/1")
  parser.add_argument("--scan-layers", default=None,
                      help="comma-separated 0/1: model.scan_layers (the layer-group scan; its "
                           "compile_s against the plain loop's)")
  parser.add_argument("--dtype", default=None, help="override model.dtype")
  parser.add_argument("--batch", type=int, default=None, help="override batch_size (per seed)")
  parser.add_argument("--chunk-size", type=int, default=None,
                      help="override model.chunk_size (the fast-weight op's largest chunk)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--json", default=None)
  parser.add_argument("--profile-dir", default=None,
                      help="also trace 3 steps per row: device time by kernel, copy share")
  parser.add_argument("--plan", default=None, choices=sorted(kernel_plan.GPU_TARGETS),
                      help="compile each row for this GPU without one and print the kernel "
                           "plan's bytes by family and model part instead of timing (needs the "
                           "CUDA PJRT plugin, see sleep_lm/common/kernel_plan.py)")
  args = parser.parse_args()
  if args.plan:  # the CUDA plugin cannot start without a GPU; its compiler needs none
    jax.config.update("jax_platforms", "cpu")

  rows = []
  flags = lambda arg: [bool(int(u)) for u in arg.split(",")] if arg else [None]
  combos = [(impl, mlp, merge, n, s, remat, unroll, scan)
            for impl in args.implementations.split(",")
            for mlp in (args.mlp.split(",") if args.mlp else [None])
            for merge in flags(args.merge_projections)
            for n in map(int, args.passes.split(","))
            for s in map(int, args.seeds.split(","))
            for remat in (args.remat.split(",") if args.remat else [None])
            for unroll in flags(args.unroll)
            for scan in flags(args.scan_layers)]
  for impl, mlp, merge, n, seeds, remat, unroll, scan in combos:
    config = load_config(args.config)
    config.model.passes = n
    config.seeds = seeds
    config.model.kernel_implementation = None if impl == "default" else impl
    for field, value in (("dtype", args.dtype), ("remat", remat), ("unroll", unroll),
                         ("scan_layers", scan), ("mlp_implementation", mlp),
                         ("merge_projections", merge)):
      if value is not None:
        config.model[field] = value
    if args.batch:
      config.batch_size = args.batch
    if args.chunk_size:
      config.model.chunk_size = args.chunk_size
    run = RunConfig.from_config(config)
    row = {"passes": n, "seeds": seeds, "implementation": impl,
           "mlp": run.model.mlp_implementation or "xla",
           "merge_projections": run.model.merge_projections, "dtype": run.model.dtype,
           "remat": run.model.remat, "unroll": run.model.unroll,
           "scan_layers": run.model.scan_layers, "batch_size": run.batch_size,
           "seq_len": run.task.seq_len, "chunk_size": run.model.chunk_size}
    try:
      row.update(plan_step(run, args.plan) if args.plan else
                 time_step(run, warmup=args.warmup, iters=args.iters,
                           profile_dir=args.profile_dir and f"{args.profile_dir}/{len(rows)}"))
    except Exception as e:  # noqa: BLE001 - an OOM in one row must not lose the others
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items()
                      if k not in ("profile", "families", "components", "top_kernels",
                                   "achieved_bandwidth", "achieved_bandwidth_by_layer_part",
                                   "profile_without_command_buffers")}),
          flush=True)

  device = (f"plan for {args.plan} (compiled without it)" if args.plan
            else jax.devices()[0].device_kind)
  print(f"\ndevice: {device}   config: {args.config}   tokens per example: {rows[0]['seq_len']}")
  if args.plan:
    _print_plans(rows)
  else:
    _print_timings(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "config": args.config, "rows": rows}, f, indent=2)


def _head(r: dict) -> str:
  return (f"{r['implementation']:<14}{r['mlp']:<14}{int(r['merge_projections']):>4}"
          f"{r['passes']:>3}{r['seeds']:>3}{r['remat']:>6}{int(r['unroll']):>4}"
          f"{int(r['scan_layers']):>5}")


def _print_plans(rows: list[dict]):
  print(f"{'impl':<14}{'mlp':<14}{'mrg':>4}{'N':>3}{'S':>3}{'remat':>6}{'unr':>4}{'scan':>5}"
        f"{'compile':>8}"
        f"{'of it XLA':>10}{'kernels':>8}{'GB moved':>9}{'ms at BW':>9}{'TFLOP':>7}"
        f"{'XLA GB':>7}")
  for r in rows:
    if "error" in r:
      print(f"{_head(r)}  {r['error'][:90]}")
      continue
    print(f"{_head(r)}{r['compile_s']:>7.1f}s{r['xla_compile_s']:>9.1f}s{r['kernels']:>8}"
          f"{r['gb']:>9.1f}{r['ms_at_bandwidth']:>9.2f}{r['tflop_per_step']:>7.2f}"
          f"{r['xla_gb']:>7.1f}")


def _print_timings(rows: list[dict]):
  print(f"{'impl':<14}{'mlp':<14}{'mrg':>4}{'N':>3}{'S':>3}{'remat':>6}{'unr':>4}{'scan':>5}"
        f"{'compile':>8}"
        f"{'of it XLA':>10}{'ms/step':>9}{'tok/s':>11}"
        f"{'TFLOP':>7}{'MFU':>7}{'peakGB':>7}{'XLA GB':>7}{'copies':>7}")
  fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
  for r in rows:
    if "error" in r:
      print(f"{_head(r)}  {r['error'][:90]}")
      continue
    print(f"{_head(r)}{r['compile_s']:>7.1f}s{r['xla_compile_s']:>9.1f}s"
          f"{r['ms_per_step']:>9.2f}{r['tokens_per_s']:>11.0f}"
          f"{r['tflop_per_step']:>7.2f}"
          f"{fmt(r['mfu'] and 100 * r['mfu'], '6.1f'):>6}%{fmt(r['peak_gb'], '7.1f'):>7}"
          f"{fmt(r['xla_gb'], '7.1f'):>7}"
          f"{fmt(r.get('copy_share') and 100 * r['copy_share'], '6.1f'):>6}%")


if __name__ == "__main__":
  main()
