r"""Depo's Fig. 3 from the runs' metrics.jsonl, and the pilot's recipe selection.

  python -m experiments.plot_depo --root runs/depo --out docs/figures/depo_fig3.png
  python -m experiments.plot_depo --select --root runs/depo_pilot

Figure: one column per k in {1, 2, 4, 8, 16} (held-out sets, n = 75). Row 1: the masked test
loss (cross-entropy at the answer token, one per query: the paper's quantity) against training
steps; row 2: exact match per query against steps; row 3: the same against training compute
(model FLOPs per seed, `experiments.throughput.model_flops_per_step`). One curve per run (mean
over seeds, band = min..max), with the names-only guesser (log 74 nats, 1/74) and the
majority-answer floor of each set. `--root` repeats. The table after it gives, per run and set
(the held-out k sets and "train_law"), the last evaluation: loss (mean, sd over seeds), query
accuracy (mean and per seed), the floors, tokens and PFLOP per seed.

Runs of the old format (before issue 21: `config.task.train_num_nodes`) are drawn too, marked
"old format"; their losses are per answer token of 1-2-token names, not comparable.

--select: the pilot's rule, which reads the validation sets only (val_k1, val_k2, val_k4: a
split of the graphs disjoint from every held-out set), never the held-out ones:
  1. Candidates: runs at N = 1 whose last evaluation is at their planned steps (a stopped run is
     listed, not chosen). Per candidate, each validation set's query accuracy p and loss at that
     last evaluation, averaged over seeds; Q = examples x 10 queries per set.
  2. A run leaves the floor at k when p > f + 3 sqrt(f (1 - f) / Q), f = the larger of the set's
     majority-answer floor and the names-only guesser's 1/74.
  3. The criterion is val_k2 accuracy if some candidate leaves the floor at k = 2, else val_k1
     accuracy (if none leaves it at k = 1 either, it says so: the pilot found no recipe).
  4. The winner has the highest criterion; candidates within 2 standard errors of the best
     (sqrt(p1 (1 - p1) / Q + p2 (1 - p2) / Q)) are tied, and a tie goes to the lowest mean
     validation loss over k = 1, 2, 4.
It prints the table, the rule's steps and the line to put in experiments/depo.py.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import common  # noqa: E402
from experiments import depo as depo_config  # noqa: E402
from experiments.throughput import model_flops_per_step  # noqa: E402
from sleep_lm.tasks import depo  # noqa: E402
from sleep_lm.training import workdir  # noqa: E402
from sleep_lm.training.run_config import RunConfig  # noqa: E402

HELD_OUT = tuple(f"k{k}" for k in depo.EVAL_HOPS)
VALID = tuple(f"val_k{k}" for k in depo.VALID_HOPS)


def recipe_name(config) -> str:
  """The name in experiments/depo.py's RECIPES whose fields the config has, else its fields."""
  flat = {"task.node_law": config.task.node_law, "task.full_share": config.task.full_share,
          "task.hop_law": config.task.hop_law, "task.wrap": config.task.wrap,
          "optimizer.gate_lr": config.optimizer.get("gate_lr")}
  for name, fields in depo_config.RECIPES.items():
    if all(flat[k] == v for k, v in fields.items()):
      return name
  return (f"{config.task.node_law} nodes, full {config.task.full_share}, {config.task.hop_law}"
          f" hops{', wrap' if config.task.wrap else ''}, gate lr {flat['optimizer.gate_lr']}")


def load_runs(roots: list[Path]) -> list[dict]:
  runs = []
  for root in roots:
    for path in sorted(root.glob("*/metrics.jsonl")):
      evals = [r for r in workdir.read_records(path) if r["kind"] == "eval"]
      if not evals:
        continue
      config = workdir.load_config(path.parent)
      old = "train_num_nodes" in config.task
      if old:   # FLOPs depend on the model and the length only (vocabulary 118 then, 120 now)
        config.task = {"name": "depo", "seed": config.task.seed}
      run = RunConfig.from_config(config)
      size = f"{len(run.model.layers)}L d{run.model.d_model}"
      recipe = "old format" if old else recipe_name(config)
      runs.append({
          "name": path.parent.name, "N": run.model.passes, "steps": run.steps,
          "recipe": recipe, "old": old, "tokens_per_step": run.batch_size * run.task.seq_len,
          "flops_per_step": model_flops_per_step(run), "evals": evals,
          "label": f"{size}, N = {run.model.passes}, {recipe}, "
                   + common.steps_label(evals[-1]["step"], run.steps)})
  if not runs:
    raise SystemExit(f"no run with eval records under {[str(r) for r in roots]}")
  return sorted(runs, key=lambda r: (r["label"].split(",")[0], r["N"], r["label"]))


