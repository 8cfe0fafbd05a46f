r"""Accuracy against evaluation length for the long-context runs (issue 27), and the table.

  python -m experiments.plot_long_context --root runs/long_context \
      --out docs/figures/long_context.png
  python -m experiments.plot_long_context --root docs/results_runs/long_context --table_only
  python -m experiments.plot_long_context --root runs/lc_seed0 --root runs/lc_seed1 --out lc.png \
      --curves lc_curves.png

Reads only what a run directory keeps when its checkpoints are gone: config.json, metrics.jsonl
and the eval_step*.json files of `sleep_lm.evaluate` (and ROOT/chain.jsonl, the chain's wall
times, where present). Every directory under --root with a config.json of experiments/
long_context.py is a run; runs in the same folder are the stages of one model (the chain's
ROOT/<model>/<stage>), and folders of the same name under several --root are the same model
run with other seeds (their seeds are pooled). A chain's results are those of its
longest-trained stage that has any:
at each length, the eval JSON of its last step (`--task min_len=..,max_len=..`), or at its own
length its last evaluation in metrics.jsonl.

The figure: one panel per op-count eval set (op1, op2, op4, op6, op8 where evaluated): exact set
match against the evaluated sequence length (log scale), one line per model, mean over seeds
with error bars of one sample sd; dotted: the answer-the-root floor (floor_root_only: no
arithmetic, pure recall; not drawn at op 1, where answering the root is the task); the dashed
vertical line marks the longest trained length. The table: per model, length and set, the
mean, sd and each seed, the floors (root_only, all_derivable) and chance; then per model and
stage the tokens trained (per seed), the steps done and the training time (from metrics.jsonl:
the sum over each process's last elapsed time, compilation before the first step excluded;
sharing the device) and the chain's wall time of the stage's processes where chain.jsonl has
it. --curves: a second figure, the training loss and token accuracy against step per stage
(a column each), a line per model and seed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments import common
from sleep_lm.training import workdir
from sleep_lm.training.run_config import RunConfig


def describe(run: RunConfig) -> str:
  m = run.model
  if "gdn" not in m.layers:
    return "attention, full cache" if m.eviction == "none" else f"attention, {m.eviction}"
  return f"hybrid N = {m.passes} ({m.eviction}, L = {m.window})"


def train_seconds(records: list[dict]) -> float:
  """Training time of a run from its train records: each process (a resume restarts
  elapsed_s) counts to its last record."""
  first_seed = min((r["seed"] for r in records if r["kind"] == "train"), default=None)
  total, last = 0.0, None
  for r in records:
    if r["kind"] != "train" or r["seed"] != first_seed:
      continue
    if last is not None and r["elapsed_s"] < last:
      total += last
    last = r["elapsed_s"]
  return total + (last or 0.0)


def _results(path: Path, run: RunConfig, records: list[dict]) -> dict[int, dict]:
  """{seq_len: {"step", "sets": {name: {"exact": [per seed], floors...}}}} of the run's newest
  evaluated step: its eval JSONs and its own length's last evaluation in metrics.jsonl."""
  out = {}
  evals = [r for r in records if r["kind"] == "eval"]
  if evals:
    step = evals[-1]["step"]
    sets = defaultdict(lambda: {"exact": []})
    for r in evals:
      if r["step"] == step:
        s = sets[r["set"]]
        s["exact"].append(r["exact_accuracy"])
        s.update({k: v for k, v in r.items() if k.startswith(("floor_", "chance_"))})
    out[run.task.seq_len] = {"step": step, "sets": dict(sets), "source": "metrics.jsonl"}
  for file in sorted(path.glob("eval_step*.json")):
    data = json.loads(file.read_text())
    t = data["task"]
    length = t["max_len"] + 2 * t["max_op"] + 2
    if length in out and out[length]["step"] > data["step"]:
      continue
    if evals and data["step"] < evals[-1]["step"]:
      continue                         # an older checkpoint's evaluation
    sets = {name: {"exact": r["exact_accuracy"],
                   **{k: v for k, v in r.items() if k.startswith(("floor_", "chance_"))}}
            for name, r in data["sets"].items()}
    out[length] = {"step": data["step"], "sets": sets, "source": file.name}
  return out


