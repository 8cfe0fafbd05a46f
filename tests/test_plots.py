"""The figure commands of docs/results.md redraw from the committed metrics and say which runs
stopped early."""

from pathlib import Path

from experiments import plot_depo, plot_rule110

RUNS = Path(__file__).resolve().parents[1] / "docs" / "results_runs"


def test_fig2b_marks_a_run_that_stopped_before_its_planned_steps(tmp_path, capsys, monkeypatch):
  out = tmp_path / "fig2b_t32.png"
  monkeypatch.setattr("sys.argv", ["plot_rule110", "fig2b", "--root", str(RUNS / "fig2b_t32"),
                                   "--out", str(out)])
  plot_rule110.main()
  printed = capsys.readouterr().out
  assert out.stat().st_size > 10_000
  assert "hybrid N = 3, stopped at 2000 of 2500 steps" in printed
  assert "hybrid N = 4, 2500 steps" in printed


def test_depo_figure_draws_every_run(tmp_path, capsys, monkeypatch):
  out = tmp_path / "depo.png"
  monkeypatch.setattr("sys.argv", ["plot_depo", "--root", str(RUNS / "depo"), "--out", str(out)])
  plot_depo.main()
  printed = capsys.readouterr().out
  assert out.stat().st_size > 10_000
  for n in (1, 2, 4):
    assert printed.count(f"N = {n}, 5000 steps") == 5    # one line per k
  assert "stopped" not in printed


def test_fig2b_draws_runs_from_several_roots(tmp_path, capsys, monkeypatch):
  out = tmp_path / "fig2b_t16.png"
  monkeypatch.setattr("sys.argv", ["plot_rule110", "fig2b", "--root", str(RUNS / "fig2b_t16"),
                                   "--root", str(RUNS / "fig2b_t16_long"), "--out", str(out)])
  plot_rule110.main()
  printed = capsys.readouterr().out
  assert "hybrid N = 4, 2500 steps" in printed and "hybrid N = 4, 5700 steps" in printed
  assert "hybrid N = 1, 8500 steps" in printed
