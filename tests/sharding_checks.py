"""Checks on 8 fake CPU devices, run in one subprocess by tests/test_sharding.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m tests.sharding_checks [op|steps|batch_sizes|more_steps|pallas|scan_steps ...]

The device count is fixed when JAX starts, so these run in their own process; one process runs
several checks so that JAX starts once. Each check asserts and prints one JSON line of what it
measured (the test reads them back).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments import rule110
from sleep_lm.model import sharding
from sleep_lm.model.layers import sharded_fast_weight_op
from sleep_lm.model.sleep import static_schedule
from sleep_lm.training import trainer
from sleep_lm.training.checkpointing import Checkpointer
from sleep_lm.training.run_config import RunConfig
from sleep_lm.training.step import make_optimizer, make_train_step

P = PartitionSpec
SEQ = 48          # two windows of 24: the first sleeps (N = 2 passes), the second is supervised
# 4 heads of 8 (attention and GDN), so that tensor = 4 splits whole heads.
TINY = {"model.d_model": 32, "model.attn_head_dim": 8, "model.gdn_head_dim": 8,
        "model.mlp_dim": 64, "model.layers": ("attn", "gdn"), "model.passes": 2,
        "seeds": 2, "batch_size": 8, "eval_batch_size": 8, "steps": 10,
        "optimizer.warmup_steps": 1, "tensorboard": False}


def report(name: str, **values) -> None:
  print(json.dumps({"check": name, **values}), flush=True)


def tiny_run(mesh: dict, **extra) -> RunConfig:
  c = rule110.get_config("smoke")
  for key, value in {**TINY, "mesh": mesh, **extra}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return RunConfig.from_config(c)


def synthetic_batch(run: RunConfig, seed: int = 0) -> dict:
  """[S, B, T] tokens of the task's vocabulary, answers supervised in the second window only."""
  rng = np.random.default_rng(seed)
  shape = (run.seeds, run.batch_size, SEQ)
  mask = np.zeros(shape, np.float32)
  mask[..., SEQ - 8:] = 1.0
  return {"inputs": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
          "targets": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
          "loss_mask": mask}


class Layout:
  """A mesh, its train state (initialised in place) and its jitted, pinned train step."""

  def __init__(self, mesh: dict, devices=None, like=None, **extra):
    """`like`: another Layout whose state to start from (placed onto this mesh), instead of
    initialising again (an init program costs a compile; the states are the same anyway).
    `extra`: config overrides by path, as `tiny_run` takes them."""
    self.run = run = tiny_run(mesh, **extra)
    self.mesh, self.boxed = trainer.setup(run, devices)
    optimizer = make_optimizer(run.optimizer)
    self.state_sh = trainer.state_shardings(run, self.mesh, self.boxed, optimizer)
    if like is None:
      self.state, _ = trainer.initial_state(run, self.mesh, self.boxed)
    else:
      self.state = jax.device_put(jax.device_get(like.state), self.state_sh)
    self.batch_sh = trainer.seeded_batch_sharding(self.mesh, run.sharding_rules)
    schedule = static_schedule(run.model, synthetic_batch(run)["loss_mask"][0])
    assert schedule == (True, False), schedule
    self.step_fn = make_train_step(
        run.model, optimizer, schedule=schedule, rules=run.sharding_rules,
        in_shardings=(self.state_sh, self.batch_sh),
        out_shardings=(self.state_sh, sharding.replicated(self.mesh)))
    self.compiled = None

  def batch(self, seed: int):
    return jax.tree.map(lambda x: jax.device_put(x, self.batch_sh), synthetic_batch(self.run, seed))

  def step(self, seed: int) -> dict:
    batch = self.batch(seed)
    with jax.set_mesh(self.mesh):
      if self.compiled is None:             # ahead of time, to read the program it runs
        self.compiled = self.step_fn.lower(self.state, batch).compile()
      self.state, metrics = self.compiled(self.state, batch)
    return jax.device_get(metrics)

  def collective_shapes(self, ops=("all-gather", "all-to-all", "collective-permute",
                                    "reduce-scatter")) -> list[tuple[str, tuple[int, ...]]]:
    """(op, result shape) of every collective of these kinds in the compiled step."""
    found = []
    pattern = rf"\s*(?:ROOT )?%\S+ = (.*?) ({'|'.join(ops)})(?:-start)?\("
    for line in self.compiled.as_text().splitlines():
      head = re.match(pattern, line)
      if head:
        found += [(head.group(2), tuple(int(x) for x in dims.split(",") if x))
                  for dims in re.findall(r"\[([\d,]*)\]", head.group(1))]
    return found