def load_runs(roots: list[Path]) -> list[dict]:
  """One entry per model (a chain's ROOT/<model> folder, its name the model's): its chains (one
  per root that has it: the stages in training order, the final stage, the chain's wall
  times) and its results, the seeds of every chain's final stage together (chains run with
  other seeds, `--set all:seed=1`, in other roots)."""
  folders, seen = defaultdict(list), set()
  for root in roots:
    for config_path in sorted(Path(root).glob("**/config.json")):
      if config_path.resolve() in seen:       # a root inside another
        continue
      seen.add(config_path.resolve())
      config = workdir.load_config(config_path.parent)
      if config.get("name") != "long_context":
        continue
      run = RunConfig.from_config(config)
      records = workdir.read_records(config_path.parent / "metrics.jsonl", warn=lambda *_: None)
      trained = [r["step"] for r in records if r["kind"] == "train"]
      folders[config_path.parent.parent].append({
          "path": config_path.parent, "run": run, "records": records,
          "steps_done": max(trained, default=0),
          "results": _results(config_path.parent, run, records)})
  if not folders:
    raise SystemExit(f"no experiments/long_context.py run under {[str(r) for r in roots]}")
  models = defaultdict(list)
  for folder, stages in folders.items():
    stages.sort(key=lambda s: s["run"].task.seq_len)
    final = next((s for s in reversed(stages) if s["results"]), stages[-1])
    models[folder.name].append({"folder": folder, "stages": stages, "final": final,
                                "walls": _chain_walls(folder.parent / "chain.jsonl",
                                                      folder.name)})
  out = []
  for name, chains in models.items():
    run = chains[0]["final"]["run"]
    out.append({"name": name, "label": describe(run), "run": run, "chains": chains,
                "results": _merge([c["final"]["results"] for c in chains])})
  return sorted(out, key=lambda m: ("gdn" not in m["run"].model.layers, m["run"].model.passes))


def _merge(results: list[dict]) -> dict:
  """Several chains' results of one model: per length and set, their seeds together."""
  out = {}
  for res in results:
    for length, r in res.items():
      into = out.setdefault(length, {"step": r["step"], "sets": {}, "source": r["source"]})
      for name, s in r["sets"].items():
        if name in into["sets"]:
          into["sets"][name]["exact"] = into["sets"][name]["exact"] + s["exact"]
        else:
          into["sets"][name] = dict(s)
  return out


def _chain_walls(path: Path, model: str) -> dict[str, float]:
  walls = defaultdict(float)
  if path.exists():
    for line in path.read_text().splitlines():
      r = json.loads(line)
      if r.get("model") == model:
        walls[r["job"]] += r["seconds"]
  return dict(walls)


