"""Attention implementations on the training path (`ModelConfig.attention_implementation`; the
long-context configs use cuDNN: docs/tasks.md).

On a CPU (default run): every attention call of parameter creation and of a hard-eviction or
full-cache training forward says `is_causal` and passes no mask. A broadcast [1, 1, T, T] mask
is what cuDNN's vmap rule cannot batch (the vmapped seeds' init failed on the GPU with "cannot
reshape array of shape (1, 1, 1, 8, 8)"), and at 32K it would be a 2 GiB bias. "pallas_triton"
(JAX's Pallas flash attention, `kernels.attention`, interpreted here) gives XLA's values: the
full-cache model's loss and gradients under the seeds' vmap and remat of each layer, the
hard-eviction hybrid's forward, and the full-cache decode stream (its masked calls run XLA's).

On the GPU (`-m gpu`): cuDNN and the Pallas kernel against XLA's attention at the long-context
shapes, forward and gradients, vmapped like the seeds; the whole training loss and gradients of
the long-context attention model (experiments/long_context.py's 8k stage: one window of 8,192
tokens, remat of each layer) under each; and the vmapped init with cuDNN itself. (The attention
model scored 0 after its 8k stage on the GPU while the hybrids, cuDNN over windows of 2,048,
learned: these say whether cuDNN's path at T >= 8,192 is the cause; docs/results.md, "Past 32K
tokens".)
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.inference.stream import Stream
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params
from sleep_lm.model.layers import causal_attention
from sleep_lm.model.sleep import sleep_forward
from sleep_lm.training.step import loss_fn
from tests.numerics import rel_rms

BASE = dict(vocab_size=16, d_model=32, attn_head_dim=16, gdn_head_dim=16, mlp_dim=48, window=8)
CONFIGS = {
    "hybrid_hard": ModelConfig(layers=("attn", "gdn"), eviction="hard", passes=2, **BASE),
    "attn_none": ModelConfig(layers=("attn", "attn"), eviction="none", **BASE),
}


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


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def test_pallas_full_cache_training_matches_xla():
  """The long-context attention model's shape of training (eviction none, remat of each layer,
  two vmapped seeds) at a small size: loss and gradients under the Pallas kernel and XLA."""
  config = dataclasses.replace(CONFIGS["attn_none"], remat="blocks", window=40)
  params = jax.vmap(lambda k: init_params(config, k))(jax.random.split(jax.random.key(0), 2))
  tokens = jax.random.randint(jax.random.key(1), (2, 2, 40), 0, config.vocab_size)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, -1),
           "loss_mask": jnp.ones(tokens.shape, jnp.int32)}

  def loss_and_grads(implementation):
    cfg = dataclasses.replace(config, attention_implementation=implementation)
    grad = jax.value_and_grad(lambda p, b: loss_fn(p, cfg, b)[0])
    return jax.jit(jax.vmap(grad))(params, batch)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grads("pallas_triton"), loss_and_grads("xla")
  assert rel_rms(loss, ref_loss) < 1e-6
  assert rel_rms(_flat(grads), _flat(ref_grads)) < 1e-5


def test_pallas_hybrid_and_decode_match_xla():
  """Hard eviction over three windows, two passes (each window's own causal attention) and the
  full-cache decode stream (prefill causal, then steps against the cache: XLA's masked calls)."""
  hybrid = CONFIGS["hybrid_hard"]
  tokens = jax.random.randint(jax.random.key(2), (2, 3 * hybrid.window), 0, hybrid.vocab_size)
  params = nn.meta.unbox(init_params(hybrid, jax.random.key(3)))
  mask = jnp.ones(tokens.shape)
  logits = {impl: sleep_forward(dataclasses.replace(hybrid, attention_implementation=impl),
                                params, tokens, mask).logits for impl in ("pallas_triton", "xla")}
  assert rel_rms(logits["pallas_triton"], logits["xla"]) < 1e-5

  full = dataclasses.replace(CONFIGS["attn_none"], attention_implementation="pallas_triton")
  params = nn.meta.unbox(init_params(full, jax.random.key(4)))
  stream = Stream(full, params, 2, capacity=tokens.shape[1])
  got = jnp.concatenate([stream.feed(tokens[:, :5])] +
                        [stream.feed(tokens[:, i:i + 1]) for i in range(5, tokens.shape[1])], 1)
  want = HybridLM(dataclasses.replace(full, attention_implementation="xla")).apply(
      {"params": params}, tokens)
  assert rel_rms(got, want) < 1e-5


def test_pallas_has_no_band():
  x = jnp.zeros((1, 16, 2, 16))
  with pytest.raises(ValueError, match="attention_implementation: 'pallas_triton' has no"):
    causal_attention(x, x, x, 4, "pallas_triton")


def _attention(implementation, q, k, v):
  return causal_attention(q, k, v, None, implementation)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["cudnn", "pallas_triton"])
@pytest.mark.parametrize("t", [2048, 8192, 32768])
def test_memory_efficient_attention_matches_xla_vmapped(t, implementation):
  """The seeds' vmap over cuDNN's or the Pallas kernel's causal attention at the long-context
  lengths, bf16 inputs, forward and all three gradients against XLA's attention in float32 on
  the same values."""
  if jax.default_backend() != "gpu":
    pytest.skip("cuDNN and Triton need a GPU")
  seeds, b, d = 2, 1, 64
  h = 1 if t > 8192 else 2          # XLA's float32 reference at 32K: 8.6 GB per [T, T] tensor
  keys = jax.random.split(jax.random.key(t), 4)
  # bf16-representable inputs, so the float32 reference differs from cuDNN only by its arithmetic
  q, k, v = (jax.random.normal(kk, (seeds, b, t, h, d)).astype(jnp.bfloat16).astype(jnp.float32)
             for kk in keys[:3])
  cotangent = jax.random.normal(keys[3], (seeds, b, t, h, d), jnp.float32)

  def loss(implementation, dtype, q, k, v):
    out = jax.vmap(lambda *a: _attention(implementation, *a))(
        q.astype(dtype), k.astype(dtype), v.astype(dtype))
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grad = lambda impl, dtype: jax.jit(jax.grad(lambda *a: loss(impl, dtype, *a), argnums=(0, 1, 2),
                                              has_aux=True))(q, k, v)
  (dq, dk, dv), out = grad(implementation, jnp.bfloat16)
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


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["cudnn", "pallas_triton"])
@pytest.mark.parametrize("stage", ["8k"])   # XLA's reference at 32K would hold ~100 GB of scores
def test_long_context_attention_loss_matches_xla(stage, implementation):
  """The long-context attention model's training loss and gradients, 2 vmapped seeds, batch 1,
  random parameters and tokens (the loss on the last 18 positions, as the task's answer region):
  cuDNN or the Pallas kernel against XLA's attention, all in the config's bf16."""
  if jax.default_backend() != "gpu":
    pytest.skip("cuDNN and Triton need a GPU")
  from experiments import long_context
  from sleep_lm.training.run_config import RunConfig
  run = RunConfig.from_config(long_context.get_config(f"gpu,attn,{stage},seeds=2,init=unused"))
  assert run.model.attention_implementation == "cudnn" and run.model.remat == "blocks"
  t = long_context.seq_len(long_context.get_config(f"attn,{stage},init=unused"))
  params = jax.vmap(lambda k: init_params(run.model, k))(jax.random.split(jax.random.key(0), 2))
  tokens = jax.random.randint(jax.random.key(1), (2, 1, t), 0, run.model.vocab_size)
  mask = jnp.zeros((2, 1, t), jnp.int32).at[..., -18:].set(1)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, -1), "loss_mask": mask}

  def loss_and_grads(implementation):
    cfg = dataclasses.replace(run.model, attention_implementation=implementation)
    grad = jax.value_and_grad(lambda p, b: loss_fn(p, cfg, b)[0])
    return jax.jit(jax.vmap(grad))(params, batch)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grads(implementation), loss_and_grads("xla")
  assert rel_rms(loss, ref_loss) < 1e-2, (loss, ref_loss)
  g, r = _flat(grads), _flat(ref_grads)
  assert rel_rms(g, r) < 5e-2, f"{stage}: gradients' relative RMS {rel_rms(g, r):.3g}"