def max_rel_diff(a, b) -> float:
  """max |a - b| / max |a| over the leaves of two pytrees."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(x).max(), 1e-12)
    worst = max(worst, float(np.abs(x - y).max() / scale))
  return worst


def check_op(implementation: str = "chunked") -> None:
  """The fast-weight op under shard_map (inside vmap over 2 seeds, data 2 x fsdp 2 x tensor 2)
  equals the plain call, values and gradients of all six inputs, and the compiled program holds
  no all-gather (nor any other collective but the loss's all-reduce)."""
  t0 = time.time()
  s, b, t, h, d = 2, 8, 24, 4, 8
  keys = jax.random.split(jax.random.key(0), 6)
  q, k, v = (jax.random.normal(keys[i], (s, b, t, h, d)) for i in range(3))
  g = -jax.nn.softplus(jax.random.normal(keys[3], (s, b, t, h)))
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (s, b, t, h)))
  state = 0.1 * jax.random.normal(keys[5], (s, b, h, d, d))
  args = (q, k, v, g, beta, state)
  kw = dict(use_qk_l2norm=True, chunk_size=16, implementation=implementation)

  def loss(*a):
    o, st = jax.vmap(lambda *x: sharded_fast_weight_op("gdn", *x, **kw))(*a)
    return jnp.sum(o * o) + jnp.sum(jnp.sin(st))

  grad = jax.value_and_grad(loss, argnums=tuple(range(6)))
  want = jax.jit(grad)(*args)                                  # no mesh: the plain call
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  x4, x3, st = (NamedSharding(mesh, P(None, *spec)) for spec in (
      P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None, "tensor"),
      P(("data", "fsdp"), "tensor", None, None)))
  placed = [jax.device_put(a, sh) for a, sh in zip(args, (x4, x4, x4, x3, x3, st), strict=True)]
  with jax.set_mesh(mesh):
    assert sharding.fast_weight_specs((b, t, h, d)) is not None
    jitted = jax.jit(grad)
    got = jitted(*placed)
    hlo = jitted.lower(*placed).compile().as_text()
  diff = max_rel_diff(want, got)
  gathers = hlo.count("all-gather")
  collectives = {c: hlo.count(c) for c in ("all-gather", "all-to-all", "collective-permute",
                                           "reduce-scatter")}
  assert diff < 1e-5, f"sharded op differs from the plain call: {diff}"
  assert gathers == 0, f"{gathers} all-gathers in the sharded op's program"
  assert not any(collectives.values()), collectives
  with jax.set_mesh(mesh):   # the jaxpr really holds a shard_map (no silent fallback)
    assert "shard_map" in str(jax.make_jaxpr(grad)(*placed))
  report("op", implementation=implementation, max_rel_diff=diff, all_gathers=gathers,
         seconds=time.time() - t0)


LAYOUTS = {"data4_tensor2": {"data": 4, "tensor": 2}, "data2_fsdp4": {"data": 2, "fsdp": 4},
           "data8": {"data": 8}, "fsdp8": {"fsdp": 8}, "fsdp2_tensor4": {"fsdp": 2, "tensor": 4},
           "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}


def check_steps_and_restore(layouts=("data4_tensor2", "data2_fsdp4")) -> None:
  """Train steps on several layouts equal one device's (two steps, loss and every parameter),
  parameters are placed as the rules say, and a checkpoint saved on data 4 x tensor 2 restores
  onto data 2 x fsdp 4 and onto 1 device with the same loss at the next step."""
  t0 = time.time()
  one = Layout({"data": 1}, devices=jax.devices()[:1])
  start = jax.device_get(one.state)
  ref = [one.step(seed) for seed in (0, 1)]
  ref_params = jax.device_get(one.state.params)
  third = one.step(2)                       # the step after a save at step 2, on one device
  results, built = {}, {}
  for name in layouts:
    built[name], results[name] = _steps_equal(name, start, ref, ref_params)

  # Restore on another mesh: saved on data 4 x tensor 2 after 2 steps, restored onto
  # data 2 x fsdp 4 and onto one device, each then takes step 3.
  restored = {}
  if "data4_tensor2" in built:
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = Checkpointer(tmp, keep=1)
      ckpt.save(built["data4_tensor2"].state, 2, {"step": 2, "data_position": 2})
      ckpt.wait()
      targets = {"one_device": one}
      if "data2_fsdp4" in built:
        targets["data2_fsdp4"] = built["data2_fsdp4"]
      for name, target in targets.items():
        target.state, meta = ckpt.restore(target.state, 2)
        assert meta["data_position"] == 2
        for a, b in zip(jax.tree.leaves(target.state), jax.tree.leaves(target.state_sh),
                        strict=True):
          assert a.sharding.is_equivalent_to(b, a.ndim), (name, a.sharding, b)
        loss = target.step(2)["loss"]
        np.testing.assert_allclose(loss, third["loss"], rtol=2e-5, err_msg=name)
        restored[name] = np.asarray(loss).tolist()
      ckpt.close()
  report("steps", reference=[np.asarray(m["loss"]).tolist() for m in ref], layouts=results,
         restored=restored, next_loss=np.asarray(third["loss"]).tolist(),
         seconds=time.time() - t0)


def _steps_equal(name: str, start, ref: list, ref_params, **extra) -> tuple[Layout, dict]:
  """Two train steps on the mesh `name` from the state `start` equal the reference (one
  device's losses `ref` and parameters after them), no activation moves between devices, and
  parameters and optimizer state are placed as the rules say. (The Layout, what it measured.)"""
  lay = Layout(LAYOUTS[name], like=_Host(start), **extra)
  got = [lay.step(seed) for seed in (0, 1)]
  for m, r in zip(got, ref, strict=True):
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=2e-5, err_msg=name)
  diff = max_rel_diff(ref_params, jax.device_get(lay.state.params))
  assert diff < 2e-4, f"{name}: parameters after 2 steps differ from one device's by {diff}"
  # Whole step: what is gathered or moved between devices are weights (FSDP, Muon's
  # whole-matrix products), never an activation or an operand of the op: those all have a
  # window-length (24) or sequence-length (48) dimension, and no parameter has. (Activations
  # are all-reduced after tensor-parallel output projections, as they must be.)
  moved = lay.collective_shapes()
  assert not [m for m in moved if {24, SEQ} & set(m[1])], (name, moved)
  gathered = [m for m in moved if m[0] == "all-gather"]
  return lay, {"losses": [np.asarray(m["loss"]).tolist() for m in got],
               "param_max_rel_diff": diff, "all_gathers": len(gathered),
               "specs": _check_placement(lay)}


