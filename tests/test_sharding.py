"""Sharding on 8 fake CPU devices (tests/sharding_checks.py, run in a subprocess), and the
mesh / rules configuration errors (in this process: no devices needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sleep_lm.model import sharding

ROOT = Path(__file__).resolve().parents[1]


def run_checks(*names: str, timeout: int = 900) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")   # keep the suite's compile flags (conftest.py)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip()}
  out = subprocess.run([sys.executable, "-m", "tests.sharding_checks", *names], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
  reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  return {r["check"]: r for r in reports}


def test_sharded_op_on_8_devices():
  """One subprocess (JAX starts once), two checks (each asserts inside):
  - op: the fast-weight op under shard_map (vmapped over 2 seeds, data 2 x fsdp 2 x tensor 2)
    equals the plain call, values and the gradients of q, k, v, g, beta and the state; its
    compiled program has no all-gather (no collective at all but the loss's all-reduce).
  - batch_sizes: a batch_size or eval_batch_size the data axes cannot split is refused by name
    before anything runs."""
  reports = run_checks("op", "batch_sizes")
  assert "batch_sizes" in reports
  assert reports["op"]["all_gathers"] == 0


@pytest.mark.slow   # CI time (~1.5 minutes on 2 cores): run with -m slow
def test_sharded_steps_and_restore_on_8_devices():
  """steps: two train steps (2 seeds, N = 2 passes) on data 4 x tensor 2 and data 2 x fsdp 4
  equal one device's (losses, every parameter); no activation is all-gathered; parameters and
  optimizer state are placed and split as the rules say; a checkpoint saved on data 4 x tensor 2
  restores onto data 2 x fsdp 4 and onto 1 device with the same loss at the next step."""
  steps = run_checks("steps")["steps"]
  assert set(steps["layouts"]) == {"data4_tensor2", "data2_fsdp4"}
  assert set(steps["restored"]) == {"one_device", "data2_fsdp4"}


@pytest.mark.slow
def test_more_layouts_and_the_pallas_kernel_under_shard_map():
  """data 8, fsdp 8, fsdp 2 x tensor 4, data 2 x fsdp 2 x tensor 2 equal one device; the Pallas
  Triton kernel (interpreted on CPU) runs under shard_map like the chunked op."""
  reports = run_checks("more_steps", "pallas", timeout=1800)
  assert reports["op"]["implementation"] == "pallas_triton"
  assert reports["op"]["all_gathers"] == 0
  assert set(reports["steps"]["layouts"]) == {"data8", "fsdp8", "fsdp2_tensor4",
                                              "data2_fsdp2_tensor2"}


@pytest.mark.slow   # ~1 minute on 2 cores
def test_scanned_layers_on_8_devices():
  """scan_steps: `ModelConfig.scan_layers` (4 layers, each pass one scan of 2 x (attn, gdn)) on
  data 2 x fsdp 2 x tensor 2 equals the plain layer loop on one device (losses, every parameter
  after two steps), moves no activation between devices and places the state as the rules say."""
  reports = run_checks("scan_steps")
  assert set(reports["scan_steps"]["layouts"]) == {"data2_fsdp2_tensor2"}


@pytest.mark.parametrize("mesh, devices, message", [
    ({"data": -1, "model": 2}, 8,
     r"^config\.mesh: unknown field\(s\) \['model'\] for the mesh \('model' is now 'tensor'\); "
     r"allowed: \['data', 'fsdp', 'tensor'\]$"),
    ({"data": 3}, 8, r"data x fsdp x tensor = 3 must equal the number of devices \(8\)"),
    ({"data": -1, "fsdp": -1}, 8, "at most one axis may be -1"),
    ({"data": -1, "tensor": 3}, 8, r"fixed axes \(3 devices\) must divide the 8 devices"),
    ({"data": 0}, 8, r"^config\.mesh\.data: must be an integer >= 1 or -1"),
])
def test_bad_mesh_is_refused_by_name(mesh, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh, devices)


def test_mesh_sizes():
  assert sharding.mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {
      "data": 2, "fsdp": 2, "tensor": 2}


def _rules(**changes):
  rules = dict(sharding.DEFAULT_RULES)
  rules.update(changes)
  return tuple(rules.items())


@pytest.mark.parametrize("rules, message", [
    (_rules(batch="model"), r"'batch' -> 'model' is not a mesh axis"),
    (tuple(sharding.DEFAULT_RULES) + (("vocab", "tensor"),), "'vocab' has more than one rule"),
    (tuple(r for r in sharding.DEFAULT_RULES if r[0] != "mlp"), r"no rule for .*\['mlp'\]"),
    (tuple(sharding.DEFAULT_RULES) + (("embedding", None),), "unknown logical axis 'embedding'"),
    (_rules(gdn_heads="data"), "'batch' and 'gdn_heads' both use mesh axis"),
    (_rules(batch=("data", "data")), "names a mesh axis twice"),
    ("batch", "must be a sequence of"),
    ((("batch",),), "must be a pair"),
])
def test_bad_rules_are_refused_by_name(rules, message):
  with pytest.raises(ValueError, match=message):
    sharding.check_rules(rules)


def test_rules_from_json_are_tuples():
  """config.json stores the rules as lists; they read back as the same table."""
  as_json = json.loads(json.dumps(sharding.DEFAULT_RULES))
  assert sharding.check_rules(as_json) == sharding.DEFAULT_RULES
