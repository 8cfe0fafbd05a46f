r"""Draw the Rule 110 figures from the runs' metrics.jsonl and config.json files.

  python -m experiments.plot_rule110 fig2a --root docs/results_runs/fig2a \
      --out docs/figures/rule110_fig2a.png
  python -m experiments.plot_rule110 fig2b --root docs/results_runs/fig2b_t12 \
      --out docs/figures/rule110_fig2b_t12.png

fig2a: final held-out exact accuracy against t (mean over seeds, each seed a dot), with the
  majority-answer floor of each eval set and chance.
fig2b: held-out exact accuracy against training tokens (left) and training FLOPs (right), one
  curve per run (mean over seeds, band = min..max over seeds), with the floor.
Each run directory's config.json says what it is (N, layers, eviction, t); every run directory
under --root (one level, or two for roots of roots) is drawn. Prints the table it plots.
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
from experiments.throughput import model_flops_per_step  # noqa: E402
from sleep_lm.training import workdir  # noqa: E402
from sleep_lm.training.run_config import RunConfig  # noqa: E402


def describe(config) -> str:
  m = config["model"]
  layers = m["layers"]
  if "gdn" not in layers:
    kind = "attention only, " + ("full cache" if m["eviction"] == "none" else "hard eviction")
    return f"{kind} ({len(layers)} layers)"
  label = f"hybrid N = {m['passes']}"
  if len(layers) != 4:
    label += f", {len(layers)} layers"
  if m["eviction"] != "hard":
    label += f", {m['eviction']}"
  return label


def load_runs(roots: list[Path]) -> list[dict]:
  runs = []
  for root in roots:
    for path in sorted(root.glob("**/metrics.jsonl")):
      directory = path.parent
      config = workdir.load_config(directory)
      evals = [r for r in workdir.read_records(path) if r["kind"] == "eval"]
      if not evals:
        continue
      run = RunConfig.from_config(config)
      label = describe(config.to_dict()) + ", " + common.steps_label(evals[-1]["step"], run.steps)
      runs.append({"name": directory.name, "label": label,
                   "N": run.model.passes, "t": run.task.t,
                   "tokens_per_step": run.batch_size * run.task.seq_len,
                   "flops_per_step": model_flops_per_step(run), "evals": evals})
  if not runs:
    raise SystemExit(f"no run with eval records under {roots}")
  return runs


def by_step(evals: list[dict]) -> dict[int, list[dict]]:
  out = defaultdict(list)
  for r in evals:
    out[r["step"]].append(r)
  return dict(sorted(out.items()))


def fig2a(runs, axes):
  (ax,) = axes
  points = defaultdict(list)
  floors, chance = {}, None
  print(f"{'t':>4}{'seeds':>6}{'mean':>8}{'sd':>8}{'min':>8}{'max':>8}{'floor':>8}  tokens")
  for r in sorted(runs, key=lambda r: r["t"]):
    last = by_step(r["evals"])
    step, rs = list(last.items())[-1]
    acc = [e["exact_accuracy"] for e in rs]
    points[r["label"]].append((r["t"], acc))
    floors[r["t"]] = rs[0]["floor_exact"]
    chance = rs[0]["chance_exact"]
    sd = np.std(acc, ddof=min(1, len(acc) - 1))
    print(f"{r['t']:>4}{len(acc):>6}{np.mean(acc):>8.4f}{sd:>8.4f}"
          f"{min(acc):>8.4f}{max(acc):>8.4f}{floors[r['t']]:>8.4f}  "
          f"{step * r['tokens_per_step'] / 1e6:.0f}M")
  for label, pts in points.items():
    ts = [t for t, _ in pts]
    ax.plot(ts, [np.mean(a) for _, a in pts], "o-", label=f"{label} (mean)")
    for t, a in pts:
      ax.scatter([t] * len(a), a, s=10, color="k", alpha=0.5, zorder=3)
  ts = sorted(floors)
  ax.plot(ts, [floors[t] for t in ts], "s--", color="tab:red", ms=4,
          label="majority-answer floor")
  ax.axhline(chance, color="grey", ls=":", lw=1, label="chance (1/16)")
  ax.set_xlabel("automaton steps t")
  ax.set_ylabel("held-out exact accuracy")
  step = by_step(runs[0]["evals"])
  tokens = list(step)[-1] * runs[0]["tokens_per_step"]
  ax.set_title(f"Rule 110, L = 24: accuracy vs depth ({tokens / 1e6:.0f}M tokens per run)")
  ax.set_ylim(0, 1.02)


def fig2b(runs, axes):
  ax_tokens, ax_flops = axes
  order = sorted(runs, key=lambda r: (("attention" in r["label"]), r["N"], r["label"]))
  print(f"{'run':<56}{'seeds':>6}{'tokens':>9}{'PFLOP':>9}{'mean':>8}{'sd':>8}{'floor':>8}")
  floor = None
  for r in order:
    steps = by_step(r["evals"])
    xs = np.array(list(steps))
    acc = [[e["exact_accuracy"] for e in rs] for rs in steps.values()]
    mean = np.array([np.mean(a) for a in acc])
    lo, hi = np.array([min(a) for a in acc]), np.array([max(a) for a in acc])
    for ax, scale in ((ax_tokens, r["tokens_per_step"] / 1e6),
                      (ax_flops, r["flops_per_step"] / 1e15)):
      (line,) = ax.plot(xs * scale, mean, "o-", ms=2, label=r["label"])
      ax.fill_between(xs * scale, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    floor = list(steps.values())[-1][0]["floor_exact"]
    a = acc[-1]
    print(f"{r['label']:<56}{len(a):>6}{xs[-1] * r['tokens_per_step'] / 1e6:>8.0f}M"
          f"{xs[-1] * r['flops_per_step'] / 1e15:>9.1f}{np.mean(a):>8.4f}"
          f"{np.std(a, ddof=min(1, len(a) - 1)):>8.4f}{floor:>8.4f}")
  for ax in (ax_tokens, ax_flops):
    ax.axhline(floor, color="tab:red", ls="--", lw=1, label="majority-answer floor")
    ax.set_ylabel("held-out exact accuracy")
    ax.set_ylim(0, 1.02)
  ax_tokens.set_xlabel("training tokens (M, per seed)")
  ax_flops.set_xlabel("training compute (PFLOP, per seed)")
  ax_tokens.set_title(f"Rule 110, t = {runs[0]['t']}, L = 24 (band: min-max over seeds)")
  ax_flops.set_title("the same against compute")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("figure", choices=("fig2a", "fig2b"))
  parser.add_argument("--root", required=True, action="append", help="repeatable")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  runs = load_runs([Path(r) for r in args.root])
  panels = 1 if args.figure == "fig2a" else 2
  fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), dpi=120, squeeze=False)
  (fig2a if args.figure == "fig2a" else fig2b)(runs, axes[0])
  for ax in axes[0]:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  common.save_figure(fig, args.out)


if __name__ == "__main__":
  main()
