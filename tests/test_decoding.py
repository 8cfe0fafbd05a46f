"""The decode fast path's structure (sleep_lm.inference.decoding, sleep_lm.model.layers layouts),
on the CPU.

What a GPU profile showed (docs/inference.md): for batch 1, XLA rewrites each vector-matrix
product as multiply + reduce and fused that reduce into the concatenate of the GDN conv history,
where it ran one output element per thread (85% of the step). The decode layouts put every
product behind an optimization barrier; the test below reads the generation loop's program and
fails on any concatenate or dynamic-update-slice that a product reaches without one (the
training layout, the old formulation, has them: the check can fail). Also: the layouts compute
the training forward's values, the argument count of the loop is what the layout says, and the
loop compiles once for any count and context.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.inference.stream import Stream
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params
from sleep_lm.model.layers import LAYOUTS

# Primitives whose inner program is the same computation (inputs map to the caller's values);
# loops and conditionals start afresh (XLA does not fuse across their boundaries).
_INLINE = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
           "remat", "checkpoint")
_MOVES = ("concatenate", "dynamic_update_slice")


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def fused_product_hazards(jaxpr, tainted=None, where="") -> list[str]:
  """The concatenates and dynamic-update-slices of `jaxpr` that a dot_general output reaches
  through any chain of operations without an optimization_barrier in between."""
  taint = dict(zip(jaxpr.invars, tainted or [False] * len(jaxpr.invars), strict=True))
  hazards = []
  get = lambda v: taint.get(v, False) if isinstance(v, jax.extend.core.Var) else False
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [get(v) for v in eqn.invars]
    if name in _MOVES and any(ins):
      hazards.append(f"{where}{name} {[tuple(v.aval.shape) for v in eqn.invars]}")
    subs = list(_subjaxprs(eqn))
    if name in _INLINE and len(subs) == 1:
      sub = subs[0]
      inner_taint = ins if len(sub.invars) == len(ins) else None
      hazards += fused_product_hazards(sub, inner_taint, f"{where}{name}/")
      outs = [any(ins)] * len(eqn.outvars)     # conservative: tainted if any input is
    else:
      for sub in subs:
        hazards += fused_product_hazards(sub, None, f"{where}{name}/")
      outs = ([True] * len(eqn.outvars) if name == "dot_general"
              else [False] * len(eqn.outvars) if name == "optimization_barrier" or subs
              else [any(ins)] * len(eqn.outvars))
    taint.update(zip(eqn.outvars, outs, strict=True))
  return hazards


def small_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=7, d_model=32, layers=("attn", "gdn"), attn_head_dim=16,
              gdn_head_dim=16, mlp_dim=48, window=6, passes=2)
  return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def params():
  cfg = small_config()
  return nn.meta.unbox(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)))


def loop_jaxpr(stream: Stream):
  args = (stream.params, stream.state, jnp.zeros((stream.batch, stream.config.vocab_size)),
          jax.random.key(0), 0, 3)
  return jax.make_jaxpr(lambda *a: stream.fns.generate(*a, steps=6))(*args).jaxpr


def test_no_product_reaches_a_concatenate_without_a_barrier(params):
  cfg = small_config(eviction="sliding")
  assert fused_product_hazards(loop_jaxpr(Stream(cfg, params, 1))) == []
  # The training layout (the formulation a GPU profile found slow) has them: the conv history
  # concatenates the q, k, v projections, the cache writes take k and v.
  old = fused_product_hazards(loop_jaxpr(Stream(cfg, params, 1, layout="train")))
  assert sum("concatenate" in h for h in old) >= 3, old
  assert any("dynamic_update_slice" in h for h in old), old


def test_argument_count_of_the_decode_loop(params):
  """Per call of the loop: 6 arrays per attention layer (norms, qkv, out, gate|up, down), 10 per
  GDN layer (norms, in_proj, conv taps, A_log, dt_bias, out_norm, out_proj, gate|up, down), 3
  more (embedding, final norm, head); the state 2 per layer, the position and the wake features.
  The training layout needs 9 and 18 per layer (the 300m size: 131 + 34 against 219 + 34)."""
  stream = Stream(small_config(), params, 1)
  assert len(jax.tree.leaves(stream.params)) == 6 + 10 + 3
  assert len(jax.tree.leaves(stream.state)) == 2 * 2 + 2
  assert len(jax.tree.leaves(Stream(small_config(), params, 1, layout="train").params)) == (
      9 + 18 + 3)


@pytest.mark.parametrize("layout", ["cols", "gemm", "gemv", "rows_xbar",
                                    pytest.param("train", marks=pytest.mark.slow)])
def test_every_layout_computes_the_training_forward(params, layout):
  """Batch 1, two single tokens (the shapes where the layouts differ: the gemm layout pads the
  row, the gemv layout runs the Pallas kernel (interpreted here), the fused ones barrier and
  split, rows_xbar barriers the inputs too) against the plain forward in the training layout."""
  cfg = small_config(passes=1)
  tokens = np.array([[3, 5]], np.int32)
  want = jax.jit(HybridLM(cfg).apply)({"params": params}, tokens)
  stream = Stream(cfg, params, 1, layout=layout)
  got = jnp.concatenate([stream.feed(tokens[:, :1]), stream.feed(tokens[:, 1:])], axis=1)
  err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  assert err < 1e-5, err
  # The gemv layout's decode step runs the kernel for every product: 4 per layer and the head.
  kernels_run = str(loop_jaxpr(stream)).count("name=gemv")
  assert kernels_run == (4 * len(cfg.layers) + 1 if layout == "gemv" else 0), kernels_run
  assert set(LAYOUTS) == {"train", "rows", "cols", "gemm", "gemv", "rows_xbar"}
  with pytest.raises(ValueError, match="layout: must be one of"):
    Stream(cfg, params, 1, layout="columns")
