"""kernel_plan: the kernels of a compiled program and the bytes each moves, read from its HLO.

The byte counts are checked against the obvious count of each program (inputs read, outputs
written) on modules compiled by XLA on this machine; the GPU plan itself (a step compiled for an
H200 without one) is the slow test at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kernels.platform import target_platform
from sleep_lm.common import kernel_plan, profiling

F32 = 4


def _launches(fn, *args, **jit_kw):
  return kernel_plan.launches(jax.jit(fn, **jit_kw).lower(*args).compile().as_text())


def test_shape_bytes():
  assert kernel_plan.shape_bytes("bf16[3,512]{1,0}") == 3 * 512 * 2
  assert kernel_plan.shape_bytes("(f32[4]{0}, s32[], pred[7])") == 16 + 4 + 7
  with pytest.raises(ValueError, match="'q7'"):
    kernel_plan.shape_bytes("q7[3]")


def test_an_elementwise_kernel_reads_its_inputs_and_writes_its_output():
  x = jax.random.normal(jax.random.key(0), (256, 512))
  got = _launches(lambda x, y: jnp.tanh(x) * y + 1, x, x + 1)
  assert sum(k["bytes"] * k["calls"] for k in got) == 3 * x.size * F32
  assert all(k["op_name"].startswith("jit(<lambda>)/") for k in got)


def test_a_kernel_that_reads_a_slice_counts_the_slice():
  x = jax.random.normal(jax.random.key(1), (256, 512))
  got = _launches(lambda x: x[:, :8] * 2, x)
  assert sum(k["bytes"] for k in got) == 2 * 256 * 8 * F32


def test_an_in_place_update_counts_the_update_not_the_buffer():
  buf, upd = jnp.zeros((1024, 256)), jnp.ones((8, 256))
  got = _launches(lambda b, u, i: jax.lax.dynamic_update_slice(b, u * 2, (i, 0)), buf, upd, 3,
                  donate_argnums=0)
  moved = sum(k["bytes"] for k in got)
  assert 2 * upd.size * F32 <= moved < 2 * upd.size * F32 + 64     # + the scalar index


def test_a_while_body_counts_once_per_trip():
  x = jax.random.normal(jax.random.key(2), (256, 512))
  got = _launches(lambda x: jax.lax.fori_loop(0, 5, lambda i, v: jnp.tanh(v) * 2, x), x)
  body = [k for k in got if "/while/body/" in (k["op_name"] or "")]
  assert body and {k["calls"] for k in body} == {5}
  assert max(k["bytes"] for k in body) == 2 * x.size * F32


def test_plan_groups_bytes_by_family_and_model_part():
  """A real compiled module named as sleep_lm names its layers: every launch lands in one
  family and one model part, and both breakdowns sum to the plan's bytes."""

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(16, name="down")(jax.nn.silu(nn.Dense(64, name="gate")(x)))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + Mlp(name="layer_0_mlp")(nn.RMSNorm(name="layer_0_mlp_norm")(x))

  x = jax.random.normal(jax.random.key(3), (128, 16))
  params = Block(name="blocks_0").init(jax.random.key(0), x)
  loss = lambda p: jnp.sum(Block(name="blocks_0").apply(p, x) ** 2)
  text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  plan = kernel_plan.plan(text, bandwidth=1e12)
  total = sum(k["bytes"] * k["calls"] for k in kernel_plan.launches(text))
  assert plan["gb"] == pytest.approx(total / 1e9)
  assert plan["ms_at_bandwidth"] == pytest.approx(1e3 * total / 1e12)
  for rows in (plan["families"], plan["components"]):
    assert sum(r["gb"] for r in rows.values()) == pytest.approx(plan["gb"])
    assert sum(r["count_per_call"] for r in rows.values()) == plan["kernels"]
  assert {"mlp (forward)", "mlp (backward)"} <= set(plan["components"])
  kernels = plan["top_kernels"]
  assert sum(r["count_per_call"] for r in kernels.values()) <= plan["kernels"]
  assert list(kernels) == sorted(kernels, key=lambda k: -kernels[k]["gb"])
  assert set(plan["families"]) <= {f for f, _ in profiling.STEP_FAMILIES} | {"other"}


