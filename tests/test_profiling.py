"""sleep_lm.common.profiling on a real (CPU) trace: parsing works, a CPU run has no device
events."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from sleep_lm.common import profiling


def test_cpu_trace_has_no_device_rows(tmp_path):
  f = jax.jit(lambda x: jnp.sin(x @ x).sum())
  x = jnp.ones((64, 64))
  table = profiling.device_time_table(lambda: f(x), calls=2, log_dir=str(tmp_path))
  assert list(tmp_path.rglob("*.xplane.pb")), "the trace was not written"
  assert table == {"total_ms_per_call": 0.0, "rows": [], "groups": {
      "copies": {"ms_per_call": 0.0, "count_per_call": 0.0, "share": 0.0}}}
  assert "no device events" in profiling.format_table(table)


def test_bad_calls_and_missing_trace(tmp_path):
  with pytest.raises(ValueError, match="calls must be >= 1"):
    profiling.device_time_table(lambda: None, calls=0, log_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb"):
    profiling.device_events(profiling._latest_xplane(str(tmp_path)))


def test_format_table_rows():
  table = {"total_ms_per_call": 2.0, "rows": [
      {"name": "kernel_a", "ms_per_call": 1.5, "count_per_call": 2.0, "share": 0.75},
      {"name": "x" * 100, "ms_per_call": 0.5, "count_per_call": 1.0, "share": 0.25}]}
  text = profiling.format_table(table, width=20)
  assert "2.000 ms" in text and "kernel_a" in text and "75.0%" in text
  assert "x" * 17 + "..." in text and "x" * 21 not in text


def test_copy_group_sums_the_copy_kernels():
  assert all(re.search(profiling.COPY_KERNELS, n) for n in (
      "memcpy128", "MemcpyD2D", "copy.12", "loop_copy_fusion", "input_transpose_fusion_3"))
  assert not any(re.search(profiling.COPY_KERNELS, n) for n in (
      "gemm_fusion_dot_1", "_intra_fwd_kernel", "loop_add_fusion"))


def test_family_table_counts_each_kernel_in_its_first_match():
  table = {"rows": [
      {"name": "gemm_copy_fusion", "ms_per_call": 2.0, "count_per_call": 1.0, "share": 0.5},
      {"name": "memcpy", "ms_per_call": 1.0, "count_per_call": 3.0, "share": 0.25},
      {"name": "mystery", "ms_per_call": 1.0, "count_per_call": 1.0, "share": 0.25}]}
  fams = profiling.family_table(table, [("gemm", "gemm"), ("copies", profiling.COPY_KERNELS)])
  assert list(fams) == ["gemm", "copies", "other"]
  assert [f["ms_per_call"] for f in fams.values()] == [2.0, 1.0, 1.0]
  assert [f["count_per_call"] for f in fams.values()] == [1.0, 3.0, 1.0]
  text = profiling.format_families(fams)
  assert "50.0%" in text and "other" in text
