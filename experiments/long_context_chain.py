r"""Run the long-context curriculum of experiments/long_context.py end to end, restartably.

  python -m experiments.long_context_chain --preset gpu --root runs/long_context \
      --models N1,N4,attn --deadline 540 [--mem N4=0.35,N1=0.2,attn=0.35] \
      [--set 8k:steps=500 --set all:seeds=1] [--lengths 8k,32k,64k] [-- --config.X=...]
  python -m experiments.long_context_chain --preset smoke --root /tmp/long_context_smoke

Per model (N<k>: the hybrid at N = k; attn: full-cache attention), one process at a time, in
order: `sleep_lm.train` of each stage (--stages, default short, 8k, 32k) in ROOT/<model>/<stage>,
each started from the one before (`init=`), then `sleep_lm.evaluate` of the last stage's run at
each length of --lengths but its own (`--task min_len=...,max_len=...`, writing
ROOT/<model>/<stage>/eval_step<S>_max_len<..>_min_len<..>.json); at its own length the trainer's
last evaluation (metrics.jsonl) is the result. The models' chains run in parallel, sharing the
device: each process gets XLA_PYTHON_CLIENT_MEM_FRACTION from --mem (default 0.9 / models) and
no preallocation. The eval sets are built once in ROOT/eval_data, by a background process that
starts first (so that later stages find theirs ready; a process that needs a set before it is
built builds it itself).

Restartable: a stage whose metrics.jsonl holds the evaluation of its last step is done and
skipped, an evaluation whose JSON exists likewise; a stopped stage resumes from its checkpoint.
--deadline S: S seconds after the start, every running process gets SIGTERM (a trainer saves its
checkpoint and exits 75; an evaluation is simply redone next time) and nothing new starts. So
does a SIGTERM to the chain; an evaluation (which cannot resume) does not start less than
--eval_margin seconds before the deadline. Exit status: 0 when everything is done, 75 when
something was stopped or not started (rerun the same command), 1 when a process failed (its
log: ROOT/<model>/<stage>/train.log or eval_<length>.log).
ROOT/chain.jsonl gets one record per process: model, job, status, wall seconds (compilation
and the device shared with the other models included), so the GPU time of each model is their
sum. Prints the results table of experiments/plot_long_context.py at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from experiments import long_context, processes
from sleep_lm.common.errors import PREEMPTED_STATUS

ROOT_DIR = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).resolve().with_name("long_context.py")
SET_KEYS = ("steps", "batch", "seed", "seeds", "dtype", "eval_size")


@dataclasses.dataclass
class Job:
  model: str
  name: str                     # the stage, or "eval_<length>", or "eval_sets"
  cmd: list[str]
  log: Path
  done: Callable[[], bool]


def model_arg(model: str) -> str:
  """'N4' -> 'hybrid,N=4'; 'attn' -> 'attn'."""
  if model == "attn":
    return "attn"
  if model.startswith("N") and model[1:].isdigit() and int(model[1:]) >= 1:
    return f"hybrid,N={int(model[1:])}"
  raise ValueError(f"--models: {model!r} is neither attn nor N<passes> (N1, N4, ...)")


def stage_arg(preset: str, model: str, stage: str, init: Path | None,
              sets: dict[str, list[str]]) -> str:
  parts = [p for p in preset.split(",") if p] + [model_arg(model), stage]
  parts += sets.get("all", []) + sets.get(stage, [])
  if init is not None:
    parts.append(f"init={init}")
  return ",".join(parts)


def last_step_evaluated(workdir: Path, steps: int) -> bool:
  from sleep_lm.training.workdir import read_records
  records = read_records(workdir / "metrics.jsonl", warn=lambda *_: None)
  return any(r["kind"] == "eval" and r["step"] == steps for r in records)


def eval_json(workdir: Path, steps: int, min_len: int, max_len: int) -> Path:
  """The file `sleep_lm.evaluate --task min_len=..,max_len=..` writes (overrides sorted)."""
  return workdir / f"eval_step{steps}_max_len{max_len}_min_len{min_len}.json"


def plan(args, root: Path) -> dict[str, list[Job]]:
  """Each model's jobs, in order (a job runs once the one before it has finished)."""
  sets = parse_sets(args.set)
  jobs = {}
  for model in args.models:
    chain, init = [], None
    for stage in args.stages:
      arg = stage_arg(args.preset, model, stage, init, sets)
      config = long_context.get_config(arg)
      workdir = root / model / stage
      cmd = [sys.executable, "-m", "sleep_lm.train", f"--config={CONFIG}:{arg}",
             f"--workdir={workdir}", f"--config.data_dir={root / 'eval_data'}", *args.extra]
      chain.append(Job(model, stage, cmd, workdir / "train.log",
                       lambda w=workdir, s=config.steps: last_step_evaluated(w, s)))
      init = workdir
    size = "smoke" if "smoke" in args.preset.split(",") else "full"
    own = (config.task.min_len, config.task.max_len)
    long_context.check(config, [long_context.EVAL_LENGTHS[size][n] for n in args.lengths])
    for name in args.lengths:
      lengths = long_context.EVAL_LENGTHS[size][name]
      if lengths == own:
        continue                      # the trainer's last evaluation
      out = eval_json(init, config.steps, *lengths)
      cmd = [sys.executable, "-m", "sleep_lm.evaluate", f"--workdir={init}",
             f"--task=min_len={lengths[0]},max_len={lengths[1]}"]
      chain.append(Job(model, f"eval_{name}", cmd, init / f"eval_{name}.log",
                       lambda p=out: p.exists()))
    jobs[model] = chain
  return jobs


