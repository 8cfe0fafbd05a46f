"""ModelConfig.mlp_implementation="pallas_triton": the SwiGLU MLP through `kernels.swiglu`
(interpreted here) in the hybrid model, against XLA's MLP: the same parameters, the same logits
and gradients (the plain forward: training, replay and decode share its blocks); and the refusal
on a mesh of several devices (the kernels are not partitioned)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sleep_lm.common.validation import FieldError
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params
from tests.numerics import rel_rms

# The model with the kernels: same parameters, same values as XLA's MLP.
MODEL = dict(vocab_size=16, d_model=64, attn_head_dim=32, gdn_head_dim=32, mlp_dim=128, window=8,
             layers=("attn", "gdn"))


def test_the_model_with_the_kernels_has_xlas_parameters_logits_and_gradients():
  configs = {impl: ModelConfig(**MODEL, mlp_implementation=impl)
             for impl in ("pallas_triton", "xla")}
  params = {impl: nn.meta.unbox(init_params(c, jax.random.key(0))) for impl, c in configs.items()}
  same = jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
                      params["pallas_triton"], params["xla"])
  assert all(jax.tree.leaves(same))
  tokens = jax.random.randint(jax.random.key(1), (2, MODEL["window"]), 0, 16)
  probe = jax.random.normal(jax.random.key(2), (2, MODEL["window"], 16))

  def loss(p, impl):
    return jnp.sum(HybridLM(configs[impl]).apply({"params": p}, tokens) * probe)

  grads = {impl: str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params["xla"], impl))
           for impl in configs}
  assert "swiglu_up_bwd" in grads["pallas_triton"] and "swiglu" not in grads["xla"]
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  got = value_and_grad(params["xla"], "pallas_triton")
  want = value_and_grad(params["xla"], "xla")
  assert rel_rms(got[0], want[0]) < 1e-5
  errors = jax.tree.map(rel_rms, got[1], want[1])
  assert max(jax.tree.leaves(errors)) < 1e-4, errors
  mlp_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(got[1])
               if "mlp" in jax.tree_util.keystr(path) and "norm" not in jax.tree_util.keystr(path)]
  assert len(mlp_grads) == 6 and all(float(jnp.abs(g).max()) > 0 for g in mlp_grads)


def test_the_kernels_refuse_a_mesh_of_several_devices():
  config = ModelConfig(**MODEL, mlp_implementation="pallas_triton")
  mesh = jax.sharding.AbstractMesh((2,), ("data",))
  with jax.sharding.use_abstract_mesh(mesh), pytest.raises(
      FieldError, match="mlp_implementation.*one device.*this mesh has 2"):
    jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


@pytest.mark.parametrize("fields,match", [
    ({"d_model": 96, "mlp_dim": 128}, "d_model=96, MLP width 128"),
    ({"d_model": 64, "mlp_dim": 96}, "d_model=64, MLP width 96"),
    ({"mlp_implementation": "triton"}, "mlp_implementation"),
])
def test_config_names_what_the_kernels_cannot_run(fields, match):
  config = {**MODEL, "mlp_implementation": "pallas_triton", **fields}
  with pytest.raises(FieldError, match=match):
    ModelConfig(**config)