def test_target_platform_is_the_set_meshs():
  assert target_platform() == jax.default_backend()
  with jax.set_mesh(jax.make_mesh((1,), ("d",))):
    assert target_platform() == jax.devices()[0].platform


def test_unknown_plan_target_names_the_choices():
  with pytest.raises(ValueError, match="'h100', 'h200'"):
    kernel_plan.gpu_topology("a100")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax_cuda13_plugin") is None,
                    reason="needs the CUDA PJRT plugin: pip install -e '.[plan]'")
def test_a_train_step_compiles_for_an_h200_without_one(tmp_path):
  """The Rule 110 smoke step compiled for an H200 on this machine: its fast-weight op lowers to
  the Pallas Triton kernels (not interpret mode), and the plan charges its bytes to the GDN."""
  out = tmp_path / "plan.json"
  subprocess.run([sys.executable, "-m", "experiments.throughput", "--config",
                  "experiments/rule110.py:smoke", "--dtype", "bfloat16", "--passes", "2",
                  "--plan", "h200", "--json", str(out)], check=True, cwd=os.getcwd(),
                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=1200)
  (row,) = json.loads(out.read_text())["rows"]
  assert "error" not in row, row.get("error")
  pallas = row["families"]["fast-weight op (Pallas)"]
  assert pallas["count_per_call"] > 0 and pallas["gb"] > 0
  assert any(part.startswith("gdn") for part in row["components"])
  # identical fusions share one kernel (XLA's deduplicated_name), as in a GPU trace
  assert max(r["count_per_call"] for r in row["top_kernels"].values()) > 1
  assert row["ms_at_bandwidth"] == pytest.approx(1e3 * row["gb"] * 1e9 / 4.27e12)


def test_achieved_bandwidth_divides_each_timed_kernels_bytes_by_its_time():
  """A real compiled program's kernels, timed by a GPU trace in XLA's xplane format (the
  helper of test_profiling): bytes per family over the traced time; an instruction the trace
  names but the program lacks is left out."""
  from tests.test_profiling import _gpu_trace

  x = jax.random.normal(jax.random.key(4), (256, 512))
  text = jax.jit(lambda x: jnp.sum(jnp.tanh(x) * x, axis=1)).lower(x).compile().as_text()
  (kernel,) = kernel_plan.launches(text)
  events = profiling.device_events(_gpu_trace([
      (kernel["kernel"], 0.5, kernel["instruction"]), (kernel["kernel"], 0.5,
                                                       kernel["instruction"]),
      ("loop_add_fusion_9", 3.0, "not_in_this_program.9")]))
  ops = profiling.summarize(events, calls=2)["ops"]
  got = kernel_plan.achieved_bandwidth(text, ops)
  family = next(f for f, p in profiling.STEP_FAMILIES if re.search(p, kernel["kernel"]))
  assert list(got) == [family, "total"]
  assert got["total"]["gb"] == pytest.approx(kernel["bytes"] / 1e9)       # one launch per call
  assert got["total"]["ms_per_call"] == pytest.approx(0.5)
  assert got[family]["gb_per_s"] == pytest.approx(kernel["bytes"] / 1e9 / 0.5e-3)
  # Inside a command buffer the trace names the buffer's instruction: kernels are matched by
  # name where the trace launched them as often as the plan; other names are left out.
  def by_name(kernels):
    table = profiling.summarize(profiling.device_events(_gpu_trace(kernels)), calls=2, top=None)
    return (kernel_plan.achieved_bandwidth(text, table["ops"]),
            kernel_plan.achieved_bandwidth(text, table["ops"], rows=table["rows"]))

  buffered = lambda name, ms: (name, ms, "command_buffer_1")
  assert by_name([buffered(kernel["kernel"], 0.5)] * 2
                 + [buffered("loop_add_fusion_9", 3.0)]) == ({}, got)
  assert by_name([buffered(kernel["kernel"], 0.25)] * 4) == ({}, {})  # 2 launches, 1 planned
  # Names carry no op_name: a trace inside a command buffer has no layer parts to give.
  table = profiling.summarize(profiling.device_events(_gpu_trace(
      [buffered(kernel["kernel"], 0.5)] * 2)), calls=2, top=None)
  assert kernel_plan.achieved_bandwidth(text, table["ops"], rows=table["rows"],
                                        by_layer_part=True) == {}


