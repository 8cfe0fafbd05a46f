"""Building blocks of the hybrid model (Flax linen, pure functions of params and inputs).

Shape legend: B batch, T tokens in the current pass, P retained prefix tokens, D d_model,
H heads, K key head dim, V value head dim, F MLP hidden width.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) from this set, which
`sleep_lm.sharding` maps to mesh axes:
  "vocab", "embed" (d_model), "mlp" (F), "heads" (H * head dim, flattened), "head_dim" (per-head
  norm gains), "gdn_heads" (one scalar per GDN head), "conv" (conv taps).
Activations at block boundaries carry ("batch", "activation_length", "activation_embed").
Projections are 2-D matrices (heads flattened) so that Muon sees every weight matrix as 2-D.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from sleep_lm import sharding
from sleep_lm.config import ModelConfig

P = nn.with_logical_partitioning
Array = jax.Array
f32 = jnp.float32


def dense(features: int, axes: tuple[str, str], dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=f32, name=name,
                  kernel_init=P(nn.initializers.lecun_normal(), axes))


def _params(module: nn.Module) -> dict:
  """The (unboxed) parameters of a bound module, for its methods that are not @compact."""
  return nn.meta.unbox(module.variables["params"])


def _dense_forward(params: dict, x: Array, dtype: Any) -> Array:
  """A `dense` layer's forward on its parameter dict, callable outside @compact methods (the
  same nn.Dense as `dense`, detached from any parent module)."""
  return nn.Dense(params["kernel"].shape[-1], use_bias=False, dtype=dtype, param_dtype=f32,
                  parent=None).apply({"params": params}, x)


class RMSNorm(nn.Module):
  """RMS normalisation over the last axis, computed in float32, with a learned gain."""
  dtype: Any = f32
  axis_name: str = "embed"
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gain = self.param("scale", P(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), f32)
    x32 = x.astype(f32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * gain).astype(self.dtype)


class SwiGLU(nn.Module):
  """x -> W_down (SiLU(W_gate x) * W_up x)."""
  hidden_dim: int
  dtype: Any = f32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gate = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, "gate")(x)
    up = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, "up")(x)
    return dense(x.shape[-1], ("mlp", "embed"), self.dtype, "down")(nn.silu(gate) * up)


def apply_rope(x: Array, positions: Array, base: float) -> Array:
  """Rotary embedding on [B,T,H,K] at absolute `positions` [T] (rotate-half convention)."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=f32) / half)
  angles = positions.astype(f32)[:, None] * freqs[None, :]               # [T, K/2]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(f32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class CausalDepthwiseConv(nn.Module):
  """Causal depthwise 1-D convolution that restarts at every segment boundary.

  `segment_pos` [T] is each token's position inside its window: tap j (looking j tokens back)
  only reads a token of the same window, i.e. when segment_pos >= j. Windows are evicted whole,
  so no convolution history crosses a window boundary.
  """
  kernel_size: int
  dtype: Any = f32

  @nn.compact
  def __call__(self, x: Array, segment_pos: Array) -> Array:
    channels = x.shape[-1]
    init = nn.initializers.normal(stddev=1.0 / math.sqrt(self.kernel_size))
    w = self.param("kernel", P(init, ("conv", "heads")), (self.kernel_size, channels), f32)
    w = w.astype(self.dtype)
    out = x * w[0]
    for j in range(1, self.kernel_size):
      shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, : x.shape[1]]
      keep = (segment_pos >= j)[None, :, None]
      out = out + jnp.where(keep, shifted, 0) * w[j]
    return out


