"""experiments/throughput.py on the CPU: a row's compile time splits into its stages, and the
profile's kernel families match the kernels they name (real names from our GPU traces)."""

from __future__ import annotations

import gzip
import json
import sys

from experiments import throughput
from sleep_lm.common import kernel_plan, profiling


def test_a_row_times_trace_lower_and_compile_apart(tmp_path, monkeypatch):
  out = tmp_path / "tp.json"
  monkeypatch.setattr(sys, "argv", [
      "throughput", "--config", "experiments/rule110.py:smoke", "--passes", "1", "--warmup", "1",
      "--iters", "1", "--json", str(out), "--profile-dir", str(tmp_path / "trace")])
  throughput.main()
  (row,) = json.loads(out.read_text())["rows"]
  assert "error" not in row, row.get("error")
  stages = [row["trace_s"], row["lower_s"], row["xla_compile_s"]]
  assert all(s > 0 for s in stages), stages
  assert abs(sum(stages) - row["compile_s"]) < 1e-6 * max(1.0, row["compile_s"])
  assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0
  # A CPU trace has no device plane: the profile is empty but whole, every family present.
  assert list(row["families"]) == [f for f, _ in profiling.STEP_FAMILIES] + ["other"]
  assert row["copy_share"] == 0.0 and row["device_ms_per_step"] == 0.0
  assert row["components"] == {} and row["achieved_bandwidth_by_layer_part"] == {}
  # The model parts come from the step compiled without command buffers, traced apart; that
  # program is kept beside its trace, and the kernel plan reads it.
  assert row["device_ms_per_step_without_command_buffers"] == 0.0
  assert list(row["profile_without_command_buffers"]) == list(row["profile"])
  plain = tmp_path / "trace" / "0" / "without_command_buffers"
  assert list(plain.glob("**/*.xplane.pb"))
  with gzip.open(plain / "module.hlo.txt.gz", "rt") as f:
    module = f.read()
  assert module.startswith("HloModule ") and kernel_plan.launches(module)


def test_step_families_take_each_kernel_once():
  """Real kernel names from our H200 traces land in the family they belong to."""
  want = {
      "_intra_fwd_kernel": "fast-weight op (Pallas)",
      "_qk_grads_kernel__1": "fast-weight op (Pallas)",
      "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT": "matmuls (cuBLAS, XLA gemm fusions)",
      "gemm_fusion_dot_4526": "matmuls (cuBLAS, XLA gemm fusions)",
      "memcpy128": "copies and transposes", "input_transpose_fusion_234": "copies and transposes",
      "input_add_convert_reduce_fusion_44": "reductions (XLA reduce fusions)",
      "loop_multiply_fusion_133": "elementwise (other XLA fusions)",
      "loop_pad_fusion_28": "elementwise (other XLA fusions)",
  }
  rows = [{"name": n, "ms_per_call": 1.0, "count_per_call": 2.0, "share": 1 / len(want)}
          for n in want]
  families = profiling.family_table({"rows": rows}, profiling.STEP_FAMILIES)
  for name, family in want.items():
    alone = profiling.family_table({"rows": [{**rows[0], "name": name}]},
                                   profiling.STEP_FAMILIES)
    assert alone[family]["ms_per_call"] == 1.0, (name, family)
  assert sum(f["ms_per_call"] for f in families.values()) == len(want)
  assert abs(sum(f["share"] for f in families.values()) - 1) < 1e-12
