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
      "copies": {"ms_per_call": 0.0, "count_per_call": 0.0, "share": 0.0}}, "ops": {}}
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
  text = profiling.format_breakdown(fams)
  assert "50.0%" in text and "other" in text


def _gpu_trace(kernels) -> jax.profiler.ProfileData:
  """A GPU device plane in XLA's xplane format, parsed by JAX's own reader: one stream with the
  kernels (name, ms, hlo_op or None) in order."""
  names = {n: i + 1 for i, n in enumerate(dict.fromkeys(n for n, _, _ in kernels))}
  events, at = [], 0
  for name, ms, op in kernels:
    stat = f' stats {{ metadata_id: 1000 str_value: "{op}" }}' if op else ""
    events.append(f"events {{ metadata_id: {names[name]} offset_ps: {at} "
                  f"duration_ps: {int(ms * 1e9)}{stat} }}")
    at += int(ms * 1e9) + 1000
  meta = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }} '
                 for n, i in names.items())
  return jax.profiler.ProfileData.from_text_proto(
      'planes { id: 1 name: "/device:GPU:0" lines { id: 1 name: "Stream #13(Kernel)" '
      f'timestamp_ns: 1 {" ".join(events)} }} {meta}'
      'stat_metadata { key: 1000 value { id: 1000 name: "hlo_op" } } }')


def compiled_gdn_block() -> str:
  """The compiled text of a real module's gradient: a norm and a projection inside layer_0_gdn
  of blocks_0, as sleep_lm names its layers."""
  import flax.linen as nn

  class Gdn(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.RMSNorm(name="out_norm")(nn.Dense(8, name="q_proj")(x))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + Gdn(name="layer_0_gdn")(x)

  x = jnp.ones((4, 8))
  params = Block(name="blocks_0").init(jax.random.key(0), x)
  loss = lambda p: jnp.sum(jnp.sin(Block(name="blocks_0").apply(p, x)))
  return jax.jit(jax.grad(loss)).lower(params).compile().as_text()


def test_kernels_are_charged_to_the_model_code_that_made_them():
  """A real compiled module (`compiled_gdn_block`) and a GPU trace whose kernels name their HLO
  instructions: device time lands on the module and direction of each instruction's op_name; a
  kernel with no hlo_op stays apart."""
  text = compiled_gdn_block()
  names = profiling.hlo_op_names(text)
  parts = {op: profiling.model_component(n) for op, n in names.items() if n is not None}
  norm_fwd = next(op for op, c in parts.items() if c == "gdn/out_norm (forward)")
  norm_bwd = next(op for op, c in parts.items() if c == "gdn/out_norm (backward)")
  events = profiling.device_events(_gpu_trace([
      ("loop_multiply_fusion_1", 2.0, norm_fwd), ("input_reduce_fusion", 1.0, norm_bwd),
      ("loop_multiply_fusion_1", 2.0, norm_fwd), ("nvjet_sm90_tst_128x64", 0.5, None)]))
  assert [e[3] for e in events] == [norm_fwd, norm_bwd, norm_fwd, None]
  table = profiling.summarize(events, calls=2)
  assert table["ops"] == {norm_fwd: {"ms_per_call": 2.0, "count_per_call": 1.0},
                          norm_bwd: {"ms_per_call": 0.5, "count_per_call": 0.5}}
  got = profiling.component_table(table, names)
  assert list(got) == ["gdn/out_norm (forward)", "gdn/out_norm (backward)",
                       "(kernels without an hlo_op)"]
  assert [r["ms_per_call"] for r in got.values()] == pytest.approx([2.0, 0.5, 0.25])
  assert [r["count_per_call"] for r in got.values()] == pytest.approx([1.0, 0.5, 0.5])
  assert sum(r["share"] for r in got.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("op_name,part", [
    ("jit(seeded)/vmap(transpose(jvp()))/while/body/eval_jaxpr/HybridLM.run_pass/blocks_3/"
     "layer_3_gdn/mul", "gdn (backward)"),
    ("jit(seeded)/vmap(jvp())/while/body/eval_jaxpr/HybridLM.run_pass/blocks_1/layer_1_gdn/"
     "out_norm/reduce_sum", "gdn/out_norm (forward)"),
    ("jit(seeded)/vmap(jvp())/HybridLM.run_pass/blocks_1/layer_1_gdn/blocks_1/layer_1_gdn/"
     "blocks_1/custom_vjp_call", "gdn (forward)"),
    ("jit(seeded)/vmap(jvp())/HybridLM.run_pass/blocks_0/layer_0_mixer_norm/mul",
     "mixer_norm (forward)"),
    ("jit(seeded)/vmap(transpose(jvp()))/HybridLM.run_pass/blocks_2/add_any",
     "block (residual adds) (backward)"),
    ("jit(seeded)/vmap(jvp())/HybridLM.run_pass/final_norm/mul", "final_norm (forward)"),
    ("jit(seeded)/vmap(jit(tree_bias_correction))/div", "outside the layers (forward)"),
    ("reduce_sum", "outside the layers (forward)"),
])
def test_model_component_of_real_op_names(op_name, part):
  """op_names as JAX wrote them into the compiled Rule 110 train step (CPU)."""
  assert profiling.model_component(op_name) == part