class Attention(nn.Module):
  """Causal softmax attention over the window's own keys/values and an optional prefix.

  `mask` [1 or B, 1, T, P+T] says which keys each query sees. Returns the output and the
  window's own (RoPE-rotated) keys and values, which the sliding variant retains.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               prefix: tuple[Array, Array] | None) -> tuple[Array, tuple[Array, Array]]:
    cfg = self.config
    b, t, _ = x.shape
    h, d = cfg.num_attn_heads, cfg.attn_head_dim
    dt = cfg.activation_dtype
    proj = lambda name: dense(h * d, ("embed", "heads"), dt, name)(x).reshape(b, t, h, d)
    q = apply_rope(proj("q"), positions, cfg.rope_base)
    k = apply_rope(proj("k"), positions, cfg.rope_base)
    v = proj("v")
    keys, values = k, v
    if prefix is not None:
      keys = jnp.concatenate([prefix[0].astype(dt), k], axis=1)
      values = jnp.concatenate([prefix[1].astype(dt), v], axis=1)
    o = jax.nn.dot_product_attention(q, keys, values, mask=mask,
                                     implementation=cfg.attention_implementation)
    out = dense(cfg.d_model, ("heads", "embed"), dt, "out")(o.reshape(b, t, h * d))
    return out, (k, v)

  def step(self, x: Array, positions: Array, cache: tuple[Array, Array], slot: Array, *,
           mask: Array | None = None, kv_lengths: Array | None = None
           ) -> tuple[Array, tuple[Array, Array]]:
    """Decode: T new tokens x [B,T,D] at absolute `positions` [T] against a fixed-size cache.

    Writes their (RoPE'd) keys/values into slots [slot, slot+T) of `cache` (keys, values
    [B,C,H,K], C fixed: its shape never depends on the context length) and attends to the
    whole cache under `mask` [1,1,T,C] (which slots each query sees, by key position) or, for
    one query over a cache filled from slot 0, `kv_lengths` [B] (the cuDNN path). Same
    parameters and math as `__call__`; returns the output and the updated cache.
    """
    cfg = self.config
    p = _params(self)
    b, t, _ = x.shape
    h, d = cfg.num_attn_heads, cfg.attn_head_dim
    dt = cfg.activation_dtype
    proj = lambda name: _dense_forward(p[name], x, dt).reshape(b, t, h, d)
    q = apply_rope(proj("q"), positions, cfg.rope_base)
    k = apply_rope(proj("k"), positions, cfg.rope_base)
    v = proj("v")
    at = (0, slot, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
    values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
    o = jax.nn.dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=mask,
                                     key_value_seq_lengths=kv_lengths,
                                     implementation=cfg.attention_implementation)
    out = _dense_forward(p["out"], o.reshape(b, t, h * d), dt)
    return out, (keys, values)


def _inverse_softplus(x: Array) -> Array:
  return x + jnp.log(-jnp.expm1(-x))


class GatedDeltaNet(nn.Module):
  """Gated DeltaNet mixer (paper.md, "Blocks"): fast-weight state S [B,H,K,V] in and out.

  q, k, v: projection -> causal depthwise conv -> SiLU; q and k L2-normalised (inside the op),
  q scaled by K^-1/2. g = -exp(A_log) * softplus(W_a x + dt_bias), beta = sigmoid(W_b x).
  Output: RMSNorm(o) * SiLU(W_gate x) per head, heads concatenated, output projection.
  Tokens with valid = False (padding) get g = 0 and beta = 0, so they leave S unchanged.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, state: Array, segment_pos: Array,
               valid: Array) -> tuple[Array, Array]:
    cfg = self.config
    b, t, _ = x.shape
    h, d = cfg.num_gdn_heads, cfg.gdn_head_dim
    dt = cfg.activation_dtype

    def conv_branch(name):
      y = dense(h * d, ("embed", "heads"), dt, f"{name}_proj")(x)
      y = CausalDepthwiseConv(cfg.conv_kernel, dt, name=f"{name}_conv")(y, segment_pos)
      return nn.silu(y).reshape(b, t, h, d)

    q, k, v = conv_branch("q"), conv_branch("k"), conv_branch("v")
    a = dense(h, ("embed", "gdn_heads"), dt, "a_proj")(x).astype(f32)
    beta_logit = dense(h, ("embed", "gdn_heads"), dt, "b_proj")(x).astype(f32)

    def a_log_init(key, shape, dtype):
      return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))

    def dt_bias_init(key, shape, dtype):
      step = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
      return _inverse_softplus(step)

    a_log = self.param("A_log", P(a_log_init, ("gdn_heads",)), (h,), f32)
    dt_bias = self.param("dt_bias", P(dt_bias_init, ("gdn_heads",)), (h,), f32)
    g = -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias)
    beta = jax.nn.sigmoid(beta_logit)
    keep = valid.astype(f32)[None, :, None]
    g, beta = g * keep, beta * keep

    chunk = next(c for c in (16, 32, 64) if c >= min(t, cfg.chunk_size))
    o, state = sharded_fast_weight_op(
        cfg.rule, q, k, v, g, beta, state, use_qk_l2norm=True, chunk_size=chunk,
        implementation=cfg.kernel_implementation)
    gate = dense(h * d, ("embed", "heads"), dt, "gate_proj")(x).reshape(b, t, h, d)
    o = RMSNorm(dt, axis_name="head_dim", name="out_norm")(o) * nn.silu(gate)
    out = dense(cfg.d_model, ("heads", "embed"), dt, "out_proj")(o.reshape(b, t, h * d))
    return out, state

  def step(self, x: Array, state: Array, conv_state: tuple[Array, ...], segment_pos: Array
           ) -> tuple[Array, Array, tuple[Array, ...]]:
    """Decode: T new tokens x [B,T,D] of the current window (no padding), one recurrent step
    per token for T = 1.

    `segment_pos` [T]: the tokens' positions inside their window. `conv_state`: for q, k and
    v, the projected inputs [B,kernel-1,H*K] of the window's previous kernel-1 tokens (slots
    before the window's start are never read: the conv masks them by segment position, as it
    restarts every window in `__call__`). Same parameters and math as `__call__`; returns the
    output, the new state S and the new conv state.
    """
    cfg = self.config
    p = _params(self)
    b, t, _ = x.shape
    h, d = cfg.num_gdn_heads, cfg.gdn_head_dim
    dt = cfg.activation_dtype
    history = cfg.conv_kernel - 1
    seg = jnp.concatenate([segment_pos[0] - history + jnp.arange(history), segment_pos])

    def conv_branch(name, past):
      y = _dense_forward(p[f"{name}_proj"], x, dt)
      y = jnp.concatenate([past.astype(dt), y], axis=1)                  # [B,kernel-1+T,H*K]
      out = CausalDepthwiseConv(cfg.conv_kernel, dt, parent=None).apply(
          {"params": p[f"{name}_conv"]}, y, seg)[:, history:]
      return nn.silu(out).reshape(b, t, h, d), y[:, t:]

    (q, q_past), (k, k_past), (v, v_past) = (
        conv_branch(name, past) for name, past in zip("qkv", conv_state, strict=True))
    a = _dense_forward(p["a_proj"], x, dt).astype(f32)
    beta = jax.nn.sigmoid(_dense_forward(p["b_proj"], x, dt).astype(f32))
    g = -jnp.exp(p["A_log"]) * jax.nn.softplus(a + p["dt_bias"])
    chunk = next(c for c in (16, 32, 64) if c >= min(t, cfg.chunk_size))
    impl = "recurrent" if t == 1 else cfg.kernel_implementation
    o, state = kernels.RULES[cfg.rule](
        q, k, v, g, beta, initial_state=state, use_qk_l2norm=True, chunk_size=chunk,
        implementation=impl)
    gate = _dense_forward(p["gate_proj"], x, dt).reshape(b, t, h, d)
    o = RMSNorm(dt, axis_name="head_dim", parent=None).apply({"params": p["out_norm"]}, o)
    out = _dense_forward(p["out_proj"], (o * nn.silu(gate)).reshape(b, t, h * d), dt)
    return out, state, (q_past, k_past, v_past)


