r"""Draw the Rule 110 figures from the runs' metrics.jsonl files.

  python -m experiments.plot_rule110 fig2a --root runs/fig2a --out docs/figures/rule110_fig2a.png
  python -m experiments.plot_rule110 fig2b --root runs/fig2b --out docs/figures/rule110_fig2b.png

fig2a: final held-out exact accuracy of every run against t (one line per N).
fig2b: held-out exact accuracy against training tokens, one curve per N.
Each run directory's config.json gives its N, t, batch size and sequence length.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sleep_lm.data import rule110  # noqa: E402

CHANCE = 1 / 16


def load_runs(root: Path) -> list[dict]:
  runs = []
  for metrics in sorted(root.glob("*/metrics.jsonl")):
    config = json.loads((metrics.parent / "config.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
      continue
    runs.append({"name": metrics.parent.name, "N": config["model"]["passes"],
                 "t": config["task"]["t"],
                 "tokens_per_step": config["batch_size"] * rule110.SEQ_LEN,
                 "evals": evals})
  if not runs:
    raise SystemExit(f"no run with eval records under {root}")
  return runs


def fig2a(runs, ax):
  by_n = defaultdict(list)
  for r in runs:
    by_n[r["N"]].append((r["t"], r["evals"][-1]["exact_accuracy"]))
  for n, points in sorted(by_n.items()):
    ts, accs = zip(*sorted(points), strict=True)
    ax.plot(ts, accs, "o-", label=f"N = {n}")
  ax.axhline(CHANCE, color="grey", ls="--", lw=1, label="chance (1/16)")
  ax.set_xlabel("automaton steps t")
  ax.set_ylabel("held-out exact accuracy")
  steps = runs[0]["evals"][-1]["step"]
  ax.set_title(f"Rule 110, L = 24: accuracy vs depth "
               f"({steps * runs[0]['tokens_per_step'] / 1e6:.0f}M tokens per run)")


def fig2b(runs, ax):
  for r in sorted(runs, key=lambda r: r["N"]):
    tokens = [e["step"] * r["tokens_per_step"] / 1e6 for e in r["evals"]]
    ax.plot(tokens, [e["exact_accuracy"] for e in r["evals"]], "o-", ms=3,
            label=f"N = {r['N']} (t = {r['t']})")
  ax.axhline(CHANCE, color="grey", ls="--", lw=1, label="chance (1/16)")
  ax.set_xlabel("training tokens (M)")
  ax.set_ylabel("held-out exact accuracy")
  ax.set_title(f"Rule 110, t = {runs[0]['t']}, L = 24: sleeping longer")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("figure", choices=("fig2a", "fig2b"))
  parser.add_argument("--root", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  runs = load_runs(Path(args.root))
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  (fig2a if args.figure == "fig2a" else fig2b)(runs, ax)
  # fig2b's differences are a few points: let its axis fit the data.
  ax.set_ylim(0, 1.02 if args.figure == "fig2a" else None)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