def by_step(evals: list[dict], name: str) -> dict[int, list[dict]]:
  out = defaultdict(list)
  for e in evals:
    if e["set"] == name:
      out[e["step"]].append(e)
  return dict(sorted(out.items()))


def last(run: dict, name: str) -> tuple[int, list[dict]] | None:
  steps = by_step(run["evals"], name)
  return list(steps.items())[-1] if steps else None


def _mean(records, key):
  return float(np.mean([r[key] for r in records]))


def select(runs: list[dict]) -> tuple[dict | None, list[str]]:
  """The pilot's rule (module docstring) on the validation sets: (winner or None, the lines
  that explain it)."""
  rows, notes = [], []
  for r in runs:
    finals = {name: last(r, name) for name in VALID}
    if any(v is None for v in finals.values()):
      notes.append(f"{r['label']}: no validation records (old format?), not a candidate")
      continue
    step = min(s for s, _ in finals.values())
    if r["N"] != 1 or step < r["steps"]:
      why = f"N = {r['N']}" if r["N"] != 1 else f"stopped at {step} of {r['steps']} steps"
      notes.append(f"{r['label']}: {why}, not a candidate")
      continue
    row = {"run": r, "step": step}
    for name, (_, recs) in finals.items():
      q = recs[0]["examples"] * depo.NUM_QUERIES
      p = _mean(recs, "query_accuracy")
      f = max(recs[0]["floor_answer"], recs[0]["chance_answer"])
      row[name] = {"p": p, "q": q, "loss": _mean(recs, "loss"), "floor": f,
                   "left": p > f + 3 * math.sqrt(f * (1 - f) / q)}
    row["val_loss"] = float(np.mean([row[n]["loss"] for n in VALID]))
    rows.append(row)
  if not rows:
    return None, notes + ["no candidate run: nothing to select"]
  key = "val_k2" if any(r["val_k2"]["left"] for r in rows) else "val_k1"
  notes.append(f"criterion: {key} query accuracy ("
               + ("a candidate left the floor at k = 2)" if key == "val_k2" else
                  "no candidate left the floor at k = 2)"))
  if key == "val_k1" and not any(r["val_k1"]["left"] for r in rows):
    notes.append("WARNING: no candidate left the floor at k = 1 either; the pilot found no "
                 "recipe that learns recall across eviction")
  best = max(rows, key=lambda r: r[key]["p"])

  def se_diff(a, b):
    return math.sqrt(a["p"] * (1 - a["p"]) / a["q"] + b["p"] * (1 - b["p"]) / b["q"])

  tied = [r for r in rows if best[key]["p"] - r[key]["p"] <= 2 * se_diff(best[key], r[key])]
  winner = min(tied, key=lambda r: r["val_loss"])
  if len(tied) > 1:
    notes.append(f"tied within 2 standard errors: {[r['run']['recipe'] for r in tied]}; the "
                 "lowest mean validation loss wins")
  notes.append("")
  header = f"{'recipe':<24}{'step':>6}" + "".join(f"{n:>16}" for n in VALID) + f"{'val loss':>10}"
  notes.append(header + "   (query accuracy / floor, * = left the floor)")
  for r in rows:
    cells = "".join(f"{r[n]['p']:>8.4f}/{r[n]['floor']:.4f}{'*' if r[n]['left'] else ' '}"
                    .rjust(16) for n in VALID)
    notes.append(f"{r['run']['recipe']:<24}{r['step']:>6}{cells}{r['val_loss']:>10.4f}")
  return winner["run"], notes


