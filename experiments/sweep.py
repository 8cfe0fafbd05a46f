r"""Run a named sweep of an experiment config, several runs at once on one machine.

  python -m experiments.sweep --config experiments/rule110.py --sweep fig2a --root runs/fig2a
  python -m experiments.sweep --config experiments/rule110.py --sweep fig2b --root runs/fig2b \
      --parallel 3 -- --config.steps=1500 --config.eval_every=100

Each run is `python -m sleep_lm.train --config CONFIG:ARG --workdir ROOT/ARG [extra flags]`, with
its output in ROOT/ARG/train.log. On a GPU the runs share the device (each gets an equal slice of
its memory). The eval sets are built once, before the runs start, in ROOT/eval_data. Repeating the
command resumes unfinished runs. Prints a table of final held-out accuracies last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def load_module(path: str):
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def last_eval(workdir: Path) -> dict | None:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  evals = [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "eval"]
  return evals[-1] if evals else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--config", required=True)
  parser.add_argument("--sweep", required=True)
  parser.add_argument("--root", required=True)
  parser.add_argument("--parallel", type=int, default=0, help="runs at once (0: all)")
  parser.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
  args = parser.parse_args()

  module = load_module(args.config)
  if args.sweep not in module.SWEEPS:
    sys.exit(f"--sweep must be one of {sorted(module.SWEEPS)}, got {args.sweep!r}")
  runs = module.SWEEPS[args.sweep]
  root = Path(args.root).absolute()
  data_dir = root / "eval_data"
  parallel = args.parallel or len(runs)

  # Build each distinct eval set once, so that concurrent runs only read it.
  from sleep_lm.data import tfds_rule110
  for arg in runs:
    c = module.get_config(arg)
    for flag in args.extra:
      if flag.startswith("--config.eval_size="):
        c.eval_size = int(flag.split("=", 1)[1])
    tfds_rule110.eval_source(c.task.t, data_dir=str(data_dir), size=c.eval_size, seed=c.task.seed)

  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.3f}")
  pending, active, failed = list(runs), {}, []
  t0 = time.time()

  def stop(*_):   # on SIGTERM (e.g. `timeout`), let every run checkpoint and leave
    pending.clear()
    for proc, _, _ in active.values():
      proc.send_signal(signal.SIGTERM)
    print(f"[{time.time() - t0:6.0f}s] stopping: SIGTERM sent to {len(active)} runs", flush=True)

  signal.signal(signal.SIGTERM, stop)
  while pending or active:
    while pending and len(active) < parallel:
      arg = pending.pop(0)
      workdir = root / arg.replace(",", "_").replace("=", "")
      workdir.mkdir(parents=True, exist_ok=True)
      cmd = [sys.executable, "-m", "sleep_lm.train", f"--config={args.config}:{arg}",
             f"--workdir={workdir}", f"--config.data_dir={data_dir}", *args.extra]
      log = open(workdir / "train.log", "a")
      print(f"[{time.time() - t0:6.0f}s] start {arg}: {' '.join(cmd)}", flush=True)
      active[arg] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                     workdir, log)
    time.sleep(2)
    for arg, (proc, workdir, log) in list(active.items()):
      if proc.poll() is not None:
        log.close()
        del active[arg]
        status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
        if proc.returncode:
          failed.append(arg)
        print(f"[{time.time() - t0:6.0f}s] {status} {arg}  (log: {workdir / 'train.log'})",
              flush=True)

  print(f"\nsweep {args.sweep}: {len(runs)} runs in {time.time() - t0:.0f}s")
  print(f"{'run':<16}{'step':>8}{'exact acc':>12}  per answer")
  for arg in runs:
    r = last_eval(root / arg.replace(",", "_").replace("=", ""))
    if arg in failed:
      print(f"{arg:<16}{'FAILED: see its train.log':>34}")
    elif r:
      print(f"{arg:<16}{r['step']:>8}{r['exact_accuracy']:>12.4f}  "
            f"{[round(a, 3) for a in r['answer_accuracy']]}")
    else:
      print(f"{arg:<16}{'-':>8}{'-':>12}")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
