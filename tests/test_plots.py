"""The figure commands of docs/results.md redraw from the committed metrics and say which runs
stopped early."""

from pathlib import Path

import pytest

from experiments import depo as depo_config
from experiments import plot_depo, plot_rule110
from sleep_lm.training import trainer
from sleep_lm.training.run_config import RunConfig

RUNS = Path(__file__).resolve().parents[1] / "docs" / "results_runs"


def _draw(command, args, tmp_path, capsys, monkeypatch) -> str:
  """Runs a figure command's main() on committed runs; returns what it printed."""
  out = tmp_path / "figure.png"
  monkeypatch.setattr("sys.argv", [command.__name__, *args, "--out", str(out)])
  command.main()
  assert out.stat().st_size > 10_000
  return capsys.readouterr().out


def test_fig2b_marks_a_run_that_stopped_before_its_planned_steps(tmp_path, capsys, monkeypatch):
  printed = _draw(plot_rule110, ["fig2b", "--root", str(RUNS / "fig2b_t32")],
                  tmp_path, capsys, monkeypatch)
  assert "hybrid N = 3, stopped at 2000 of 2500 steps" in printed
  assert "hybrid N = 4, 2500 steps" in printed


def test_fig2b_draws_runs_from_several_roots(tmp_path, capsys, monkeypatch):
  printed = _draw(plot_rule110, ["fig2b", "--root", str(RUNS / "fig2b_t16"),
                                 "--root", str(RUNS / "fig2b_t16_long")],
                  tmp_path, capsys, monkeypatch)
  assert "hybrid N = 4, 2500 steps" in printed and "hybrid N = 4, 5700 steps" in printed
  assert "hybrid N = 1, 8500 steps" in printed


def test_depo_figure_draws_every_run(tmp_path, capsys, monkeypatch):
  root = RUNS / "depo_fig3"
  printed = _draw(plot_depo, ["--root", str(root)], tmp_path, capsys, monkeypatch)
  runs = plot_depo.load_runs([root])
  assert len(runs) == len(list(root.glob("*/metrics.jsonl"))) > 0
  for run in runs:                    # a table line for every held-out k of every run
    lines = [line for line in printed.splitlines() if line.startswith(run["label"])]
    assert [line[len(run["label"]):].split()[0] for line in lines][:5] == [
        "k1", "k2", "k4", "k8", "k16"], lines


def test_committed_pilot_selects_the_configured_recipe():
  """The Fig. 3 recipe in experiments/depo.py is what the rule picks from the committed pilot."""
  winner, _ = plot_depo.select(plot_depo.load_runs([RUNS / "depo_pilot"]))
  assert winner is not None and winner["recipe"] == depo_config.FIG3_RECIPE


def _pilot_run(recipe, val_acc, val_loss=3.0, *, n=1, step=1000, steps=1000, held_out_acc=0.0):
  """A run as `plot_depo.load_runs` gives it: validation records at `step` with query accuracy
  val_acc[k] on val_k1, val_k2, val_k4 (512 examples, floor 0.02), held-out k2 at held_out_acc."""
  evals = [{"step": step, "set": f"val_k{k}", "seed": 0, "examples": 512, "loss": val_loss,
            "query_accuracy": a, "floor_answer": 0.02, "chance_answer": 1 / 74}
           for k, a in zip((1, 2, 4), val_acc, strict=True)]
  evals.append({"step": step, "set": "k2", "seed": 0, "examples": 512, "loss": 1.0,
                "query_accuracy": held_out_acc, "floor_answer": 0.02, "chance_answer": 1 / 74})
  return {"name": recipe, "recipe": recipe, "N": n, "steps": steps, "evals": evals,
          "label": f"N = {n}, {recipe}"}


