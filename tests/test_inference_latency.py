"""The inference latency benchmark's --quick mode runs end to end and writes its JSON and plot."""

from __future__ import annotations

import json

from experiments import inference_latency


def test_quick_benchmark_writes_json_and_plot(tmp_path):
  result = inference_latency.main(["--quick", "--out", str(tmp_path), "--steps", "4"])
  saved = json.loads((tmp_path / "inference_latency.json").read_text())
  assert saved["quick"] and saved["contexts"] == [64, 256]
  assert (tmp_path / "inference_latency.png").stat().st_size > 10_000
  tiny = result["sizes"]["tiny"]
  for name in ("N1", "N2"):
    hybrid = tiny["hybrid"][name]
    assert [p["context"] for p in hybrid["points"]] == [64, 256]
    assert all(p["calls"] == 4 and p["median_ms"] > 0 for p in hybrid["points"])
    assert hybrid["sleep"]["median_ms"] > 0 and hybrid["amortized_sleep_ms_per_token"] > 0
  assert tiny["hybrid"]["N1"]["state_bytes"] < tiny["hybrid"]["N2"]["state_bytes"]  # h buffer
  cache = [p["state_bytes"] for p in tiny["attention"]["xla"]["points"]]
  assert cache[1] > cache[0]                       # the full cache grows with the context
  assert "skipped" in tiny["attention"]["cudnn"]   # CPU
  assert set(tiny["crossover"]) == {"N1", "N2"}
