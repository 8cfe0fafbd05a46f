"""ModelConfig.merge_projections: the projections that read one input as one product of their
matrices concatenated at the call. The same parameters, logits and gradients as separate
products (attention with a q/k/v bias, GDN); fewer products in the program; no merge
where a projection's output axis is split over devices (tensor parallel), a merge where only
the batch is. The blocks are shared by training, replay and decode, so the plain forward is the
code under test."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sleep_lm.common.validation import FieldError
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params
from sleep_lm.model.sharding import DEFAULT_RULES
from tests.numerics import rel_rms

MODEL = dict(vocab_size=16, d_model=32, attn_head_dim=16, gdn_head_dim=16, mlp_dim=64, window=8,
             layers=("attn", "gdn"))
# Products a forward saves by merging: attention q|k|v (3 -> 1), GDN q|k|v|a|b|gate (6 -> 1);
# the SwiGLU's gate and up stay two (merged, the step's kernel plan grew).
SAVED = 2 + 5


def test_merged_projections_have_the_same_parameters_logits_and_gradients():
  # attn_qkv_bias: attention's merge with biases; GDN's without.
  configs = {m: ModelConfig(**MODEL, attn_qkv_bias=True, merge_projections=m)
             for m in (False, True)}
  params = {m: nn.meta.unbox(init_params(c, jax.random.key(0))) for m, c in configs.items()}
  same = jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
                      params[True], params[False])
  assert all(jax.tree.leaves(same))
  # Biases that are not zero, so that their place in the sum is checked too.
  p = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 if "bias" in jax.tree_util.keystr(path) else x, params[False])
  tokens = jax.random.randint(jax.random.key(1), (2, MODEL["window"]), 0, 16)
  probe = jax.random.normal(jax.random.key(2), (2, MODEL["window"], 16))

  def loss(p, merge):
    return jnp.sum(HybridLM(configs[merge]).apply({"params": p}, tokens) * probe)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  got, want = value_and_grad(p, True), value_and_grad(p, False)
  assert rel_rms(got[0], want[0]) < 1e-5     # float32, products blocked differently
  errors = jax.tree.map(rel_rms, got[1], want[1])
  assert max(jax.tree.leaves(errors)) < 1e-5, errors
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got[1]))


def _products(config: ModelConfig, mesh=None) -> int:
  """dot_general equations of one plain forward, traced under `mesh` (an abstract mesh)."""
  params = nn.meta.unbox(init_params(config, jax.random.key(0)))
  tokens = jnp.zeros((2, MODEL["window"]), jnp.int32)

  def count():
    with nn.logical_axis_rules(DEFAULT_RULES):
      jaxpr = jax.make_jaxpr(lambda p: HybridLM(config).apply({"params": p}, tokens))(params)
    return str(jaxpr).count("dot_general[")
  if mesh is None:
    return count()
  with jax.sharding.use_abstract_mesh(mesh):
    return count()


def test_merging_saves_the_products_and_only_where_no_output_axis_is_split():
  plain, merged = (ModelConfig(**MODEL, merge_projections=m) for m in (False, True))
  assert _products(plain) - _products(merged) == SAVED
  axes, auto = ("data", "fsdp", "tensor"), (jax.sharding.AxisType.Auto,) * 3
  batch_only = jax.sharding.AbstractMesh((2, 1, 1), axes, axis_types=auto)
  tensor = jax.sharding.AbstractMesh((1, 1, 2), axes, axis_types=auto)
  assert _products(merged, batch_only) == _products(merged)
  assert _products(merged, tensor) == _products(plain)


def test_config_names_the_field():
  with pytest.raises(FieldError, match="merge_projections"):
    ModelConfig(**MODEL, merge_projections="yes")