def parse_sets(items: list[str]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for item in items:
    stage, sep, kv = item.partition(":")
    key = kv.partition("=")[0]
    stages = (*long_context.STAGES, "all")
    if not sep or stage not in stages or key not in SET_KEYS or "=" not in kv:
      raise SystemExit(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of "
                       f"{(*long_context.STAGES, 'all')} and KEY one of {SET_KEYS}")
    out.setdefault(stage, []).append(kv)
  return out


def eval_set_specs(args) -> list[tuple[dict, int]]:
  """(task fields, eval size) of every eval set the chain needs, in the order they are needed."""
  from sleep_lm.training.run_config import RunConfig
  sets = parse_sets(args.set)
  size = "smoke" if "smoke" in args.preset.split(",") else "full"
  specs, seen = [], set()

  def add(config):
    run = RunConfig.from_config(config)
    key = (json.dumps(run.task.fields(), sort_keys=True), run.eval_size)
    if key not in seen:
      seen.add(key)
      specs.append((config.task.to_dict(), run.eval_size))

  finals = []
  for stage in args.stages:
    for model in args.models:
      init = None if stage == args.stages[0] else Path("unused")
      config = long_context.get_config(stage_arg(args.preset, model, stage, init, sets))
      add(config)
      if stage == args.stages[-1]:
        finals.append(config)
  for name in args.lengths:
    for config in finals:
      config = config.copy_and_resolve_references()
      config.task.min_len, config.task.max_len = long_context.EVAL_LENGTHS[size][name]
      config.task.curriculum = ()
      add(config)
  return specs


def build_eval_sets(args, root: Path) -> None:
  from sleep_lm.tasks import eval_sets, make_task
  for fields, size in eval_set_specs(args):
    task = make_task(fields)
    t0 = time.time()
    for name in task.eval_set_names():
      eval_sets.eval_source(task, name, size=size, data_dir=str(root / "eval_data"))
    print(f"eval sets of seq_len {task.seq_len} ({size} per set): {time.time() - t0:.1f}s",
          flush=True)


def child_env(model: str, mem: dict[str, float], count: int) -> dict:
  env = processes.child_env(count, mem.get(model))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT_DIR), env.get("PYTHONPATH")]))
  return env


