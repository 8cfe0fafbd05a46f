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
