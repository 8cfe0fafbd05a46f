"""`kernels.attention.causal_attention` (JAX's Pallas flash attention behind our padding and
grouped-query heads) against a plain causal softmax attention: forward in float64 (numpy),
gradients from the same plain formula in float32 under autodiff, on fresh random inputs.
Interpreted on a CPU; compiled on a GPU by tests/test_attention_implementations.py (`-m gpu`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import causal_attention
from tests.lowering import TRITON_CALL, abstract_gpu
from tests.numerics import rel_rms


def plain_attention(q, k, v, xp=jnp):
  """softmax(q k^T / sqrt(D) + causal mask) v; query head n reads key/value head n // (H/G)."""
  _, t, h, d = q.shape
  rep = h // k.shape[2]
  k, v = xp.repeat(k, rep, axis=2), xp.repeat(v, rep, axis=2)
  scores = xp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  scores = xp.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  scores = scores - scores.max(-1, keepdims=True)
  weights = xp.exp(scores)
  weights = weights / weights.sum(-1, keepdims=True)
  return xp.einsum("bhqk,bkhd->bqhd", weights, v)


def inputs(b, t, h, g, d, seed, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(kk, (b, t, g, d)) for kk in keys[1:3])
  cotangent = jax.random.normal(keys[3], (b, t, h, d))
  # dtype-representable values, so the float references see exactly the kernel's inputs
  q, k, v = (x.astype(dtype).astype(jnp.float32) for x in (q, k, v))
  return q, k, v, cotangent


# (B, T, H, G, D): grouped heads and D padded to 32; T over three 128-blocks, padded to 384;
# T below the smallest tile; one head.
SHAPES = [(2, 40, 4, 2, 24), (1, 300, 2, 2, 64), (1, 8, 2, 1, 16), (2, 70, 1, 1, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}G{}D{}".format(*s))
def test_matches_plain_attention(shape):
  q, k, v, cotangent = inputs(*shape, seed=sum(shape))
  want = plain_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), xp=np)
  assert rel_rms(causal_attention(q, k, v), want) < 1e-5

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * cotangent)

  got = jax.grad(lambda *a: loss(causal_attention, *a), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: loss(plain_attention, *a), argnums=(0, 1, 2))(q, k, v)
  for name, x, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
    assert rel_rms(x, r) < 1e-5, name


def test_bfloat16_inputs():
  q, k, v, _ = inputs(1, 130, 2, 2, 64, seed=5, dtype=jnp.bfloat16)
  got = causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert got.dtype == jnp.bfloat16
  assert rel_rms(got.astype(jnp.float32), plain_attention(q, k, v)) < 1e-2


def test_vmapped_over_seeds_is_each_seed():
  """The trainer vmaps the model over seeds: the kernel under vmap gives each seed's values,
  and gradients."""
  parts = [inputs(2, 48, 2, 1, 32, seed=s) for s in (11, 12)]
  q, k, v, cotangent = (jnp.stack(x) for x in zip(*parts, strict=True))

  def loss(q, k, v):
    return jnp.sum(jax.vmap(causal_attention)(q, k, v) * cotangent)

  out = jax.jit(jax.vmap(causal_attention))(q, k, v)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for s, (qs, ks, vs, cs) in enumerate(parts):
    assert rel_rms(out[s], plain_attention(qs, ks, vs)) < 1e-5
    ref = jax.grad(lambda *a, cs=cs: jnp.sum(plain_attention(*a) * cs), argnums=(0, 1, 2))(
        qs, ks, vs)
    for x, r in zip(grads, ref, strict=True):
      assert rel_rms(x[s], r) < 1e-5


def test_bad_input_is_named():
  q = jnp.zeros((1, 16, 4, 16))
  with pytest.raises(ValueError, match="G dividing H=4"):
    causal_attention(q, jnp.zeros((1, 16, 3, 16)), jnp.zeros((1, 16, 3, 16)))
  with pytest.raises(ValueError, match="share a dtype"):
    causal_attention(q, q.astype(jnp.bfloat16), q)
  with pytest.raises(ValueError, match=r"\[B,T,H,D\]"):
    causal_attention(q[0], q, q)


@pytest.mark.parametrize("t,d", [(8192, 64), (32768, 64), (300, 24)])
def test_lowers_for_a_gpu(t, d):
  """On any machine: the compiled (not interpreted) forward and backward lower through Pallas'
  Triton back end for an H200 (an abstract device stands in for the GPU), at the long-context
  shapes and at padded ones, under the seeds' vmap (the numbers on a GPU:
  tests/test_attention_implementations.py, `-m gpu`)."""
  q = jax.ShapeDtypeStruct((2, 1, t, 4, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1, t, 2, d), jnp.bfloat16)

  def loss(q, k, v):
    out = jax.vmap(lambda *a: causal_attention(*a, interpret=False))(q, k, v)
    return jnp.sum(out.astype(jnp.float32))

  with abstract_gpu():
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
        lowering_platforms=("cuda",))
  text = lowered.as_text()
  # the forward, the backward's preprocessing (o . dO) and the fused dq, dk, dv kernel
  assert text.count(TRITON_CALL) == 3
  for name in ("mha_forward", "mha_backward"):
    assert name in text, name
