"""The inference benchmark's --quick mode runs end to end and writes its JSON and plot; with
--throughput_contexts, throughput and prefill only where asked, latency everywhere; its random
cache fill works in place."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from experiments import inference_latency


def test_quick_benchmark_writes_json_and_plot(tmp_path):
  result = inference_latency.main(["--quick", "--out", str(tmp_path), "--prefill",
                                   "hard,attention", "--throughput_contexts", "256"])
  saved = json.loads((tmp_path / "inference_latency.json").read_text())
  assert saved["quick"] and saved["contexts"] == [64, 256]
  assert (tmp_path / "inference_latency.png").stat().st_size > 10_000
  tiny = result["sizes"]["tiny"]
  hybrid = tiny["hybrid"]["N1_hard"]
  assert [p["context"] for p in hybrid["points"]] == [64, 256]
  for p in hybrid["points"]:
    assert p["calls"] == 3 and p["median_ms"] > 0 and p["single_token"]["calls"] == 3
  short, long = hybrid["points"]
  assert "throughput" not in short and "prefill" not in short
  assert long["throughput"]["tokens_per_s"] > 0 and long["prefill"]["tokens_per_s"] > 0
  assert hybrid["sleep"]["median_ms"] > 0 and hybrid["amortized_sleep_ms_per_token"] > 0
  attention = tiny["attention"]["xla"]
  assert all(p["median_ms"] > 0 for p in attention["points"])
  short, long = attention["points"]
  assert "throughput" not in short and "prefill" not in short
  assert long["max_batch"] == 1 and long["throughput"]["tokens_per_s"] > 0
  assert long["prefill"]["tokens_per_s"] > 0
  cache = [p["state_bytes"] for p in attention["points"]]
  assert cache[1] > cache[0] > hybrid["state_bytes"]     # the full cache grows with the context
  assert set(tiny["comparison"]) == {"N1_hard"}
  assert "crossover" in tiny["comparison"]["N1_hard"]["xla"]


def test_throughput_contexts_outside_the_contexts_are_refused(tmp_path, capsys):
  with pytest.raises(SystemExit):
    inference_latency.main(["--quick", "--out", str(tmp_path), "--throughput_contexts", "999"])
  assert "--throughput_contexts: [999] not in --contexts" in capsys.readouterr().err


def test_the_random_fill_writes_over_its_input():
  """The benchmark fills caches of up to 115 GB in place: each leaf's fill must reuse (and so
  free) the leaf's buffer, or the old and new caches are alive together."""
  x = jnp.zeros((4, 64, 8, 32), jnp.bfloat16)
  pointer = x.unsafe_buffer_pointer()
  y = inference_latency._random_leaf(x, jax.random.key(0))
  assert x.is_deleted() and y.unsafe_buffer_pointer() == pointer
  assert y.shape == x.shape and y.dtype == x.dtype and float(jnp.std(y.astype(jnp.float32))) > 0.05
