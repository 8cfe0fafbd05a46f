r"""Draw Depo's Fig. 3 from the runs' metrics.jsonl: held-out loss per hop count k, per N.

  python -m experiments.plot_depo --root docs/results_runs/depo --out docs/figures/depo_fig3.png

One panel per k in {1, 2, 4, 8, 16}: the masked test loss on the answer tokens (the paper's
quantity) against training tokens, one curve per run (mean over seeds, band = min..max), with the
loss of a guesser that knows the node names but not the edges (log 74 per query, spread over its
answer tokens). A second row shows exact match per query. Prints the final numbers.
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
from sleep_lm import workdir  # noqa: E402
from sleep_lm.run_config import RunConfig  # noqa: E402
from sleep_lm.tasks import depo  # noqa: E402


def load_runs(root: Path) -> list[dict]:
  runs = []
  for path in sorted(root.glob("*/metrics.jsonl")):
    run = RunConfig.from_config(workdir.load_config(path.parent))
    evals = [r for r in workdir.read_records(path) if r["kind"] == "eval"]
    if evals:
      runs.append({"N": run.model.passes, "tokens_per_step": run.batch_size * run.task.seq_len,
                   "evals": evals,
                   "label": f"N = {run.model.passes}, "
                            + common.steps_label(evals[-1]["step"], run.steps)})
  if not runs:
    raise SystemExit(f"no run with eval records under {root}")
  return sorted(runs, key=lambda r: r["N"])


def guess_loss(size: int = 1024) -> float:
  """Loss per answer token of a guesser uniform over the 74 other nodes (`depo.chance_floor`
  on eval-like examples: log 74 per query, spread over its 1-2 answer tokens)."""
  batch = depo.DepoTask(split="eval", hops=1, num_nodes=depo.MAX_NODES).batch(np.arange(size))
  return depo.chance_floor(batch)["loss"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  runs = load_runs(Path(args.root))
  floor_loss = guess_loss()
  sets = [f"k{k}" for k in depo.EVAL_HOPS]
  fig, axes = plt.subplots(2, len(sets), figsize=(3.2 * len(sets), 6.0), dpi=120, sharex=True)
  print(f"{'run':<40}{'set':>5}{'tokens':>9}{'loss':>8}{'sd':>7}{'query acc':>10}{'floor':>8}"
        "  query acc per seed")
  for r in runs:
    for col, name in enumerate(sets):
      by_step = defaultdict(list)
      for e in r["evals"]:
        if e["set"] == name:
          by_step[e["step"]].append(e)
      steps = sorted(by_step)
      x = np.array(steps) * r["tokens_per_step"] / 1e6
      for row, key in enumerate(("loss", "query_accuracy")):
        vals = [[e[key] for e in by_step[s]] for s in steps]
        mean = np.array([np.mean(v) for v in vals])
        (line,) = axes[row, col].plot(x, mean, "o-", ms=2, label=r["label"])
        axes[row, col].fill_between(x, [min(v) for v in vals], [max(v) for v in vals],
                                    color=line.get_color(), alpha=0.2, lw=0)
      last = by_step[steps[-1]]
      print(f"{r['label']:<40}{name:>5}{x[-1]:>8.0f}M{np.mean([e['loss'] for e in last]):>8.3f}"
            f"{np.std([e['loss'] for e in last]):>7.3f}"
            f"{np.mean([e['query_accuracy'] for e in last]):>10.4f}"
            f"{last[0]['floor_answer']:>8.4f}  "
            + " ".join(f"{e['query_accuracy']:.4f}" for e in sorted(last, key=lambda e: e["seed"])))
  for col, name in enumerate(sets):
    axes[0, col].set_title(f"k = {name[1:]} hops")
    axes[0, col].axhline(floor_loss, color="grey", ls=":", lw=1,
                         label="names known, edges not")
    axes[1, col].axhline(1 / (depo.MAX_NODES - 1), color="grey", ls=":", lw=1, label="chance")
    axes[1, col].set_xlabel("training tokens (M, per seed)")
    for row in (0, 1):
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].set_ylabel("held-out loss per answer token")
  axes[1, 0].set_ylabel("exact match per query")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Depo k-hop retrieval, L = 75: the graph is evicted before the queries "
               "(band: min-max over seeds)")
  common.save_figure(fig, args.out)


if __name__ == "__main__":
  main()
