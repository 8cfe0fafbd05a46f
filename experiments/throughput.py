r"""Training-step throughput of a config for several N and kernel implementations.

  python -m experiments.throughput --config experiments/rule110.py --passes 1,2,3,4 \
      --implementations chunked --json $OUT/throughput.json

Times the jitted train step (forward, backward through every pass, optimizer) after warm-up,
on one batch held on the device, and reports tokens/s, ms/step and the ratio to the first row's
N (and implementation) measured in the same run. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from experiments.sweep import load_module
from sleep_lm import profiling, sharding, train
from sleep_lm.data import rule110
from sleep_lm.training import make_train_step


def load_config(path_and_arg: str):
  """'experiments/rule110.py:smoke' -> that file's get_config('smoke')."""
  path, _, arg = path_and_arg.partition(":")
  return load_module(path).get_config(arg or None)


def time_step(config, *, warmup: int, iters: int, profile_dir: str | None = None) -> dict:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  state, optimizer = train.initial_state(config, mesh)
  step = make_train_step(train.model_config(config), optimizer)
  batch = rule110.Rule110Task(t=config.task.t).batch(np.arange(config.batch_size))
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  t0 = time.perf_counter()
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  ms = 1e3 * float(np.median(times))
  extra = {}
  if profile_dir:  # where the step's device time goes, by kernel
    holder = [state]

    def one_step():
      holder[0], _ = step(holder[0], batch)  # the state is donated: carry the new one
      return holder[0]

    extra["profile"] = profiling.device_time_table(one_step, calls=3, log_dir=profile_dir)
    print(profiling.format_table(extra["profile"]), flush=True)
  return {**extra, "ms_per_step": ms, "p20_ms": 1e3 * float(np.percentile(times, 20)),
          "p80_ms": 1e3 * float(np.percentile(times, 80)), "compile_s": compile_s,
          "tokens_per_s": config.batch_size * rule110.SEQ_LEN / (ms / 1e3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--config", default="experiments/rule110.py")
  parser.add_argument("--passes", default="1,2,3,4")
  parser.add_argument("--implementations", default="chunked",
                      help="comma-separated kernel implementation names")
  parser.add_argument("--dtype", default=None, help="override model.dtype")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--json", default=None)
  parser.add_argument("--profile-dir", default=None,
                      help="also trace 3 steps per row and print device time by kernel")
  args = parser.parse_args()

  rows = []
  for impl in args.implementations.split(","):
    for n in map(int, args.passes.split(",")):
      config = load_config(args.config)
      config.model.passes = n
      config.model.kernel_implementation = impl
      if args.dtype:
        config.model.dtype = args.dtype
      row = {"passes": n, "implementation": impl, "dtype": config.model.dtype,
             "batch_size": config.batch_size, **time_step(config, warmup=args.warmup,
                                                          iters=args.iters,
                                                          profile_dir=args.profile_dir)}
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
  base = rows[0]["tokens_per_s"]
  device = jax.devices()[0].device_kind
  print(f"\ndevice: {device}   config: {args.config}   batch {rows[0]['batch_size']} x "
        f"{rule110.SEQ_LEN} tokens")
  print(f"{'impl':<16}{'N':>3}{'ms/step':>10}{'p20-p80':>16}{'tokens/s':>12}{'vs first':>10}")
  for r in rows:
    r["relative_to_first"] = r["tokens_per_s"] / base
    print(f"{r['implementation']:<16}{r['passes']:>3}{r['ms_per_step']:>10.2f}"
          f"{r['p20_ms']:>8.2f}-{r['p80_ms']:<7.2f}{r['tokens_per_s']:>12.0f}"
          f"{r['relative_to_first']:>10.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "config": args.config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
