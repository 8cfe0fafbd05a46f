r"""Run a named sweep of an experiment config, several runs at once on one machine.

  python -m experiments.sweep --config experiments/rule110.py --sweep fig2a --root runs/fig2a
  python -m experiments.sweep --config experiments/rule110.py --sweep fig2b --root runs/fig2b \
      --parallel 3 -- --config.steps=1500 --config.eval_every=100
  python -m experiments.sweep --config experiments/depo.py --sweep fig3 --root runs/depo \
      --gpus 0,1,2

Each run is `python -m sleep_lm.train --config CONFIG:ARG --workdir ROOT/ARG [extra flags]`, with
its output in ROOT/ARG/train.log. Without --gpus the runs share the device (each gets an equal
slice of its memory); with --gpus, run i gets GPU gpus[i % len(gpus)] to itself (one run per GPU
at a time). The eval sets are built once, before the runs start, in ROOT/eval_data. Repeating the
command resumes unfinished runs. Prints a table of final held-out accuracies (mean over seeds)
and the floors last. SIGTERM stops every run after its checkpoint; the sweep then exits with 75,
like a run (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

from experiments import processes
from sleep_lm.common.errors import PREEMPTED_STATUS


def load_module(path: str):
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def last_evals(workdir: Path) -> list[dict]:
  """The eval records of the last evaluated step (one per set and seed)."""
  from sleep_lm.training.workdir import read_records
  evals = [r for r in read_records(workdir / "metrics.jsonl") if r["kind"] == "eval"]
  return [r for r in evals if r["step"] == evals[-1]["step"]] if evals else []


def run_dir(root: Path, arg: str) -> Path:
  return root / arg.replace(",", "_").replace("=", "")


def print_results(sweep: str, runs: list[str], root: Path, failed: list[str],
                  seconds: float) -> None:
  """The final held-out accuracies of each run (mean over seeds), and the floors."""
  print(f"\nsweep {sweep}: {len(runs)} runs in {seconds:.0f}s")
  print(f"{'run':<32}{'set':>6}{'step':>8}{'seeds':>6}{'loss':>8}{'exact':>8}{'sd':>7}"
        f"{'answers':>9}{'floor':>8}")
  for arg in runs:
    evals = last_evals(run_dir(root, arg))
    if arg in failed:
      print(f"{arg:<32}  FAILED: see its train.log")
    for name in dict.fromkeys(r["set"] for r in evals):
      rs = [r for r in evals if r["set"] == name]
      exact = [r["exact_accuracy"] for r in rs]
      sd = statistics.stdev(exact) if len(exact) > 1 else 0.0
      print(f"{arg:<32}{name:>6}{rs[0]['step']:>8}{len(rs):>6}"
            f"{statistics.mean(r['loss'] for r in rs):>8.4f}{statistics.mean(exact):>8.4f}"
            f"{sd:>7.4f}{statistics.mean(r['query_accuracy'] for r in rs):>9.4f}"
            f"{rs[0]['floor_exact']:>8.4f}")
    if not evals and arg not in failed:
      print(f"{arg:<32}  no evaluation yet")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--config", required=True)
  parser.add_argument("--sweep", required=True)
  parser.add_argument("--root", required=True)
  parser.add_argument("--parallel", type=int, default=0,
                      help="runs at once (0: all, or one per GPU with --gpus)")
  parser.add_argument("--gpus", default="", help="comma-separated GPU ids: one run per GPU")
  parser.add_argument("--runs", default="", help="comma-separated subset of the sweep's runs "
                      "(by index)")
  parser.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
  args = parser.parse_args()

  module = load_module(args.config)
  if args.sweep not in module.SWEEPS:
    sys.exit(f"--sweep must be one of {sorted(module.SWEEPS)}, got {args.sweep!r}")
  runs = module.SWEEPS[args.sweep]
  if args.runs:
    runs = [runs[int(i)] for i in args.runs.split(",")]
  root = Path(args.root).absolute()
  data_dir = root / "eval_data"
  gpus = [g for g in args.gpus.split(",") if g]
  parallel = args.parallel or (len(gpus) if gpus else len(runs))

  # Build each distinct eval set once, so that concurrent runs only read it.
  from sleep_lm.training import evaluation
  from sleep_lm.training.run_config import RunConfig
  for arg in runs:
    c = module.get_config(arg)
    for flag in args.extra:
      if flag.startswith("--config.eval_size="):
        c.eval_size = int(flag.split("=", 1)[1])
    run = RunConfig.from_config(c)
    evaluation.prepare_eval_sets(run.task, size=run.eval_size, data_dir=data_dir)

  share = parallel if not gpus else max(1, parallel // len(gpus))
  env = processes.child_env(share)
  started = 0
  pending, failed, stopped = list(runs), [], []
  pool = processes.Pool()

  def stop():   # on SIGTERM (e.g. `timeout`), let every run checkpoint and leave
    pending.clear()
    print(f"{pool.stamp()} stopping: SIGTERM sent to {pool.terminate()} runs", flush=True)

  with processes.on_sigterm(stop):
    while pending or pool:
      while pending and len(pool) < parallel:
        arg = pending.pop(0)
        workdir = run_dir(root, arg)
        cmd = [sys.executable, "-m", "sleep_lm.train", f"--config={args.config}:{arg}",
               f"--workdir={workdir}", f"--config.data_dir={data_dir}", *args.extra]
        run_env = dict(env)
        if gpus:
          busy = {c.env.get("CUDA_VISIBLE_DEVICES") for c in pool.children.values()}
          run_env["CUDA_VISIBLE_DEVICES"] = next((g for g in gpus if g not in busy),
                                                 gpus[started % len(gpus)])
        started += 1
        print(f"{pool.stamp()} start {arg} "
              f"(GPU {run_env.get('CUDA_VISIBLE_DEVICES', 'shared')}): {' '.join(cmd)}",
              flush=True)
        pool.start(arg, cmd, workdir / "train.log", run_env)
      time.sleep(2)
      for child in pool.reap():
        arg, status = child.key, processes.outcome(child.rc)
        if status == "stopped":   # stopped by SIGTERM after its checkpoint
          status = "stopped (rerun the sweep to continue)"
          stopped.append(arg)
        elif status != "done":
          failed.append(arg)
        print(f"{pool.stamp()} {status} {arg}  (log: {child.log})", flush=True)

    print_results(args.sweep, runs, root, failed, pool.elapsed())
    sys.exit(1 if failed else PREEMPTED_STATUS if stopped else 0)


if __name__ == "__main__":
  main()