def test_command_buffer_traces_are_charged_to_model_parts_by_kernel_name():
  """On a GPU, XLA's command buffers tag every kernel with the buffer's instruction (an H200 trace
  of the Rule 110 step: all 5,546 kernels as `command_buffer_1`), so the model-part table charges
  kernels by name through the module's launches; a library kernel (cuBLAS) stays apart."""
  from tests.test_profiling import _gpu_trace, compiled_gdn_block

  text = compiled_gdn_block()
  launches = kernel_plan.kernel_launches(text)
  part = {k: {profiling.model_component(o) for o, _ in v} for k, v in launches.items()}
  fwd = next(k for k, p in part.items() if p == {"gdn/out_norm (forward)"})
  bwd = next(k for k, p in part.items() if p == {"gdn/out_norm (backward)"})
  table = profiling.summarize(profiling.device_events(_gpu_trace([
      (fwd, 2.0, "command_buffer_1"), (bwd + "__1", 1.0, "command_buffer_1"),
      (fwd, 2.0, "command_buffer_1"), ("nvjet_sm90_tst_128x64", 0.5, "command_buffer_1")])),
      calls=2, top=None)
  names = profiling.hlo_op_names(text)
  assert list(profiling.component_table(table, names)) == ["(instruction not in the module)"]
  got = profiling.component_table(table, names, launches)
  assert list(got) == ["gdn/out_norm (forward)", "gdn/out_norm (backward)",
                       "(a library's kernel: its name is not in the module, e.g. cuBLAS)"]
  assert [r["ms_per_call"] for r in got.values()] == pytest.approx([2.0, 0.5, 0.25])
  assert sum(r["share"] for r in got.values()) == pytest.approx(1.0)


def test_a_trace_naming_its_instructions_is_charged_per_instruction():
  """The trace of a program compiled without command buffers names each kernel's instruction:
  charged by instruction even with `kernel_launches` at hand, whether the trace writes the name
  with '.' or '_'; an instruction without an op_name and one the module lacks get rows of their
  own (they must not send the whole table to name matching, which charged 20% of an H100 step)."""
  from tests.test_profiling import _gpu_trace, compiled_gdn_block

  text = compiled_gdn_block()
  names = profiling.hlo_op_names(text)
  launches = kernel_plan.kernel_launches(text)
  by_part = {}
  for launch in kernel_plan.launches(text):
    if launch["op_name"] is not None:
      by_part.setdefault(profiling.model_component(launch["op_name"]), launch)
  fwd, bwd = by_part["gdn/out_norm (forward)"], by_part["gdn/out_norm (backward)"]
  bare = next(name for name, op in names.items() if op is None)      # e.g. a parameter
  assert "." in bwd["instruction"]                  # the trace below writes it with '_'
  table = profiling.summarize(profiling.device_events(_gpu_trace([
      (fwd["kernel"], 2.0, fwd["instruction"]),
      (bwd["kernel"], 1.0, bwd["instruction"].replace(".", "_")),
      ("some_kernel", 0.5, bare), ("other_kernel", 0.25, "not_in_this_module.7")])),
      calls=1, top=None)
  got = profiling.component_table(table, names, launches)
  assert {k: r["ms_per_call"] for k, r in got.items()} == pytest.approx({
      "gdn/out_norm (forward)": 2.0, "gdn/out_norm (backward)": 1.0, "(no op_name)": 0.5,
      "(instruction not in the module)": 0.25})
  # The bandwidth table reads the same instructions: the two timed kernels, by their bytes.
  achieved = kernel_plan.achieved_bandwidth(text, table["ops"], rows=table["rows"])
  assert achieved["total"]["ms_per_call"] == pytest.approx(3.0)
  assert achieved["total"]["gb"] == pytest.approx((fwd["bytes"] + bwd["bytes"]) / 1e9)
  # By layer part: both kernels are the GDN layer's (its out norm), each in its own family row.
  assert profiling.layer_part(fwd["op_name"]) == "gdn" and profiling.layer_part(None) == (
      "(no op_name)")
  parts = kernel_plan.achieved_bandwidth(text, table["ops"], by_layer_part=True)
  assert parts["total"] == achieved["total"]
  assert parts["gdn: all"] == pytest.approx(achieved["total"])
  families = {f"gdn: {profiling.family_of(k['kernel'], profiling.STEP_FAMILIES)}": 0.0
              for k in (fwd, bwd)}
  for launch, ms in ((fwd, 2.0), (bwd, 1.0)):
    families[f"gdn: {profiling.family_of(launch['kernel'], profiling.STEP_FAMILIES)}"] += ms
  assert set(parts) == {"total", "gdn: all", *families}
  assert {k: parts[k]["ms_per_call"] for k in families} == pytest.approx(families)


