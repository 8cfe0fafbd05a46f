r"""Draw the GSM-Infinite figures (the paper's Fig. 4 and 5 panels) from runs' metrics.jsonl.

  python -m experiments.plot_gsm --root runs/gsm --out docs/figures/gsm_fig45.png
  python -m experiments.plot_gsm --root runs/gsm_fig4 --root runs/gsm_fig5 --out gsm.png

One panel per run (hard eviction N = 1, 2, 4; sliding with and without the hard-eviction warm-up;
the full-cache attention model): held-out exact accuracy (exact set match) of each op-count eval
set against training steps, mean over seeds with a min..max band; dotted in the same colour, the
best no-arithmetic floor of that set (max of answering {the constant-assigned variable} and every
derivable variable; not drawn for op 1, where answering the constant-assigned variable is the
task). Every run directory under each --root (any depth) is drawn. Prints a table
of the last evaluation: per run and op set, the mean and sd over seeds and each seed, with the
floors (root_only, all_derivable, mode, empty) and chance, and the tokens seen per seed.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import common  # noqa: E402
from sleep_lm.training import workdir  # noqa: E402
from sleep_lm.training.run_config import RunConfig  # noqa: E402


def describe(run: RunConfig) -> str:
  m = run.model
  if "gdn" not in m.layers:
    return "attention only, " + ("full cache" if m.eviction == "none" else f"{m.eviction} L = "
                                 f"{m.window}")
  label = f"hybrid N = {m.passes}, {m.eviction} L = {m.window}"
  if run.hard_warmup_steps:
    label += f", hard warm-up {run.hard_warmup_steps} steps"
  return label


def _order(run: RunConfig) -> tuple:
  m = run.model
  return ("gdn" not in m.layers, m.eviction != "hard", run.hard_warmup_steps > 0, m.passes)


def load_runs(roots: list[Path]) -> list[dict]:
  runs = []
  for root in roots:
    for path in sorted(root.glob("**/metrics.jsonl")):
      config = workdir.load_config(path.parent)
      if config.task.name != "gsm_symbolic":
        continue
      evals = [r for r in workdir.read_records(path) if r["kind"] == "eval"]
      if not evals:
        continue
      run = RunConfig.from_config(config)
      runs.append({"run": run, "label": describe(run) + ", " + common.steps_label(
                       evals[-1]["step"], run.steps),
                   "tokens_per_step": run.batch_size * run.task.seq_len, "evals": evals})
  if not runs:
    raise SystemExit(f"no gsm_symbolic run with eval records under {roots}")
  return sorted(runs, key=lambda r: _order(r["run"]))


def best_floor(record: dict) -> float:
  return max(record.get("floor_root_only", 0.0), record.get("floor_all_derivable", 0.0),
             record.get("floor_exact", 0.0))


def draw(runs: list[dict], out: str) -> None:
  cols = min(len(runs), 4)
  rows = -(-len(runs) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), dpi=120,
                           squeeze=False, sharey=True)
  print(f"{'run':<66}{'set':>5}{'step':>7}{'tokens':>8}{'exact':>8}{'sd':>7}  per seed"
        f"{'':<16}{'root':>7}{'all':>7}{'mode':>7}{'empty':>7}{'chance':>8}")
  for ax, r in zip(axes.flat, runs, strict=False):
    sets = list(dict.fromkeys(e["set"] for e in r["evals"]))
    for i, name in enumerate(sets):
      steps = defaultdict(list)
      for e in r["evals"]:
        if e["set"] == name:
          steps[e["step"]].append(e)
      xs = sorted(steps)
      acc = [[e["exact_accuracy"] for e in steps[s]] for s in xs]
      color = f"C{i}"
      ax.plot(xs, [np.mean(a) for a in acc], "o-", ms=2, color=color, label=name)
      ax.fill_between(xs, [min(a) for a in acc], [max(a) for a in acc], color=color, alpha=0.2,
                      lw=0)
      last = steps[xs[-1]]
      if best_floor(last[0]) < 0.999:     # op 1: answering {root} is the task itself
        ax.axhline(best_floor(last[0]), color=color, ls=":", lw=1)
      seeds = sorted(last, key=lambda e: e["seed"])
      per_seed = " ".join(f"{e['exact_accuracy']:.3f}" for e in seeds)
      f = last[0]
      acc = [e["exact_accuracy"] for e in last]   # sd over seeds: the sample sd, as elsewhere
      print(f"{r['label'][:65]:<66}{name:>5}{xs[-1]:>7}"
            f"{xs[-1] * r['tokens_per_step'] / 1e6:>7.0f}M"
            f"{np.mean(acc):>8.3f}"
            f"{np.std(acc, ddof=min(1, len(acc) - 1)):>7.3f}  {per_seed:<24}"
            f"{f.get('floor_root_only', float('nan')):>7.3f}"
            f"{f.get('floor_all_derivable', float('nan')):>7.3f}"
            f"{f.get('floor_mode', float('nan')):>7.3f}{f.get('floor_empty', float('nan')):>7.3f}"
            f"{f.get('chance_exact', float('nan')):>8.4f}")
    ax.set_title(r["label"], fontsize=7)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
  for ax in axes.flat[len(runs):]:
    ax.axis("off")
  for ax in axes[:, 0]:
    ax.set_ylabel("exact set match")
  axes.flat[0].legend(fontsize=7, title="eval set", title_fontsize=7)
  fig.suptitle("GSM-Infinite symbolic, question first, no chain of thought\n(band: min-max "
               "over seeds; dotted: best no-arithmetic floor)", fontsize=9)
  common.save_figure(fig, out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", action="append", required=True,
                      help="a folder of run directories (repeatable)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  draw(load_runs([Path(r) for r in args.root]), args.out)


if __name__ == "__main__":
  main()
