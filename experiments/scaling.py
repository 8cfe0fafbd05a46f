r"""Train-step scaling over devices: ms/step, tokens/s, efficiency against one device, memory.

  # the larger model (d = 1024, 16 layers, ~280M parameters, bf16), data parallel on 1, 2, 4
  # GPUs, 64 examples (6,656 tokens) per device (weak scaling):
  python3 -m experiments.scaling --config experiments/rule110.py:large \
      --meshes "data=1 data=2 data=4" --per_device_batch 64 --json $OUT/scaling_large.json
  # the paper-size Rule 110 model at the paper's global batch of 512 (strong scaling):
  python3 -m experiments.scaling --config experiments/rule110.py:paper \
      --meshes "data=1 data=2 data=4" --global_batch 512 --json $OUT/scaling_paper.json
  # other layouts: FSDP and tensor parallel on 4 devices
  python3 -m experiments.scaling --config experiments/rule110.py:large \
      --meshes "data=1 fsdp=4 data=2,tensor=2" --per_device_batch 64

Each mesh runs in its own child process (fresh device memory statistics, an out-of-memory or a
crash costs only its row), restricted to the first n GPUs (CUDA_VISIBLE_DEVICES), sequentially.
A child builds the train state on the mesh (`sleep_lm.training.trainer`: the same shardings, rules
and jitted step as training), compiles the step ahead of time, runs `--warmup` steps, then times
`--repeats` runs of `--iters` back-to-back steps (one device sync per run) on one batch held on the
devices (the input pipeline is not timed), and reports the median ms/step with the 20th and 80th
percentiles.

Efficiency of a row = its tokens/s / (devices x tokens/s of the first 1-device row of the same
invocation, or of --baseline's, measured earlier on the same machine). Weak scaling
(--per_device_batch: the global batch grows with the data-parallel degree) measures the cost of
communication; strong scaling (--global_batch) also the loss of per-device work. Memory: the
step's own peak per device from XLA's compiled memory analysis (arguments + outputs +
temporaries - aliased donations) and the allocator's peak bytes in use (`device.memory_stats()`,
GPUs and TPUs only), the largest over the mesh's devices.

Prints one JSON line per row and a table last; --json writes every row after each child (a
timeout keeps what was measured). Rows measured at once on disjoint GPUs of one host (each
invocation with its own CUDA_VISIBLE_DEVICES) join into one table with
  python3 -m experiments.scaling --report one_gpu.json two_gpus.json four_gpus.json --json all.json
which measures nothing and takes the efficiency against their 1-device row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_mesh(spec: str) -> dict[str, int]:
  """'data=2,tensor=2' -> {"data": 2, "fsdp": 1, "tensor": 2}."""
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  for item in filter(None, spec.split(",")):
    axis, _, value = item.partition("=")
    if axis not in mesh or not value.isdigit() or int(value) < 1:
      raise ValueError(f"--meshes: bad item {item!r} in {spec!r}; want AXIS=N with AXIS in "
                       f"{tuple(mesh)} and N >= 1")
    mesh[axis] = int(value)
  return mesh


def load_run(config_arg: str, mesh: dict, global_batch: int):
  from experiments.sweep import load_module
  from sleep_lm.training.run_config import RunConfig
  path, _, arg = config_arg.partition(":")
  config = load_module(path).get_config(arg or None)
  config.mesh = mesh
  config.batch_size = global_batch
  config.eval_batch_size = global_batch       # only checked for divisibility here
  return RunConfig.from_config(config)


def measure(args) -> dict:
  """One row, in this process: the mesh's devices are jax.devices()[:n]."""
  import jax
  import numpy as np

  from sleep_lm.model import sharding
  from sleep_lm.tasks import train_dataset
  from sleep_lm.training import trainer

  mesh_cfg = parse_mesh(args.child)
  n = math.prod(mesh_cfg.values())
  if jax.device_count() < n:
    return {"mesh": args.child, "devices": n, "skipped": f"needs {n} devices, "
            f"{jax.device_count()} visible"}
  probe = load_run(args.config, mesh_cfg, 8 * n)
  shards = math.prod(mesh_cfg[a] for a in sharding.mesh_axes_of(probe.sharding_rules, "batch"))
  global_batch = args.global_batch or args.per_device_batch * shards
  run = load_run(args.config, mesh_cfg, global_batch)
  devices = jax.devices()[:n]
  mesh, boxed = trainer.setup(run, devices)
  state, optimizer = trainer.initial_state(run, mesh, boxed)
  step_fn, batch_sh = trainer.sharded_train_step(run, mesh, boxed, optimizer)
  host = train_dataset(run.task, run.batch_size, data_seeds=run.model_seeds,
                       num_steps=1)[0]
  batch = jax.device_put(host, batch_sh)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch)
    loss = float(np.mean(jax.device_get(metrics["loss"])))
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.iters):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - t0) / args.iters)
  ms = 1e3 * float(np.median(times))
  tokens = run.tokens_per_step
  mem = compiled.memory_analysis()
  xla_bytes = None
  if mem is not None:
    xla_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(boxed))
  return {
      "mesh": args.child, "devices": n, "device_kind": devices[0].device_kind,
      "platform": devices[0].platform, "global_batch": global_batch, "seq_len": run.task.seq_len,
      "seeds": run.seeds, "tokens_per_step": tokens, "params": params,
      "dtype": run.model.dtype, "passes": run.model.passes, "ms_per_step": ms,
      "p20_ms": 1e3 * float(np.percentile(times, 20)),
      "p80_ms": 1e3 * float(np.percentile(times, 80)), "tokens_per_s": tokens / (ms / 1e3),
      "compile_s": compile_s, "loss_after_warmup": loss,
      "xla_bytes_per_device": xla_bytes,
      "peak_bytes_in_use": max(peaks) if all(p is not None for p in peaks) else None}