def draw(runs: list[dict], out: str) -> None:
  fig, axes = plt.subplots(3, len(HELD_OUT), figsize=(3.3 * len(HELD_OUT), 9.0), dpi=120)
  print(f"{'run':<58}{'set':>10}{'tokens':>8}{'PFLOP':>8}{'loss':>7}{'sd':>6}{'query acc':>10}"
        f"{'floor':>7}{'names':>7}  query acc per seed")
  floors: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
  for r in runs:
    for col, name in enumerate(HELD_OUT):
      steps = by_step(r["evals"], name)
      if not steps:
        continue
      xs = np.array(list(steps))
      panels = ((0, "loss", 1.0), (1, "query_accuracy", 1.0),
                (2, "query_accuracy", r["flops_per_step"] / 1e15))
      for row, key, scale in panels:
        vals = [[e[key] for e in rs] for rs in steps.values()]
        (line,) = axes[row, col].plot(xs * scale, [np.mean(v) for v in vals], "o-", ms=2,
                                      label=r["label"])
        axes[row, col].fill_between(xs * scale, [min(v) for v in vals], [max(v) for v in vals],
                                    color=line.get_color(), alpha=0.2, lw=0)
      rs = list(steps.values())[-1]
      floors[name].append((rs[0]["floor_answer"], rs[0].get("chance_loss")))
    for name in (*HELD_OUT, "train_law"):
      final = last(r, name)
      if final is None:
        continue
      step, rs = final
      acc = [e["query_accuracy"] for e in sorted(rs, key=lambda e: e["seed"])]
      print(f"{r['label']:<58}{name:>10}{step * r['tokens_per_step'] / 1e6:>7.0f}M"
            f"{step * r['flops_per_step'] / 1e15:>8.1f}{_mean(rs, 'loss'):>7.3f}"
            f"{np.std([e['loss'] for e in rs]):>6.3f}{np.mean(acc):>10.4f}"
            f"{rs[0]['floor_answer']:>7.4f}{rs[0]['chance_answer']:>7.4f}  "
            + " ".join(f"{a:.4f}" for a in acc))
  print("loss: nats at the answer token (one per query); floor: majority answer per query, "
        "measured on the set; names: a guesser that knows the graph's names, not its edges: "
        f"1/(n-1), loss log(n-1) = {math.log(depo.MAX_NODES - 1):.3f} at n = 75")
  for col, name in enumerate(HELD_OUT):
    axes[0, col].set_title(f"k = {name[1:]} hops (n = 75)")
    new_loss = [c for _, c in floors[name] if c is not None]
    if new_loss:
      axes[0, col].axhline(new_loss[0], color="grey", ls=":", lw=1, label="names known, edges not")
    for row in (1, 2):
      axes[row, col].axhline(1 / (depo.MAX_NODES - 1), color="grey", ls=":", lw=1,
                             label="names known, edges not")
      if floors[name]:
        axes[row, col].axhline(max(f for f, _ in floors[name]), color="tab:red", ls="--", lw=1,
                               label="majority-answer floor")
    axes[1, col].set_xlabel("training steps")
    axes[2, col].set_xlabel("training compute (PFLOP, per seed)")
    axes[0, col].set_xlabel("training steps")
    for row in range(3):
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].set_ylabel("held-out loss at the answer (nats)")
  axes[1, 0].set_ylabel("exact match per query")
  axes[2, 0].set_ylabel("exact match per query")
  axes[0, 0].legend(fontsize=6)
  axes[1, 0].legend(fontsize=6)
  fig.suptitle("Depo k-hop retrieval, L = 75: the graph is evicted before the queries "
               "(band: min-max over seeds)")
  common.save_figure(fig, out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, action="append", help="repeatable")
  parser.add_argument("--out", help="the figure's path (not with --select)")
  parser.add_argument("--select", action="store_true",
                      help="print the pilot's winner by the validation-only rule")
  args = parser.parse_args()
  if args.select == bool(args.out):
    parser.error("give exactly one of --out and --select")
  runs = load_runs([Path(r) for r in args.root])
  if args.select:
    winner, notes = select(runs)
    print("\n".join(notes))
    if winner is None:
      raise SystemExit(1)
    print(f"\nwinner: {winner['recipe']} ({winner['name']})\n"
          f"set in experiments/depo.py: FIG3_RECIPE = \"{winner['recipe']}\"")
    return
  draw(runs, args.out)


if __name__ == "__main__":
  main()