_COMPILE_KERNELS = """
import jax, jax.numpy as jnp
from kernels.attention import causal_attention
from kernels.swiglu import swiglu_mlp
from sleep_lm.common import kernel_plan
mesh = jax.sharding.Mesh(kernel_plan.gpu_topology("h200").devices, ("d",))
spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec()))
def fwd_bwd(fn):
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(out)
  return run
cases = {"swiglu": (swiglu_mlp, [spec(36864, 256), spec(256, 1024), spec(256, 1024),
                                 spec(1024, 256)]),
         "attention": (causal_attention, [spec(1, 1000, 8, 64)] * 3)}
for name, (fn, args) in cases.items():
  with jax.set_mesh(mesh):
    text = jax.jit(fwd_bwd(fn)).lower(*args).compile().as_text()
  kernels = [k["kernel"] for k in kernel_plan.launches(text) if k["opcode"] == "custom-call"]
  print(name, sorted(kernels))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax_cuda13_plugin") is None,
                    reason="needs the CUDA PJRT plugin: pip install -e '.[plan]'")
def test_the_pallas_kernels_compile_for_an_h200_without_one():
  """Triton's code generation for the SwiGLU and attention kernels, forward and backward, at the
  Rule 110 MLP shape and a padded attention length: what a GPU would compile."""
  out = subprocess.run([sys.executable, "-c", _COMPILE_KERNELS], check=True, cwd=os.getcwd(),
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                       text=True, timeout=600).stdout
  assert "swiglu ['swiglu_up', 'swiglu_up_bwd']" in out
  assert "attention ['mha_backward', 'mha_forward', 'mha_preprocess_backward']" in out


# An asynchronous fusion as XLA's GPU compiler emits them in a scan body (taken from the 16-layer
# `large` step compiled for an H200, shapes shrunk): the stacked buffer is updated in place
# through a bitcast of the new slice, and the "-done" half carries no work of its own.
_ASYNC_UPDATE = (pathlib.Path(__file__).parent / "data" / "async_update.hlo").read_text()


def test_asynchronous_in_place_updates_and_sliced_reads_through_bitcasts():
  got = kernel_plan.launches(_ASYNC_UPDATE)
  assert [(k["kernel"], k["opcode"]) for k in got] == [
      ("loop_dynamic_update_slice_fusion", "fusion-start"),
      ("loop_dynamic_slice_fusion_2", "fusion")]
  update, read = got
  assert update["bytes"] == 2 * 64 * 128 * F32 + 4          # the slice read and written, index
  assert read["bytes"] == 2 * 64 * 128 * 2 + 4              # one bf16 slice read and written