def child_env(n: int) -> dict:
  """The first n GPUs only (of those already visible), so that other GPUs stay untouched."""
  env = dict(os.environ)
  visible = env.get("CUDA_VISIBLE_DEVICES")
  ids = visible.split(",") if visible else [str(i) for i in range(64)]
  env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
  return env


def table(rows: list[dict]) -> str:
  lines = [f"{'mesh':<22}{'dev':>4}{'batch':>7}{'ms/step':>10}{'p20-p80':>17}{'tokens/s':>12}"
           f"{'eff.':>7}{'XLA GiB':>9}{'peak GiB':>10}"]
  gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"
  for r in rows:
    if "skipped" in r or "error" in r:
      lines.append(f"{r['mesh']:<22}{r['devices']:>4}   {r.get('skipped') or r.get('error')}")
      continue
    eff = f"{r['efficiency']:.1%}" if r.get("efficiency") is not None else "-"
    lines.append(f"{r['mesh']:<22}{r['devices']:>4}{r['global_batch']:>7}{r['ms_per_step']:>10.2f}"
                 f"{r['p20_ms']:>8.2f}-{r['p80_ms']:<8.2f}{r['tokens_per_s']:>12.0f}{eff:>7}"
                 f"{gib(r['xla_bytes_per_device']):>9}{gib(r['peak_bytes_in_use']):>10}")
  return "\n".join(lines)


def with_efficiency(rows: list[dict], base: dict | None, baseline_name: str) -> None:
  """Sets each measured row's efficiency against `base` (a 1-device row of the same machine)."""
  for row in rows:
    if "tokens_per_s" not in row or base is None:
      continue
    if base.get("device_kind") != row.get("device_kind"):
      row["efficiency_error"] = (f"baseline on {base.get('device_kind')}, this row on "
                                 f"{row.get('device_kind')}: not compared")
    else:
      row["efficiency"] = row["tokens_per_s"] / (row["devices"] * base["tokens_per_s"])
      row["baseline"] = "this invocation" if row is base else baseline_name