def run_chain(args, root: Path, log=print) -> int:
  jobs = plan(args, root)
  pool = processes.Pool()
  pending = {m: list(js) for m, js in jobs.items()}
  status: dict[str, str] = {}
  stopping = []

  def stop(reason):
    if stopping:
      return
    stopping.append(reason)
    log(f"{pool.stamp()} {reason}: SIGTERM sent to {pool.terminate()} process(es); "
        "nothing new starts")

  records = root / "chain.jsonl"
  with processes.on_sigterm(lambda: stop("SIGTERM")):
    if not args.no_eval_set_builder and not all(j.done() for js in jobs.values() for j in js):
      cmd = [sys.executable, "-m", "experiments.long_context_chain", "--build_eval_sets_only",
             *sys_args(args)]
      pool.start("eval_sets", cmd, root / "eval_data.log", cwd=ROOT_DIR,
                 env={**child_env("", {}, 1), "JAX_PLATFORMS": "cpu"})
    try:
      while True:
        if args.deadline is not None and pool.elapsed() > args.deadline:
          stop(f"deadline ({args.deadline:.0f}s)")
        running_models = [m for m in pool if m != "eval_sets"]
        for model, queue in pending.items():
          if stopping or model in pool or model in status:
            continue
          if args.parallel and len(running_models) >= args.parallel:
            break
          while queue and queue[0].done():
            log(f"{pool.stamp()} {model} {queue[0].name}: done before, skipped")
            queue.pop(0)
          if not queue:
            status[model] = "done"
            continue
          job = queue[0]
          left = None if args.deadline is None else args.deadline - pool.elapsed()
          if job.name.startswith("eval_") and left is not None and left < args.eval_margin:
            status[model] = f"held back ({job.name} not started {left:.0f}s before the deadline)"
            log(f"{pool.stamp()} {model}: {status[model]}")
            continue
          log(f"{pool.stamp()} start {model} {job.name}: {' '.join(job.cmd)}")
          pool.start(model, job.cmd, job.log, child_env(model, args.mem, len(jobs)),
                     cwd=ROOT_DIR, data=job)
          running_models.append(model)
        if not pool and (stopping or all(m in status or not q for m, q in pending.items())):
          break
        time.sleep(args.poll)
        for child in pool.reap():
          model, job, rc, seconds = child.key, child.data, child.rc, child.seconds
          if model == "eval_sets":
            log(f"{pool.stamp()} eval sets built (rc {rc}, {seconds:.0f}s)")
            continue
          # its results decide (a stop may come after them)
          outcome = processes.outcome(rc, done=job.done(), stopping=bool(stopping))
          if outcome == "done":
            pending[model].pop(0)
          else:
            status[model] = outcome
          with open(records, "a") as f:
            f.write(json.dumps({"model": model, "job": job.name, "status": outcome,
                                "seconds": round(seconds, 1), "rc": rc,
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
          log(f"{pool.stamp()} {outcome} {model} {job.name} in {seconds:.0f}s (log: {job.log})")
    finally:
      pool.terminate(wait=True)       # only on an exception: leave nothing behind

  unfinished = {m: [j.name for j in q] for m, q in pending.items() if q}
  failed = {m: s for m, s in status.items() if s.startswith("FAILED")}
  log(f"{pool.stamp()} chain: " + "; ".join(
      f"{m} {status.get(m, 'not started')}" + (f" (left: {', '.join(unfinished[m])})"
                                               if m in unfinished else "")
      for m in jobs))
  try:
    from experiments import plot_long_context
    print(plot_long_context.table(plot_long_context.load_runs([root])))
  except SystemExit as e:          # no results yet
    log(str(e))
  if failed:
    return 1
  return PREEMPTED_STATUS if unfinished else 0


def sys_args(args) -> list[str]:
  """The arguments that make the same plan (for the eval-set builder)."""
  out = ["--preset", args.preset, "--root", str(args.root), "--models", ",".join(args.models),
         "--stages", ",".join(args.stages), "--lengths", ",".join(args.lengths)]
  for item in args.set:
    out += ["--set", item]
  return out


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--preset", default="gpu",
                      help="presets of experiments/long_context.py for every run: gpu, smoke, "
                           "or '' (float32, one seed)")
  parser.add_argument("--models", default="N1,N4,attn")
  parser.add_argument("--stages", default=",".join(long_context.STAGES))
  parser.add_argument("--lengths", default="8k,32k,64k",
                      help="evaluation lengths of the last stage's runs")
  parser.add_argument("--set", action="append", default=[],
                      help="STAGE:KEY=VALUE (STAGE short, 8k, 32k or all; KEY one of "
                           f"{SET_KEYS}), repeatable")
  parser.add_argument("--mem", default="",
                      help="MODEL=FRACTION,...: each model's XLA_PYTHON_CLIENT_MEM_FRACTION")
  parser.add_argument("--deadline", type=float, default=None,
                      help="seconds after which every process is stopped (SIGTERM)")
  parser.add_argument("--eval_margin", type=float, default=180.0,
                      help="no evaluation starts less than this many seconds before the "
                           "deadline (a stopped evaluation starts over; a trainer resumes)")
  parser.add_argument("--parallel", type=int, default=0, help="models at once (0: all)")
  parser.add_argument("--poll", type=float, default=2.0, help="seconds between checks")
  parser.add_argument("--no_eval_set_builder", action="store_true",
                      help="no background process building the eval sets ahead")
  parser.add_argument("--build_eval_sets_only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("extra", nargs="*", help="flags for every sleep_lm.train (after --)")
  args = parser.parse_args(argv)
  args.root = Path(args.root).absolute()
  args.models = [m for m in args.models.split(",") if m]
  args.stages = [s for s in args.stages.split(",") if s]
  args.lengths = [n for n in args.lengths.split(",") if n]
  bad = [s for s in args.stages if s not in long_context.STAGES]
  if bad or args.stages != sorted(args.stages, key=long_context.STAGES.index) or not args.stages:
    parser.error(f"--stages: stages of {long_context.STAGES} in that order, got {args.stages}")
  if args.stages[0] != "short":
    parser.error("--stages: the chain starts at short (the later stages need init=)")
  size = "smoke" if "smoke" in args.preset.split(",") else "full"
  bad = [n for n in args.lengths if n not in long_context.EVAL_LENGTHS[size]]
  if bad:
    parser.error(f"--lengths: {bad} not in {list(long_context.EVAL_LENGTHS[size])}")
  if "," in str(args.root) or "=" in str(args.root):
    parser.error("--root: no ',' or '=' in the path (it goes into config args as init=...)")
  for model in args.models:
    try:
      model_arg(model)
    except ValueError as e:
      parser.error(str(e))
  try:
    args.mem = {k: float(v) for k, v in (item.split("=") for item in args.mem.split(",")
                                         if item)}
  except ValueError:
    parser.error(f"--mem: expected MODEL=FRACTION,..., got {args.mem!r}")
  bad = {k: v for k, v in args.mem.items() if k not in args.models or not 0 < v <= 1}
  if bad:
    parser.error(f"--mem: {bad}: each MODEL one of --models {args.models}, each FRACTION in "
                 f"(0, 1]")
  parse_sets(args.set)
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  args.root.mkdir(parents=True, exist_ok=True)
  if args.build_eval_sets_only:
    build_eval_sets(args, args.root)
    return 0
  return run_chain(args, args.root, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
  sys.exit(main())
