"""`experiments/scaling.py --report`: rows measured by separate invocations join into one table."""

import json

import pytest

from experiments import scaling


def _row(mesh, devices, tokens_per_s, kind="H200"):
  return {"mesh": mesh, "devices": devices, "device_kind": kind, "global_batch": 64 * devices,
          "ms_per_step": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "tokens_per_s": tokens_per_s,
          "xla_bytes_per_device": None, "peak_bytes_in_use": None}


def _write(path, rows, per_device_batch=64):
  path.write_text(json.dumps({"config": "c", "per_device_batch": per_device_batch,
                              "global_batch": None, "rows": rows}))
  return str(path)


def test_report_takes_efficiency_against_the_one_device_row(tmp_path, capsys):
  two = _write(tmp_path / "two.json", [_row("data=2", 2, 180.0)])
  one = _write(tmp_path / "one.json", [_row("data=1", 1, 100.0)])
  other = _write(tmp_path / "other.json", [_row("data=4", 4, 380.0, kind="H100")])
  out = tmp_path / "all.json"
  scaling.main(["--report", two, one, other, "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["mesh"] for r in rows] == ["data=1", "data=2", "data=4"]
  assert rows[0]["efficiency"] == pytest.approx(1.0)
  assert rows[1]["efficiency"] == pytest.approx(0.9)
  assert "efficiency" not in rows[2] and "H100" in rows[2]["efficiency_error"]
  assert "90.0%" in capsys.readouterr().out


def test_report_refuses_files_of_different_batches(tmp_path):
  one = _write(tmp_path / "one.json", [_row("data=1", 1, 100.0)])
  two = _write(tmp_path / "two.json", [_row("data=2", 2, 180.0)], per_device_batch=32)
  with pytest.raises(SystemExit, match="per_device_batch"):
    scaling.main(["--report", one, two])
  with pytest.raises(SystemExit, match="no measured 1-device row"):
    scaling.main(["--report", two])
  with pytest.raises(SystemExit, match="no such file: .*absent.json"):
    scaling.main(["--report", one, str(tmp_path / "absent.json")])
