"""cuDNN attention on the training path (the long-context configs use it: docs/tasks.md).

On a CPU (default run): every attention call of parameter creation and of a hard-eviction or
full-cache training forward says `is_causal` and passes no mask. A broadcast [1, 1, T, T] mask
is what cuDNN's vmap rule cannot batch (the vmapped seeds' init failed on the GPU with "cannot
reshape array of shape (1, 1, 1, 8, 8)"), and at 32K it would be a 2 GiB bias.

On the GPU (`-m gpu`): cuDNN against XLA's attention at the long-context shapes, forward and
gradients, vmapped like the seeds; and the vmapped init with cuDNN itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import init_params
from sleep_lm.model.sleep import sleep_forward

BASE = dict(vocab_size=16, d_model=32, attn_head_dim=16, gdn_head_dim=16, mlp_dim=48, window=8)
CONFIGS = {
    "hybrid_hard": ModelConfig(layers=("attn", "gdn"), eviction="hard", passes=2, **BASE),
    "attn_none": ModelConfig(layers=("attn", "attn"), eviction="none", **BASE),
}


def rel_rms(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))


@pytest.fixture
def attention_calls(monkeypatch):
  """The keyword arguments of every jax.nn.dot_product_attention call (the real one runs)."""
  calls, real = [], jax.nn.dot_product_attention

  def recording(*args, **kwargs):
    calls.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  return calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_attention_is_causal_without_a_mask(name, attention_calls):
  config = CONFIGS[name]
  seeds = jax.random.split(jax.random.key(0), 2)
  params = jax.vmap(lambda k: init_params(config, k))(seeds)      # as the trainer's seeds
  assert attention_calls, "init made no attention call: the check would be empty"
  init_calls = len(attention_calls)
  tokens = jax.random.randint(jax.random.key(1), (2, 3 * config.window), 0, config.vocab_size)
  sleep_forward(config, jax.tree.map(lambda p: p[0], params), tokens, jnp.ones_like(tokens))
  assert len(attention_calls) > init_calls
  for kwargs in attention_calls:
    assert kwargs.get("is_causal") is True and kwargs.get("mask") is None, kwargs


def _attention(implementation, q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [2048, 8192, 32768])
def test_cudnn_matches_xla_vmapped(t):
  """The seeds' vmap over cuDNN's causal attention at the long-context lengths, bf16 inputs,
  forward and all three gradients against XLA's attention in float32."""
  if jax.default_backend() != "gpu":
    pytest.skip("cuDNN needs a GPU")
  seeds, b, h, d = 2, 1, 4, 64
  keys = jax.random.split(jax.random.key(t), 4)
  q, k, v = (jax.random.normal(kk, (seeds, b, t, h, d), jnp.float32) for kk in keys[:3])
  cotangent = jax.random.normal(keys[3], (seeds, b, t, h, d), jnp.float32)

  def loss(implementation, dtype, q, k, v):
    out = jax.vmap(lambda *a: _attention(implementation, *a))(
        q.astype(dtype), k.astype(dtype), v.astype(dtype))
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grad = lambda impl, dtype: jax.jit(jax.grad(lambda *a: loss(impl, dtype, *a), argnums=(0, 1, 2),
                                              has_aux=True))(q, k, v)
  (dq, dk, dv), out = grad("cudnn", jnp.bfloat16)
  (rq, rk, rv), ref = grad("xla", jnp.float32)
  for name, x, r in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
    assert rel_rms(x, r) < 2e-2, f"T={t} {name}: relative RMS {rel_rms(x, r):.3g}"


@pytest.mark.gpu
def test_vmapped_init_with_cudnn():
  if jax.default_backend() != "gpu":
    pytest.skip("cuDNN needs a GPU")
  config = ModelConfig(layers=("attn", "gdn"), attention_implementation="cudnn",
                       dtype="bfloat16", **{**BASE, "attn_head_dim": 64, "d_model": 128})
  params = jax.vmap(lambda k: init_params(config, k))(jax.random.split(jax.random.key(0), 3))
  assert all(jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params))