def _k(length: int) -> str:
  return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _sd(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def table(models: list[dict]) -> str:
  lines = [f"{'model':<32}{'length':>7}{'set':>5}{'seeds':>6}{'exact':>8}{'sd':>7}  "
           f"{'per seed':<22}{'root':>7}{'all':>7}{'chance':>8}  from"]
  for m in models:
    for length, res in sorted(m["results"].items()):
      for name, s in res["sets"].items():
        per_seed = " ".join(f"{x:.3f}" for x in s["exact"])
        lines.append(f"{m['label'][:31]:<32}{_k(length):>7}{name:>5}{len(s['exact']):>6}"
                     f"{np.mean(s['exact']):>8.3f}{_sd(s['exact']):>7.3f}  {per_seed:<22}"
                     f"{s.get('floor_root_only', float('nan')):>7.3f}"
                     f"{s.get('floor_all_derivable', float('nan')):>7.3f}"
                     f"{s.get('chance_exact', float('nan')):>8.4f}  {res['source']}")
  lines.append("")
  lines.append(f"{'model':<32}{'stage':>7}{'seq_len':>8}{'steps':>12}{'batch':>6}{'seeds':>6}"
               f"{'tokens/seed':>12}{'train min':>10}{'wall min':>9}{'op1 own':>8}")
  for m in models:
    for chain in m["chains"]:
      if len(m["chains"]) > 1:
        lines.append(f"{m['label'][:31]:<32}chain {chain['folder']}")
      for s in chain["stages"]:
        run = s["run"]
        own = s["results"].get(run.task.seq_len, {}).get("sets", {}).get("op1")
        wall = chain["walls"].get(s["path"].name)
        lines.append(
            f"{m['label'][:31]:<32}{s['path'].name:>7}{run.task.seq_len:>8}"
            f"{s['steps_done']:>6}/{run.steps:<5}{run.batch_size:>6}{run.seeds:>6}"
            f"{s['steps_done'] * run.batch_size * run.task.seq_len / 1e6:>11.3g}M"
            f"{train_seconds(s['records']) / 60:>10.1f}"
            f"{'' if wall is None else format(wall / 60, '.1f'):>9}"
            f"{'' if own is None else format(np.mean(own['exact']), '.3f'):>8}")
      evals = {k: v for k, v in chain["walls"].items() if k.startswith("eval_")}
      if evals:
        lines.append(f"{'':<32}evaluations, wall min: " + ", ".join(
            f"{k[5:]} {v / 60:.1f}" for k, v in sorted(evals.items())))
  return "\n".join(lines)


def draw(models: list[dict], out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(n for m in models for res in m["results"].values()
                             for n in res["sets"]))
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), dpi=120,
                           squeeze=False, sharey=True)
  lengths = sorted({length for m in models for length in m["results"]})
  trained = max(m["run"].task.seq_len for m in models)
  for ax, name in zip(axes[0], names, strict=True):
    floors = defaultdict(list)
    for i, m in enumerate(models):
      points = [(length, res["sets"][name]) for length, res in sorted(m["results"].items())
                if name in res["sets"]]
      for length, s in points:
        if "floor_root_only" in s:
          floors[length].append(s["floor_root_only"])
      if points:
        ax.errorbar([p[0] for p in points], [np.mean(p[1]["exact"]) for p in points],
                    yerr=[_sd(p[1]["exact"]) for p in points], marker="o", ms=3, capsize=2,
                    color=f"C{i}", label=f"{m['label']} ({len(points[0][1]['exact'])} seeds)")
    xs = sorted(floors)
    if xs and min(np.mean(floors[x]) for x in xs) < 0.999:   # op 1: answering the root is the task
      ax.plot(xs, [np.mean(floors[x]) for x in xs], ":", color="k", lw=1,
              label="answer the root (floor)")
    ax.axvline(trained, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_k(x) for x in lengths])
    ax.minorticks_off()
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("evaluated length (tokens)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("exact set match")
  axes[0][-1].legend(fontsize=6)
  fig.suptitle(f"GSM-Infinite symbolic, question first: trained up to {_k(trained)} tokens "
               f"(dashed); error bars: sd over seeds", fontsize=9)
  common.save_figure(fig, out)


def curves(models: list[dict]) -> dict[str, dict[str, list[tuple[list, list, list]]]]:
  """Per stage (the run folder's name: short, 8k, 32k) and model label, each chain's and seed's
  training curve: (steps, loss, token accuracy) from its train records; a step logged again by
  a resumed process counts once, as its last record (records without a token accuracy: NaN)."""
  out = defaultdict(lambda: defaultdict(list))
  for m in models:
    for chain in m["chains"]:
      for stage in chain["stages"]:
        train = [r for r in stage["records"] if r["kind"] == "train"]
        for seed in sorted({r["seed"] for r in train}):
          last = {r["step"]: r for r in train if r["seed"] == seed}
          rows = [last[step] for step in sorted(last)]
          out[stage["path"].name][m["label"]].append(
              ([r["step"] for r in rows], [r["loss"] for r in rows],
               [r.get("token_accuracy", float("nan")) for r in rows]))
  return out


def draw_curves(models: list[dict], out: str) -> None:
  """Training loss and token accuracy against step, one column per stage, one colour per model
  (a line per seed). Both cover the supervised answer tokens only (ANSWER, the name tokens, END:
  the task's loss mask), so writing END alone scores ~0.2."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by_stage = curves(models)
  seq_len = defaultdict(lambda: float("inf"))      # stages in order of length
  for st in (st for m in models for c in m["chains"] for st in c["stages"]):
    seq_len[st["path"].name] = min(seq_len[st["path"].name], st["run"].task.seq_len)
  stages = sorted(by_stage, key=seq_len.__getitem__)
  fig, axes = plt.subplots(2, len(stages), figsize=(3.6 * len(stages), 5.4), dpi=120,
                           squeeze=False)
  colours = {m["label"]: f"C{i}" for i, m in enumerate(models)}
  for col, stage in enumerate(stages):
    for label, lines in by_stage[stage].items():
      for i, (steps, loss, accuracy) in enumerate(lines):
        kw = dict(color=colours[label], lw=0.9, label=label if i == 0 else None)
        axes[0][col].plot(steps, loss, **kw)
        axes[1][col].plot(steps, accuracy, **kw)
    axes[0][col].set_title(f"stage {stage}", fontsize=9)
    axes[1][col].set_xlabel("step")
    for row in (0, 1):
      axes[row][col].grid(alpha=0.3)
    losses = [x for lines in by_stage[stage].values() for _, loss, _ in lines for x in loss]
    if losses and max(losses) > 20 * min(losses):   # the short stage starts ~100x up
      axes[0][col].set_yscale("log")
  axes[0][0].set_ylabel("training loss (nats per answer token)")
  axes[1][0].set_ylabel("training answer-token accuracy")
  axes[0][-1].legend(fontsize=6)
  fig.suptitle("Training curves of the long-context chains (a line per seed)", fontsize=9)
  common.save_figure(fig, out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", action="append", required=True,
                      help="a chain's root (repeatable)")
  parser.add_argument("--out", default=None, help="the PNG (omit with --table_only)")
  parser.add_argument("--curves", default=None,
                      help="also this PNG: training loss and token accuracy per stage")
  parser.add_argument("--table_only", action="store_true")
  args = parser.parse_args(argv)
  models = load_runs([Path(r) for r in args.root])
  print(table(models))
  if not args.table_only:
    if not args.out:
      parser.error("--out is required unless --table_only")
    draw(models, args.out)
  if args.curves:
    draw_curves(models, args.curves)


if __name__ == "__main__":
  main()