def report(paths: list[str], out: str | None) -> None:
  """One table from several --json files of the same config and batch (e.g. 1 GPU and 2 GPUs
  measured at once on disjoint GPUs of one host), efficiency against their 1-device row."""
  missing = [p for p in paths if not Path(p).is_file()]
  if missing:
    raise SystemExit(f"--report: no such file: {', '.join(missing)} (give the --json files of "
                     "earlier scaling runs)")
  runs = [json.loads(Path(p).read_text()) for p in paths]
  keys = ("config", "per_device_batch", "global_batch")
  for path, run in zip(paths, runs, strict=True):
    if any(run.get(k) != runs[0].get(k) for k in keys):
      raise SystemExit(f"--report: {path} measured {({k: run.get(k) for k in keys})}, "
                       f"{paths[0]} {({k: runs[0].get(k) for k in keys})}")
  rows = sorted((row for run in runs for row in run["rows"]), key=lambda r: r.get("devices", 0))
  base = next((r for r in rows if r.get("devices") == 1 and "tokens_per_s" in r), None)
  if base is None:
    raise SystemExit(f"--report: no measured 1-device row in {paths}")
  for row in rows:
    row.pop("efficiency", None)
    row.pop("efficiency_error", None)
  with_efficiency(rows, base, "the 1-device row of " + paths[0])
  print(f"config {runs[0]['config']}  on {base.get('device_kind')}  "
        + (f"global batch {runs[0]['global_batch']}" if runs[0]["global_batch"]
           else f"{runs[0]['per_device_batch']} examples per batch shard"))
  print(table(rows))
  if out:
    Path(out).write_text(json.dumps({**{k: runs[0][k] for k in keys}, "reported_from": paths,
                                     "meshes": [r["mesh"] for r in rows], "rows": rows},
                                    indent=2))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/rule110.py:large")
  parser.add_argument("--meshes", default="data=1 data=2 data=4",
                      help="space-separated meshes, each AXIS=N[,AXIS=N] over data/fsdp/tensor")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--per_device_batch", type=int, default=None,
                     help="weak scaling: examples per batch shard (default 64)")
  group.add_argument("--global_batch", type=int, default=None, help="strong scaling")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--timeout", type=int, default=900, help="seconds per child")
  parser.add_argument("--json", default=None)
  parser.add_argument("--baseline", default=None,
                      help="a --json of an earlier invocation on the same machine whose 1-device "
                           "row is the baseline (when this one has no data=1 row)")
  parser.add_argument("--report", nargs="+", default=None, metavar="JSON",
                      help="measure nothing: print one table from these --json files (and "
                           "write it to --json), efficiency against their 1-device row")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.report:
    report(args.report, args.json)
    return
  if args.global_batch is None and args.per_device_batch is None:
    args.per_device_batch = 64

  if args.child:                                 # one row, printed as the last line
    print(json.dumps(measure(args)), flush=True)
    return

  rows = []
  base = None
  if args.baseline:
    earlier = json.loads(Path(args.baseline).read_text())
    same = {k: earlier.get(k) for k in ("config", "per_device_batch", "global_batch")}
    wanted = {"config": args.config, "per_device_batch": args.per_device_batch,
              "global_batch": args.global_batch}
    if same != wanted:
      raise SystemExit(f"--baseline {args.baseline} measured {same}, not {wanted}")
    base = next((r for r in earlier["rows"] if r.get("devices") == 1 and "tokens_per_s" in r),
                None)
    if base is None:
      raise SystemExit(f"--baseline {args.baseline}: no measured 1-device row")
  meshes = args.meshes.split()
  for spec in meshes:
    parse_mesh(spec)                             # fail before any child starts
  for spec in meshes:
    n = math.prod(parse_mesh(spec).values())
    cmd = [sys.executable, "-m", "experiments.scaling", "--child", spec, "--config", args.config,
           "--warmup", str(args.warmup), "--iters", str(args.iters),
           "--repeats", str(args.repeats)]
    cmd += (["--global_batch", str(args.global_batch)] if args.global_batch
            else ["--per_device_batch", str(args.per_device_batch)])
    try:
      out = subprocess.run(cmd, cwd=ROOT, env=child_env(n), capture_output=True, text=True,
                           timeout=args.timeout)
      lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
      row = (json.loads(lines[-1]) if out.returncode == 0 and lines else
             {"mesh": spec, "devices": n,
              "error": f"exit {out.returncode}: " + (out.stderr or out.stdout)[-1500:]})
    except subprocess.TimeoutExpired:
      row = {"mesh": spec, "devices": n, "error": f"timed out after {args.timeout} s"}
    if base is None and row.get("devices") == 1 and "tokens_per_s" in row:
      base = row
    with_efficiency([row], base, "this invocation" if base in rows else args.baseline)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.json:
      Path(args.json).write_text(json.dumps({"config": args.config, "meshes": meshes,
                                             "per_device_batch": args.per_device_batch,
                                             "global_batch": args.global_batch, "rows": rows},
                                            indent=2))
  measured = next((r for r in rows if "device_kind" in r), {})
  print(f"\nconfig {args.config}  ({measured.get('params', 0) / 1e6:.0f}M parameters, "
        f"{measured.get('dtype')}, N = {measured.get('passes')})  on "
        f"{measured.get('device_kind')}  "
        + (f"global batch {args.global_batch}" if args.global_batch
           else f"{args.per_device_batch} examples per batch shard")
        + f" x {measured.get('seq_len')} tokens")
  print(table(rows))


if __name__ == "__main__":
  main()
