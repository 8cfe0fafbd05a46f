"""`sleep_lm.training.muon`: Muon with the Newton-Schulz chain batched over same-shape matrices.

The oracle is `optax.contrib.muon` with the same hyperparameters: several steps of updates (and
the parameters they move), the optimizer state leaf by leaf and its tree (types included: a
checkpoint of either restores into the other), within relative RMS 1e-5 in float32 (measured:
<= 2e-6, the tall matrices: XLA orders their products differently). bfloat16 is checked for
its dtype (never stacked with float32) and within 0.15 only: the bfloat16 chain rounds
differently when XLA lays out the same products differently, 0 to 8e-2 relative (a 12 x 5
matrix, 6 seeds); the float32 bound is the oracle. The chain is mathematically transpose-
invariant (f(X) = f(X^T)^T), so a dropped transpose of the tall matrices moves no value beyond
rounding: the program's matmuls are checked instead, one chain per group of (short side, long
side, dtype), each product of the short side's Gram shape [n, s, s] or of the stack [n, s, l].
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleep_lm.model.config import ModelConfig
from sleep_lm.training import muon as batched
from sleep_lm.training.checkpointing import Checkpointer
from sleep_lm.training.step import OptimizerConfig, TrainState, make_optimizer, param_labels
from tests.numerics import rel_rms
from tests.test_model_features import make_params

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 0.15}

# Same-shape groups, wide (rows < cols) and tall (rows > cols: transposed), square, a tall
# matrix whose transpose joins a wide group, bfloat16 beside float32 of the same shape, a
# vector (optax's AdamW branch). Groups: (8, 16, f32) x 5, (12, 20, f32) x 3, (6, 6, f32) x 1,
# (8, 16, bf16) x 3, (5, 12, bf16) x 1.
SHAPES = {
    "wide": [(8, 16, "f32")] * 3 + [(12, 20, "f32")],
    "tall": [(16, 8, "f32")] * 2 + [(20, 12, "f32")] * 2,
    "square": [(6, 6, "f32")],
    "bf16": [(8, 16, "bf16"), (16, 8, "bf16"), (16, 8, "bf16"), (12, 5, "bf16")],
    "vector": [(7, "f32")],
}
# (n, short side, long side, dtype) of each group.
GROUPS = [(5, 8, 16, "f32"), (3, 12, 20, "f32"), (1, 6, 6, "f32"), (3, 8, 16, "bf16"),
          (1, 5, 12, "bf16")]
MATRICES = 13
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def random_tree(rng, scale: float = 1.0):
  return {name: [jnp.asarray(scale * rng.standard_normal(s[:-1]), DTYPES[s[-1]]) for s in shapes]
          for name, shapes in SHAPES.items()}


def assert_close(got, want, what: str) -> None:
  """Same tree (node types included), every leaf within TOL[dtype] relative RMS."""
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape, (what, path)
    err = rel_rms(g, w)
    assert err <= TOL.get(jnp.dtype(w.dtype), 0.0), \
        f"{what}{jax.tree_util.keystr(path)}: relative RMS error {err:.2e}"


def run(optimizer, params, grads):
  """[(updates, state, params)] after each step of `grads`, jitted."""
  update = jax.jit(optimizer.update)
  state, out = optimizer.init(params), []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates, state, params))
  return out


def matmuls(optimizer, params) -> Counter:
  """The output shapes (and dtypes) of the matmuls in the update's StableHLO (every one of them
  Newton-Schulz's here), with their multiplicities."""
  text = jax.jit(optimizer.update).lower(params, optimizer.init(params), params).as_text()
  return Counter(re.findall(r"stablehlo\.dot_general .*-> tensor<(\w+)>", text))


def chains(groups) -> Counter:
  """The matmuls of 5 steps on a stack [n, s, long]: a = X X^T, a a (both [n, s, s]), b X."""
  out = Counter()
  for n, s, long, dtype in groups:
    stack = f"{n}x" if n > 1 else ""      # jnp.matmul drops a batch of one
    out[f"{stack}{s}x{s}x{dtype}"] += 10
    out[f"{stack}{s}x{long}x{dtype}"] += 5
  return out


@pytest.mark.parametrize("nesterov, weight_decay", [(True, 0.0), (False, 0.1)])
def test_batched_muon_equals_optax_muon(nesterov, weight_decay):
  rng = np.random.default_rng(0)
  params = random_tree(rng)
  grads = [random_tree(rng, 0.1) for _ in range(4)]
  lr = optax.linear_schedule(0.05, 0.01, 3)
  got = batched.muon(lr, beta=0.9, nesterov=nesterov, weight_decay=weight_decay)
  want = optax.contrib.muon(lr, beta=0.9, nesterov=nesterov, weight_decay=weight_decay)
  for step, (g, w) in enumerate(zip(run(got, params, grads), run(want, params, grads),
                                    strict=True)):
    for what, a, b in zip(("updates", "state", "params"), g, w, strict=True):
      assert_close(a, b, f"step {step} {what}")
  assert matmuls(got, params) == chains(GROUPS)
  assert matmuls(want, params).total() == 15 * MATRICES


