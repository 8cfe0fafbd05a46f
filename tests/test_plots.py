"""The figure commands of docs/results.md redraw from the committed metrics and say which runs
stopped early."""

from pathlib import Path

from experiments import plot_depo, plot_rule110

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
  printed = _draw(plot_depo, ["--root", str(RUNS / "depo")], tmp_path, capsys, monkeypatch)
  for n in (1, 2, 4):
    assert printed.count(f"N = {n}, 5000 steps") == 5    # one line per k
  assert "stopped" not in printed


def test_gsm_figure_draws_every_run_with_its_floors(tmp_path, capsys, monkeypatch):
  """Two workdirs (the configs of the smoke sweep, metrics written here) -> one panel each and
  a table row per run and op set with the floors."""
  import json

  from experiments import gsm_symbolic, plot_gsm
  from sleep_lm import workdir

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
  assert "0.150  0.050  0.100 0.200" in printed and "0.390" in printed
