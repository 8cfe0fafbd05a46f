"""experiments/kernel_benchmark.py on a CPU: a tiny interpreted run of main() and its check."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from experiments import kernel_benchmark


def test_smoke_run_writes_timings(tmp_path, capsys, monkeypatch):
  """Times every implementation and tuning; checks each of them first (here the check's cases
  are cut to one small one, `test_check_in_the_hard_regime` runs the check itself)."""
  checked = []
  real_check = kernel_benchmark.check
  monkeypatch.setattr(kernel_benchmark, "CHECKS", (((1, 20, 1, 16), jnp.float32, False),))
  monkeypatch.setattr(kernel_benchmark, "check",
                      lambda impl, *a, **k: checked.append(impl) or real_check(impl, *a, **k))
  out = tmp_path / "gdr.json"
  kernel_benchmark.main(["--shapes", "smoke_b1_t40_h1_d16", "--impls", "chunked",
                         "--no-fla", "--samples", "1", "--inner", "1",
                         "--variants", "block_k=16,wide_intermediates=1", "--out", str(out)])
  results = json.loads(out.read_text())
  assert [getattr(impl, "name", impl) for impl in checked] == [
      "chunked", "pallas_triton[block_k=16,wide_intermediates=True]"]
  assert max(max(e.values()) for e in results["checks"].values()) < 1e-4, results["checks"]
  row = results["timings"]["smoke_b1_t40_h1_d16"]
  for name in ("chunked", "pallas_triton[block_k=16,wide_intermediates=1]"):
    assert row[name]["fwd_bwd"]["median_ms"] > 0, name
  # jla (an optional dependency) is skipped on a CPU, installed or not, and says why.
  assert "jla" not in row
  assert "skipping jla" in capsys.readouterr().out
  assert row["floors"]["fwd_floor_ms_h200"] > 0


def test_check_in_the_hard_regime():
  errors = kernel_benchmark.check("chunked", (1, 20, 1, 16), jnp.float32,
                                  no_decay_correlated_keys=True)
  assert max(errors.values()) < 1e-4, errors


def test_bad_variant_is_rejected():
  with pytest.raises(SystemExit, match="KEY=INT"):
    kernel_benchmark.parse_variant("no_such_field=1")
  assert kernel_benchmark.parse_variant("wide_intermediates=1").wide_intermediates is True


def test_pure_jax_mosaic_variants_by_name():
  for name in ("pallas_mosaic_gpu[jax_wy]", "pallas_mosaic_gpu[jax_grads]",
               "pallas_mosaic_gpu[jax_wy,jax_grads]"):
    assert kernel_benchmark.implementation_of(name).name == name
  assert kernel_benchmark.implementation_of("pallas_triton") == "pallas_triton"
  for bad in ("pallas_triton[jax_wy]", "pallas_mosaic_gpu[]", "pallas_mosaic_gpu[no_such]",
              "pallas_mosaic_gpu[wy_kernel]"):  # the old opt-in names: now the default
    with pytest.raises(SystemExit, match="impls"):
      kernel_benchmark.implementation_of(bad)


def test_an_implementation_that_fails_is_reported_and_the_rest_timed(tmp_path, monkeypatch,
                                                                        capsys):
  """A kernel that does not compile (here: one that refuses every input) costs its own row only."""
  from kernels.gated_delta_rule import base

  def refuses(*args, **kwargs):
    raise NotImplementedError("refuses every input")
  real = kernel_benchmark.implementation_of
  monkeypatch.setattr(kernel_benchmark, "implementation_of",
                      lambda name: base.Implementation("broken", refuses, "fails")
                      if name == "pallas_mosaic_gpu[jax_wy]" else real(name))
  monkeypatch.setattr(kernel_benchmark, "CHECKS", (((1, 20, 1, 16), jnp.float32, False),))
  out = tmp_path / "gdr.json"
  kernel_benchmark.main(["--shapes", "smoke_b1_t40_h1_d16", "--impls",
                         "pallas_mosaic_gpu[jax_wy]", "chunked", "--no-fla", "--no-jla",
                         "--samples", "1", "--inner", "1", "--out", str(out)])
  results = json.loads(out.read_text())
  assert "refuses every input" in results["failed"]["pallas_mosaic_gpu[jax_wy]"]
  row = results["timings"]["smoke_b1_t40_h1_d16"]
  assert "pallas_mosaic_gpu[jax_wy]" not in row and row["chunked"]["fwd"]["median_ms"] > 0
  assert "failed: NotImplementedError" in capsys.readouterr().out