def test_orthogonalize_equals_optax_per_matrix():
  """The chain alone, leaf by leaf against optax's orthogonalization of that leaf."""
  from optax.contrib._muon import orthogonalize_via_newton_schulz
  rng = np.random.default_rng(1)
  tree = {k: v for k, v in random_tree(rng).items() if k != "vector"}
  coeffs = jnp.asarray(batched.DEFAULT_NS_COEFFS)
  got = jax.jit(lambda t: batched.orthogonalize(t, coeffs))(tree)
  want = jax.jit(lambda t: jax.tree.map(
      lambda x: orthogonalize_via_newton_schulz(x, coeffs), t))(tree)
  assert_close(got, want, "orthogonalized")
  with pytest.raises(ValueError, match="2-D"):
    batched.orthogonalize({"v": jnp.ones(3)}, coeffs)


CFG = ModelConfig(vocab_size=7, d_model=32, layers=("attn", "gdn") * 2, attn_head_dim=16,
                  gdn_head_dim=16, mlp_dim=48)


@pytest.mark.parametrize("train_layers, nesterov, weight_decay",
                         [(None, True, 0.0), ((1, 3), False, 0.1)])
def test_make_optimizer_equals_optax_muon(train_layers, nesterov, weight_decay):
  """The default optimizer (batched Muon under the labels, with or without frozen layers)
  against `batched_muon=False` (`optax.contrib.muon`): three steps, updates, state, params."""
  cfg = OptimizerConfig(total_steps=6, warmup_steps=1, muon_lr=0.02, adamw_lr=1e-2,
                        weight_decay=weight_decay, muon_nesterov=nesterov,
                        train_layers=train_layers)
  params = make_params(CFG, seed=2)
  rng = np.random.default_rng(3)
  grads = [jax.tree.map(lambda x: jnp.asarray(0.01 * rng.standard_normal(x.shape), x.dtype),
                        params) for _ in range(3)]
  got = run(make_optimizer(cfg), params, grads)
  want = run(make_optimizer(cfg, batched_muon=False), params, grads)
  for step, (g, w) in enumerate(zip(got, want, strict=True)):
    for what, a, b in zip(("updates", "state", "params"), g, w, strict=True):
      assert_close(a, b, f"step {step} {what}")
  labels = jax.tree.leaves(param_labels(params, train_layers))
  moved = [bool(np.any(np.asarray(a) != np.asarray(b)))
           for a, b in zip(jax.tree.leaves(got[-1][2]), jax.tree.leaves(params), strict=True)]
  assert [m for m, lab in zip(moved, labels, strict=True) if lab == "frozen"] == (
      [] if train_layers is None else [False] * labels.count("frozen"))
  assert all(m for m, lab in zip(moved, labels, strict=True) if lab == "muon")


def test_checkpoint_of_optax_muon_restores_and_continues(tmp_path):
  """A train state written with `optax.contrib.muon` (the code before the batched default)
  restores into the default optimizer's state and the next step equals optax's."""
  cfg = OptimizerConfig(total_steps=6, warmup_steps=0, train_layers=(1, 3))
  old, new = make_optimizer(cfg, batched_muon=False), make_optimizer(cfg)
  params = make_params(CFG, seed=4)
  rng = np.random.default_rng(5)
  grads = [jax.tree.map(lambda x: jnp.asarray(0.01 * rng.standard_normal(x.shape), x.dtype),
                        params) for _ in range(2)]
  updates, opt_state = jax.jit(old.update)(grads[0], old.init(params), params)
  state = TrainState(jnp.ones((), jnp.int32), optax.apply_updates(params, updates), opt_state)
  ckpt = Checkpointer(tmp_path / "checkpoints")
  ckpt.save(state, 1, {"step": 1})
  ckpt.wait()
  template = TrainState(jnp.zeros((), jnp.int32), params, new.init(params))
  restored, meta = ckpt.restore(template, 1)
  ckpt.close()
  assert meta["step"] == 1
  assert_close(restored, state, "restored")
  want = jax.jit(old.update)(grads[1], state.opt_state, state.params)
  got = jax.jit(new.update)(grads[1], restored.opt_state, restored.params)
  assert_close(got, want, "next step")
