"""experiments/throughput.py on the CPU: a row's compile time splits into its stages, and the
profile's kernel families match the kernels they name (real names from our GPU traces)."""

from __future__ import annotations

import json
import re
import sys

from experiments import throughput


def test_a_row_times_trace_lower_and_compile_apart(tmp_path, monkeypatch):
  out = tmp_path / "tp.json"
  monkeypatch.setattr(sys, "argv", [
      "throughput", "--config", "experiments/rule110.py:smoke", "--passes", "1", "--warmup", "1",
      "--iters", "1", "--json", str(out)])
  throughput.main()
  (row,) = json.loads(out.read_text())["rows"]
  assert "error" not in row, row.get("error")
  stages = [row["trace_s"], row["lower_s"], row["xla_compile_s"]]
  assert all(s > 0 for s in stages), stages
  assert abs(sum(stages) - row["compile_s"]) < 1e-6 * max(1.0, row["compile_s"])
  assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0


def test_step_groups_match_their_kernels():
  names = {
      "fast-weight op (Pallas)": ["_intra_fwd_kernel", "_state_bwd_kernel", "_qk_grads_kernel",
                                  "_wy_grads_kernel", "_state_fwd_kernel"],
      "matmuls (cuBLAS, XLA gemm fusions)": ["nvjet_tst_128x64_64x8_1x2_h_bz_TNT",
                                             "gemm_fusion_dot_12", "triton_gemm_dot_3"],
      "copies": ["memcpy128", "input_transpose_fusion_3"],
  }
  elementwise = ["loop_add_fusion", "input_reduce_fusion_4", "loop_multiply_fusion_2"]
  for group, pattern in throughput.STEP_GROUPS.items():
    for family, members in names.items():
      for n in members:
        assert bool(re.search(pattern, n)) == (group == family), (group, n)
    assert not any(re.search(pattern, n) for n in elementwise), group