def sharded_fast_weight_op(rule: str, q: Array, k: Array, v: Array, g: Array, beta: Array,
                           state: Array, **kwargs) -> tuple[Array, Array]:
  """`kernels.RULES[rule]` run by every device on its own batch rows and heads.

  The Pallas kernels are custom calls that XLA cannot partition: called on sharded operands
  inside `jax.jit`, XLA would all-gather them and run the whole op on every device. The op is
  independent across batch rows and heads, so under `jax.shard_map` each device runs it on its
  shard with no communication at all. Specs (`sharding.fast_weight_specs`): batch over the
  mesh axes of the "batch" rule, heads over those of "gdn_heads", from the context mesh
  (`jax.set_mesh`) and flax's logical-axis rules; without a mesh (or on one device) it is the
  plain call. It composes with the `jax.vmap` over seeds around the train step.

  check_vma=False: the Pallas kernels declare their outputs without a varying-mesh-axes type,
  which check_vma=True rejects; the specs above are exact (every output is split like its
  inputs), and tests/test_sharding.py checks values and gradients against the plain call.
  """
  op = functools.partial(kernels.RULES[rule], **kwargs)
  call = lambda q, k, v, g, beta, s: op(q, k, v, g, beta, initial_state=s)
  specs = sharding.fast_weight_specs(q.shape)
  if specs is None:
    return call(q, k, v, g, beta, state)
  x4, x3, st = specs
  return jax.shard_map(call, in_specs=(x4, x4, x4, x3, x3, st), out_specs=(x4, st),
                       check_vma=False)(q, k, v, g, beta, state)