def test_pilot_selection_reads_only_validation_sets():
  # A run that left the floor at k = 2 (0.06 vs 0.02 + 3 x 0.002) beats a better k = 1 run.
  runs = [_pilot_run("a", (0.30, 0.03, 0.02)), _pilot_run("b", (0.20, 0.06, 0.02)),
          _pilot_run("c", (0.90, 0.01, 0.01), held_out_acc=0.9)]
  winner, notes = plot_depo.select(runs)
  assert winner["recipe"] == "b" and "criterion: val_k2" in notes[0]
  # Nobody off the floor at k = 2: val_k1 decides; the held-out sets are never read.
  runs = [_pilot_run("a", (0.30, 0.02, 0.02), held_out_acc=0.9),
          _pilot_run("b", (0.50, 0.02, 0.02))]
  winner, notes = plot_depo.select(runs)
  assert winner["recipe"] == "b" and "criterion: val_k1" in notes[0]
  # Within 2 standard errors (about 0.02 here): the lower validation loss wins.
  runs = [_pilot_run("a", (0.50, 0.02, 0.02), 2.0), _pilot_run("b", (0.51, 0.02, 0.02), 2.5)]
  assert plot_depo.select(runs)[0]["recipe"] == "a"
  runs = [_pilot_run("a", (0.50, 0.02, 0.02), 2.0), _pilot_run("b", (0.56, 0.02, 0.02), 2.5)]
  assert plot_depo.select(runs)[0]["recipe"] == "b"
  # Only N = 1 runs that reached their planned steps are candidates.
  runs = [_pilot_run("a", (0.3, 0.02, 0.02)), _pilot_run("b", (0.9, 0.02, 0.02), n=4),
          _pilot_run("c", (0.9, 0.02, 0.02), step=500)]
  winner, notes = plot_depo.select(runs)
  assert winner["recipe"] == "a"
  assert any("N = 4, not a candidate" in n for n in notes)
  assert any("stopped at 500 of 1000 steps" in n for n in notes)
  winner, notes = plot_depo.select([_pilot_run("a", (0.02, 0.02, 0.02))])
  assert any(n.startswith("WARNING: no candidate left the floor at k = 1") for n in notes)


@pytest.mark.slow
def test_depo_figure_and_selection_from_a_real_training_run(tmp_path, capsys, monkeypatch):
  """A tiny CPU Depo run (the smoke preset, shortened) writes metrics that both plot_depo modes
  read: the figure with its table, and the pilot's selection of that run's recipe."""
  config = depo_config.get_config("smoke,recipe=mix_harmonic_gates,steps=6")
  config.update(eval_every=6, checkpoint_every=6, log_every=3, eval_size=16, eval_batch_size=16,
                batch_size=4, tensorboard=False, data_dir=str(tmp_path / "data"))
  trainer.train(RunConfig.from_config(config), tmp_path / "runs" / "pilot", log=lambda _: None)
  printed = _draw(plot_depo, ["--root", str(tmp_path / "runs")], tmp_path, capsys, monkeypatch)
  label = "2L d64, N = 1, mix_harmonic_gates, 6 steps"
  assert [line[len(label):].split()[0] for line in printed.splitlines()
          if line.startswith(label)] == ["k1", "k2", "k4", "k8", "k16", "train_law"]
  monkeypatch.setattr("sys.argv", ["plot_depo", "--select", "--root", str(tmp_path / "runs")])
  plot_depo.main()
  assert 'FIG3_RECIPE = "mix_harmonic_gates"' in capsys.readouterr().out


def test_gsm_figure_draws_every_run_with_its_floors(tmp_path, capsys, monkeypatch):
  """Two workdirs (the configs of the smoke sweep, metrics written here) -> one panel each and
  a table row per run and op set with the floors."""
  import json

  from experiments import gsm_symbolic, plot_gsm
  from sleep_lm.training import workdir

  for i, arg in enumerate(("smoke,N=2", "smoke,sliding,N=2,warmup=20")):
    run = tmp_path / "runs" / f"run{i}"
    run.mkdir(parents=True)
    config = gsm_symbolic.get_config(arg)
    config.seeds = 2
    (run / "config.json").write_text(json.dumps(workdir.config_to_dict(config)))
    with (run / "metrics.jsonl").open("w") as f:
      for step in (30, 60):
        for name in ("op1", "op2", "op4"):
          for seed in (0, 1):
            f.write(json.dumps({"step": step, "kind": "eval", "set": name, "seed": seed,
                                "exact_accuracy": 0.1 * seed + step / 600, "floor_exact": 0.0,
                                "floor_root_only": 0.39, "floor_all_derivable": 0.31,
                                "floor_mode": 0.02, "floor_empty": 0.0,
                                "chance_exact": 1 / 3}) + "\n")
  printed = _draw(plot_gsm, ["--root", str(tmp_path / "runs")], tmp_path, capsys, monkeypatch)
  assert printed.count("hybrid N = 2, hard L = 32, 60 steps") == 3
  assert printed.count("hybrid N = 2, sliding L = 16, hard warm-up 20 steps, 60 steps") == 3
  assert "0.150  0.071  0.100 0.200" in printed and "0.390" in printed   # sample sd over seeds