# 4 layers: with scan_layers, each pass is one scan over 2 repetitions of (attn, gdn).
SCAN_LAYERS = {"model.layers": ("attn", "gdn") * 2}


def check_scan_steps(layouts=("data2_fsdp2_tensor2",)) -> None:
  """`ModelConfig.scan_layers`: train steps on a sharded mesh with the layers scanned equal one
  device's with the plain layer loop (same parameters, losses, every parameter after two steps),
  with the same checks as `check_steps_and_restore` (no activation moved, placement)."""
  t0 = time.time()
  one = Layout({"data": 1}, devices=jax.devices()[:1], **SCAN_LAYERS)
  start = jax.device_get(one.state)
  ref = [one.step(seed) for seed in (0, 1)]
  ref_params = jax.device_get(one.state.params)
  results = {}
  for name in layouts:
    lay, results[name] = _steps_equal(name, start, ref, ref_params, **SCAN_LAYERS,
                                      **{"model.scan_layers": True})
    assert lay.run.model.scan_layers and not one.run.model.scan_layers
  report("scan_steps", reference=[np.asarray(m["loss"]).tolist() for m in ref],
         layouts=results, seconds=time.time() - t0)


class _Host:
  def __init__(self, state):
    self.state = state


def _check_placement(lay: Layout) -> dict:
  """Parameters and optimizer state are placed as the rules say (the replicated seed axis in
  front), and the shards really have the split shapes."""
  params, shape = lay.state.params, lay.mesh.shape
  expect = {("layer_1_gdn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),
            ("layer_1_gdn", "out_proj", "kernel"): P(None, "tensor", "fsdp"),
            ("layer_1_gdn", "A_log"): P(None, "tensor"),
            ("layer_0_mlp", "down", "kernel"): P(None, "tensor", "fsdp"),
            ("embedding", "embedding"): P(None, None, "fsdp")}
  for path, spec in expect.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    assert leaf.sharding.spec == spec, (path, leaf.sharding.spec, spec)
  q_kernel = params["layer_1_gdn"]["q_proj"]["kernel"]                   # [S, 32, 32]
  local = q_kernel.addressable_shards[0].data.shape
  assert local == (2, 32 // shape["fsdp"], 32 // shape["tensor"]), local
  mu = [x for p, x in jax.tree_util.tree_leaves_with_path(lay.state.opt_state)
        if "q_proj" in jax.tree_util.keystr(p) and x.ndim == 3]
  assert mu and all(x.sharding.spec == P(None, "fsdp", "tensor") for x in mu), mu
  assert lay.state.step.sharding.spec == P(None)
  return {"q_proj_kernel_shard": list(local)}


def check_batch_sizes() -> None:
  """Batch sizes the data axes cannot split are refused by name before anything runs (the
  trainer calls `setup` before it claims the workdir)."""
  for field in ("batch_size", "eval_batch_size"):
    try:
      trainer.setup(tiny_run({"data": 4, "tensor": 2}, **{field: 6}))
    except ValueError as e:
      assert f"config.{field} (6) must be divisible by mesh.data x mesh.fsdp (4)" in str(e), e
    else:
      raise AssertionError(f"{field} = 6 on a 4-way data axis was accepted")
  report("batch_sizes")


CHECKS = {"op": check_op, "steps": check_steps_and_restore, "batch_sizes": check_batch_sizes,
          "more_steps": lambda: check_steps_and_restore(
              ("data8", "fsdp8", "fsdp2_tensor4", "data2_fsdp2_tensor2")),
          "pallas": lambda: check_op("pallas_triton"), "scan_steps": check_scan_steps}

if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  for name in sys.argv[1:] or ("op", "steps", "batch_sizes"):
    CHECKS[name]()
