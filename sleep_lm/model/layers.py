"""Building blocks of the hybrid model (Flax linen, pure functions of params and inputs).

Shape legend: B batch, T tokens in the current call, P retained prefix tokens, C cache slots,
D d_model, H heads, K key head dim, V value head dim, F MLP hidden width.

One block (`Block`: norm, mixer, norm, SwiGLU) serves every pass: a training pass over a window,
a replay (sleep) pass, prefill, and a decode step of one token. Its `__call__(h, ctx, cache)`
returns `(h, new_cache)`; `Context` says where the tokens sit, the typed cache (`AttentionCache`,
`GDNCache`) what the mixer carries between calls.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) from this set, which
`sleep_lm.model.sharding` maps to mesh axes:
  "vocab", "embed" (d_model), "mlp" (F), "heads" (H * head dim, flattened), "head_dim" (per-head
  norm gains), "gdn_heads" (one scalar per GDN head), "conv" (conv taps).
Activations at block boundaries carry ("batch", "activation_length", "activation_embed").
Projections are 2-D matrices (heads flattened) so that Muon sees every weight matrix as 2-D.

Parameter layouts (`Layout`): training keeps one [in, out] matrix per projection (Muon
orthogonalises each). A decode layout is the same weights rearranged once, when a stream is built
(`convert_params`): projections that read one input fused into one matrix, stored [out, in], each
product's output behind an optimization barrier (see `Layout`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

import kernels
import kernels.gemv
import kernels.swiglu
from kernels.attention import causal_attention as flash_causal_attention
from kernels.gated_delta_rule.base import CHUNK_SIZES
from sleep_lm.common.validation import expect
from sleep_lm.model import sharding
from sleep_lm.model.config import ModelConfig

P = nn.with_logical_partitioning
Array = jax.Array
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the weight matrices are stored and multiplied.

  fused: the projections that read one input are one matrix (attention q|k|v, GDN
    q|k|v|gate|a|b, SwiGLU gate|up; the GDN conv taps q|k|v likewise), and every product's
    output passes `jax.lax.optimization_barrier`. For batch 1, XLA's GPU compiler rewrites a
    vector-matrix product as multiply + reduce and may fuse that reduce into a consumer such as
    the concatenate of the conv history, where it runs one output element per thread (measured:
    85% of a decode step). The barrier leaves each product a kernel of its own.
  transposed: matrices stored [out, in]: that batch-1 reduce then runs along the contiguous axis
    (a row reduction) instead of down the columns.
  pad_single_row: a product with one row is computed on two (the second zeros), which XLA keeps
    a matrix multiplication (cuBLAS) instead of a reduce.
  gemv: with transposed, a product with one row runs `kernels.gemv.gemv` (a Pallas Triton
    kernel over the [out, in] matrix; interpreted off a GPU). Measured on an H200: 11% slower
    than `rows` end to end (docs/inference.md), kept as the measured alternative.
  barrier_inputs: each product's input also passes `jax.lax.optimization_barrier`, so XLA
    cannot fuse the ops that make it (norm, cast, gating) into the product's multiply + reduce.
    Measured on an H200: no gain over `rows` (the slow products are not slowed by producers).
  """
  fused: bool = False
  transposed: bool = False
  pad_single_row: bool = False
  gemv: bool = False
  barrier_inputs: bool = False


TRAIN = Layout()
# Decode layouts by name (`Stream(layout=...)`, experiments/inference_latency.py --layouts).
LAYOUTS: Mapping[str, Layout] = {
    "train": TRAIN,                                # as trained (the unfused baseline)
    "rows": Layout(fused=True, transposed=True),
    "cols": Layout(fused=True),
    "gemm": Layout(fused=True, transposed=True, pad_single_row=True),
    # Two measured alternatives to "rows", both slower on an H200 (docs/inference.md).
    "gemv": Layout(fused=True, transposed=True, gemv=True),
    "rows_xbar": Layout(fused=True, transposed=True, barrier_inputs=True),
}


def layout_named(name: str) -> Layout:
  if name not in LAYOUTS:
    raise ValueError(f"layout: must be one of {sorted(LAYOUTS)}, got {name!r}")
  return LAYOUTS[name]


@flax.struct.dataclass
class Context:
  """Where the T tokens of a call sit, shared by every layer of the call.

  positions: [T] absolute token positions (RoPE).
  segment_pos: [T] positions inside the current window (the GDN conv restarts at 0).
  valid: [T] bool, False for padding past the end of a sequence (leaves S unchanged), or None.
  mask: [1, 1, T, S] bool, which keys each query sees, or None (kv_lengths or causal instead).
  slot: None: the keys are [the cache's (a retained prefix) ; the call's own]; else the cache is
    a fixed-size buffer and the call's keys/values are written into slots [slot, slot + T).
  kv_lengths: [B] int32, queries see the buffer's slots [0, kv_lengths) (cuDNN's padding mask),
    or None.
  causal: queries see their own keys causally and nothing else (the buffer was empty before
    the call); no mask is built (cuDNN skips the masked blocks).
  band: with causal, each query sees only its own and the band - 1 keys before it (sliding-window
    attention over one long call, cuDNN's local window), or None: all earlier keys.
  """
  positions: Array
  segment_pos: Array
  valid: Array | None = None
  mask: Array | None = None
  slot: Array | None = None
  kv_lengths: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  band: int | None = flax.struct.field(pytree_node=False, default=None)


class AttentionCache(NamedTuple):
  """keys (RoPE-rotated), values [B,S,G,K] (G key/value heads): a retained prefix, a window's
  own keys or a fixed-size decode buffer (see `Context.slot`)."""
  keys: Array
  values: Array


class GDNCache(NamedTuple):
  """state: the fast weights S [B,H,K,V] float32. conv: the q|k|v projections of the window's
  last kernel-1 tokens [B, kernel-1, 3*H*K] (decode), or None: the conv starts with the call."""
  state: Array
  conv: Array | None = None


class Linear(nn.Module):
  """x W (+ b with `use_bias`). In the training layout exactly `nn.Dense`: W [in, out] float32,
  both cast to `dtype` for the product; the bias [out] float32, cast to `dtype` and added to
  the product. weight_only: return W [in_features, features] cast to `dtype` instead (the same
  parameter; in_features defaults to x's width), and with `use_bias` the pair (W, b), for code
  that does the product itself (`SwiGLU` with `kernels.swiglu`, merged projections)."""
  features: int
  axes: tuple[str, str]
  dtype: Any = f32
  layout: Layout = TRAIN
  use_bias: bool = False
  weight_only: bool = False
  in_features: int | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    lay, d = self.layout, self.in_features or x.shape[-1]
    if lay.transposed:
      w = self.param("kernel", P(nn.initializers.lecun_normal(in_axis=1, out_axis=0),
                                 self.axes[::-1]), (self.features, d), f32)
    else:
      w = self.param("kernel", P(nn.initializers.lecun_normal(), self.axes),
                     (d, self.features), f32)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if self.weight_only:
      return (w, self._bias().astype(self.dtype)) if self.use_bias else w
    if lay.barrier_inputs:
      x = jax.lax.optimization_barrier(x)
    lead = x.shape[:-1]
    pad = lay.pad_single_row and math.prod(lead) == 1
    if pad:
      x = jnp.concatenate([x.reshape(1, d), jnp.zeros((1, d), x.dtype)])
    if lay.gemv and lay.transposed and math.prod(lead) == 1:
      y = kernels.gemv.gemv(x.reshape(d), w).reshape(*lead, self.features)
    else:
      dims = (((x.ndim - 1,), (1 if lay.transposed else 0,)), ((), ()))
      y = jax.lax.dot_general(x, w, dims)
    if pad:
      y = y[:1].reshape(*lead, self.features)
    if self.use_bias:
      y = y + self._bias().astype(self.dtype)
    return jax.lax.optimization_barrier(y) if lay.fused else y

  def _bias(self) -> Array:
    return self.param("bias", P(nn.initializers.zeros, self.axes[1:]), (self.features,), f32)


def project(module: nn.Module, x: Array, group: str, widths: Mapping[str, tuple[int, str]], *,
            in_axis: str, dtype: Any, layout: Layout, use_bias: bool = False,
            merge: bool = False) -> list[Array]:
  """The projections of x that `module.PROJECTIONS[group]` names, in that order (`widths`:
  name -> (features, logical out axis)): one `Linear` each, named by the projection, or, in a
  fused layout, one named `group` whose output is split (`convert_module_params` concatenates
  the matrices, and biases, in the same order). Called inside the module's compact method.

  merge (`ModelConfig.merge_projections`; the training layout, where no out axis is split
  over devices): the same parameters, concatenated at the call into one product whose output is
  split, so that the backward is one product for dx and one for the matrices' gradients (split
  after) instead of one per projection and a sum of their dx."""
  members = module.PROJECTIONS[group]
  sizes = [widths[m][0] for m in members]
  if layout.fused:
    y = Linear(sum(sizes), (in_axis, widths[members[0]][1]), dtype, layout, use_bias,
               name=group)(x)
  elif (merge and layout == TRAIN and len(members) > 1
        and not any(sharding.split_over_devices(widths[m][1]) for m in members)):
    params = [Linear(widths[m][0], (in_axis, widths[m][1]), dtype, layout, use_bias,
                     weight_only=True, name=m)(x) for m in members]
    with jax.named_scope(group):
      w = jnp.concatenate([p[0] for p in params] if use_bias else params, axis=1)
      y = jax.lax.dot_general(x.astype(dtype), w, (((x.ndim - 1,), (0,)), ((), ())))
      if use_bias:
        y = y + jnp.concatenate([p[1] for p in params])
  else:
    return [Linear(widths[m][0], (in_axis, widths[m][1]), dtype, layout, use_bias, name=m)(x)
            for m in members]
  return jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1)


class RMSNorm(nn.Module):
  """RMS normalisation over the last axis, computed in float32, with a learned gain (every norm
  of a model takes its eps from `ModelConfig.norm_eps`)."""
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
  """x -> W_down (SiLU(W_gate x) * W_up x). implementation: `ModelConfig.mlp_implementation`
  ("pallas_triton": `kernels.swiglu.swiglu_mlp` in the training layout, on one device; the
  same parameters)."""
  hidden_dim: int
  dtype: Any = f32
  layout: Layout = TRAIN
  implementation: str | None = None

  PROJECTIONS = {"gate_up": ("gate", "up"), "down": ("down",)}

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, layout=self.layout)
    f = self.hidden_dim
    if self.implementation == "pallas_triton" and self.layout == TRAIN:
      devices = jax.sharding.get_abstract_mesh().size
      expect(devices <= 1, "ModelConfig.mlp_implementation",
             f"'pallas_triton' runs on one device (its kernels are not partitioned); this "
             f"mesh has {devices}: use None ('xla')")
      d = x.shape[-1]
      weights = [Linear(n, axes, self.dtype, weight_only=True, in_features=k, name=name)(x)
                 for name, k, n, axes in (("gate", d, f, ("embed", "mlp")),
                                          ("up", d, f, ("embed", "mlp")),
                                          ("down", f, d, ("mlp", "embed")))]
      return kernels.swiglu.swiglu_mlp(x.astype(self.dtype), *weights)
    gate, up = project(self, x, "gate_up", {"gate": (f, "mlp"), "up": (f, "mlp")},
                       in_axis="embed", **kw)
    return project(self, nn.silu(gate) * up, "down", {"down": (x.shape[-1], "embed")},
                   in_axis="mlp", **kw)[0]


def apply_rope(x: Array, positions: Array, base: float) -> Array:
  """Rotary embedding on [B,T,H,K] at absolute `positions` [T] (rotate-half convention)."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=f32) / half)
  angles = positions.astype(f32)[:, None] * freqs[None, :]               # [T, K/2]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(f32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class ConvKernel(nn.Module):
  """The taps [kernel_size, channels] of a depthwise conv (`causal_conv`); tap j looks j tokens
  back."""
  channels: int
  kernel_size: int

  @nn.compact
  def __call__(self) -> Array:
    init = nn.initializers.normal(stddev=1.0 / math.sqrt(self.kernel_size))
    return self.param("kernel", P(init, ("conv", "heads")), (self.kernel_size, self.channels),
                      f32)


def causal_conv(x: Array, w: Array, segment_pos: Array, history: Array | None = None
                ) -> tuple[Array, Array | None]:
  """Causal depthwise 1-D convolution of x [B,T,C] with taps w [kernel,C] that restarts at every
  segment boundary: tap j (looking j tokens back) only reads a token of the same window, i.e.
  when segment_pos [T] >= j. Windows are evicted whole, so no history crosses a boundary.

  history: the inputs of the kernel-1 tokens before x [B,kernel-1,C] (a decode stream), or None
  (zeros: the conv starts here). Returns the output and the new history (None if none given).
  """
  size, t = w.shape[0], x.shape[1]
  if history is not None:
    xs = jnp.concatenate([history.astype(x.dtype), x], axis=1)          # [B, kernel-1+T, C]
    taps = lambda j: xs[:, size - 1 - j:size - 1 - j + t]
  else:
    taps = lambda j: jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :t]
  out = x * w[0]
  for j in range(1, size):
    keep = (segment_pos >= j)[None, :, None]
    out = out + jnp.where(keep, taps(j), 0) * w[j]
  return out, (None if history is None else xs[:, t:])


def causal_attention(q: Array, k: Array, v: Array, band: int | None,
                     implementation: str | None) -> Array:
  """q [B,T,H,D] over its own keys k, v [B,T,G,D], causally; band: each query sees only its own
  and the band - 1 keys before it, or None. implementation: `ModelConfig.attention_implementation`
  ("pallas_triton": `kernels.attention.causal_attention`; the others: jax.nn's)."""
  if implementation == "pallas_triton":
    expect(band is None, "ModelConfig.attention_implementation",
           "'pallas_triton' has no local window (band); use 'cudnn' or 'xla' for banded "
           "attention")
    return flash_causal_attention(q, k, v)
  window = None if band is None else (band - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                      implementation=implementation)


class Attention(nn.Module):
  """Causal softmax attention; which keys a query sees: `Context` (mask, buffer, lengths).

  Grouped-query attention when config.num_kv_heads < num_attn_heads: k and v (and every cache)
  have the G key/value heads; `jax.nn.dot_product_attention` lets query head n read key/value
  head n // (H/G).

  cache None: the call's own keys; an `AttentionCache` and ctx.slot None: [the cache (a
  retained prefix) ; own], returning own (the sliding variant retains its tail); ctx.slot given:
  own keys written into the fixed-size buffer at slot, attention over the buffer, returning it.
  """
  config: ModelConfig
  layout: Layout = TRAIN

  PROJECTIONS = {"qkv": ("q", "k", "v"), "out": ("out",)}

  @nn.compact
  def __call__(self, x: Array, ctx: Context, cache: AttentionCache | None = None
               ) -> tuple[Array, AttentionCache]:
    cfg = self.config
    b, t, _ = x.shape
    h, g, d = cfg.num_attn_heads, cfg.num_kv_heads, cfg.attn_head_dim
    dt = cfg.activation_dtype
    kw = dict(dtype=dt, layout=self.layout, merge=cfg.merge_projections)
    widths = {"q": (h * d, "heads"), "k": (g * d, "heads"), "v": (g * d, "heads")}
    q, k, v = project(self, x, "qkv", widths, in_axis="embed", use_bias=cfg.attn_qkv_bias, **kw)
    q = apply_rope(q.reshape(b, t, h, d), ctx.positions, cfg.rope_base)
    k = apply_rope(k.reshape(b, t, g, d), ctx.positions, cfg.rope_base)
    v = v.reshape(b, t, g, d)
    if ctx.slot is not None:
      at = (0, ctx.slot, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), at)
      values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), at)
      new = AttentionCache(keys, values)
    else:
      keys, values = k, v
      if cache is not None:
        keys = jnp.concatenate([cache.keys.astype(dt), k], axis=1)
        values = jnp.concatenate([cache.values.astype(dt), v], axis=1)
      new = AttentionCache(k, v)
    if ctx.causal:
      o = causal_attention(q, k, v, ctx.band, cfg.attention_implementation)
    else:
      # The Pallas kernel is causal-only: masked calls (a decode step against its cache) use
      # XLA's attention under "pallas_triton".
      impl = (None if cfg.attention_implementation == "pallas_triton"
              else cfg.attention_implementation)
      o = jax.nn.dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=ctx.mask,
                                       key_value_seq_lengths=ctx.kv_lengths,
                                       implementation=impl)
    if self.layout.fused:     # the attention's own products stay out of the projection's kernel
      o = jax.lax.optimization_barrier(o)
    out = project(self, o.reshape(b, t, h * d), "out", {"out": (cfg.d_model, "embed")},
                  in_axis="heads", **kw)[0]
    return out, new


def _inverse_softplus(x: Array) -> Array:
  return x + jnp.log(-jnp.expm1(-x))


class GatedDeltaNet(nn.Module):
  """Gated DeltaNet mixer (paper.md, "Blocks"): fast-weight state S [B,H,K,V] in and out.

  q, k, v: projection -> causal depthwise conv -> SiLU; q and k L2-normalised (inside the op),
  q scaled by K^-1/2. g = -exp(A_log) * softplus(W_a x + dt_bias), beta = sigmoid(W_b x).
  Output: RMSNorm(o) * SiLU(W_gate x) per head, heads concatenated, output projection.
  Tokens with valid = False (padding) get g = 0 and beta = 0, so they leave S unchanged. One
  token (T = 1, the decode step) takes the op's one-token path.
  """
  config: ModelConfig
  layout: Layout = TRAIN

  PROJECTIONS = {"in_proj": ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "gate_proj"),
                 "out_proj": ("out_proj",)}
  CONVS = {"qkv_conv": ("q_conv", "k_conv", "v_conv")}

  @nn.compact
  def __call__(self, x: Array, ctx: Context, cache: GDNCache) -> tuple[Array, GDNCache]:
    cfg = self.config
    b, t, _ = x.shape
    h, d = cfg.num_gdn_heads, cfg.gdn_head_dim
    hk, dt = h * d, cfg.activation_dtype
    kw = dict(dtype=dt, layout=self.layout, merge=cfg.merge_projections)
    widths = {"q_proj": (hk, "heads"), "k_proj": (hk, "heads"), "v_proj": (hk, "heads"),
              "a_proj": (h, "gdn_heads"), "b_proj": (h, "gdn_heads"), "gate_proj": (hk, "heads")}
    q, k, v, a, beta_logit, gate = project(self, x, "in_proj", widths, in_axis="embed", **kw)

    if self.layout.fused:
      taps = jnp.split(ConvKernel(3 * hk, cfg.conv_kernel, name="qkv_conv")(), 3, axis=1)
    else:
      taps = [ConvKernel(hk, cfg.conv_kernel, name=n)() for n in self.CONVS["qkv_conv"]]
    pasts = [None] * 3 if cache.conv is None else jnp.split(cache.conv, 3, axis=-1)
    convs = [causal_conv(y, w.astype(dt), ctx.segment_pos, past)
             for y, w, past in zip((q, k, v), taps, pasts, strict=True)]
    q, k, v = (nn.silu(y).reshape(b, t, h, d) for y, _ in convs)
    conv = None if cache.conv is None else jnp.concatenate([c for _, c in convs], axis=-1)

    def a_log_init(key, shape, dtype):
      return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))

    def dt_bias_init(key, shape, dtype):
      step = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
      return _inverse_softplus(step)

    a_log = self.param("A_log", P(a_log_init, ("gdn_heads",)), (h,), f32)
    dt_bias = self.param("dt_bias", P(dt_bias_init, ("gdn_heads",)), (h,), f32)
    g = -jnp.exp(a_log) * jax.nn.softplus(a.astype(f32) + dt_bias)
    beta = jax.nn.sigmoid(beta_logit.astype(f32))
    if ctx.valid is not None:
      keep = ctx.valid.astype(f32)[None, :, None]
      g, beta = g * keep, beta * keep

    # The smallest allowed chunk that covers a shorter window (CHUNK_SIZES is ascending).
    chunk = next(c for c in CHUNK_SIZES if c >= min(t, cfg.chunk_size))
    o, state = sharded_fast_weight_op(
        cfg.rule, q, k, v, g, beta, cache.state, use_qk_l2norm=True, chunk_size=chunk,
        implementation="single_token" if t == 1 else cfg.kernel_implementation)
    o = RMSNorm(dt, axis_name="head_dim", eps=cfg.norm_eps, name="out_norm")(o)
    o = o * nn.silu(gate.reshape(b, t, h, d))
    out = project(self, o.reshape(b, t, hk), "out_proj", {"out_proj": (cfg.d_model, "embed")},
                  in_axis="heads", **kw)[0]
    return out, GDNCache(state, conv)


class Block(nn.Module):
  """Layer `index` of the stack: h += mixer(RMSNorm(h)); h += SwiGLU(RMSNorm(h)) (the second
  step only if `config.has_mlp(index)`).

  Its parameters are named `layer_{index}_{kind}`, `layer_{index}_mixer_norm`,
  `layer_{index}_mlp`, `layer_{index}_mlp_norm` (the last two only with an MLP); `HybridLM`
  shares its scope with its blocks so that they sit directly under the model. The block's
  options come from the config (the mixer kind from `config.layers[index]`).
  """
  config: ModelConfig
  index: int
  layout: Layout = TRAIN

  def setup(self):
    cfg, dt = self.config, self.config.activation_dtype
    kind = cfg.layers[self.index]
    prefix = f"layer_{self.index}_"
    mixer_cls = Attention if kind == "attn" else GatedDeltaNet
    self.mixer = mixer_cls(cfg, self.layout, name=prefix + kind)
    self.mixer_norm = RMSNorm(dt, eps=cfg.norm_eps, name=prefix + "mixer_norm")
    if cfg.has_mlp(self.index):
      self.mlp = SwiGLU(cfg.hidden_dim, dt, self.layout, cfg.mlp_implementation,
                        name=prefix + "mlp")
      self.mlp_norm = RMSNorm(dt, eps=cfg.norm_eps, name=prefix + "mlp_norm")

  def __call__(self, h: Array, ctx: Context, cache) -> tuple[Array, Any]:
    """h [B,T,D] float32 (the residual stream); cache: `AttentionCache` (or None) or
    `GDNCache`, as the mixer takes it. Returns the new h and the mixer's new cache."""
    y, cache = self.mixer(self.mixer_norm(h), ctx, cache)
    h = h + y.astype(h.dtype)
    if self.config.has_mlp(self.index):
      h = h + self.mlp(self.mlp_norm(h)).astype(h.dtype)
    return h, cache


# ------------------------------------------------------------------ decode parameter layouts


def _matrix(kernel: Array, layout: Layout, dtype: Any) -> Array:
  """A [in, out] training kernel as `layout` stores it, in the compute dtype (the module casts
  it to that dtype at every call: casting once changes no value)."""
  kernel = kernel.astype(dtype)
  return kernel.T if layout.transposed else kernel


def convert_module_params(params: Mapping, module: type, layout: Layout, dtype: Any) -> dict:
  """One module's training-layout parameters in `layout`: its projections (`module.PROJECTIONS`,
  {group: member names}) and conv taps (`module.CONVS`) fused per group when the layout fuses,
  matrices stored as it stores them; anything else unchanged."""
  out = dict(params)
  for group, members in getattr(module, "PROJECTIONS", {}).items():
    linears = [out.pop(m) for m in members]
    kernels_ = [p["kernel"] for p in linears]
    stored = ({group: jnp.concatenate(kernels_, axis=1)} if layout.fused
              else dict(zip(members, kernels_, strict=True)))
    out.update({n: {"kernel": _matrix(w, layout, dtype)} for n, w in stored.items()})
    if "bias" in linears[0]:                      # float32, as the module creates it
      biases = [p["bias"] for p in linears]
      for n, b in ({group: jnp.concatenate(biases)} if layout.fused
                   else dict(zip(members, biases, strict=True))).items():
        out[n]["bias"] = b
  for group, members in getattr(module, "CONVS", {}).items():
    taps = [out.pop(m)["kernel"].astype(dtype) for m in members]
    stored = ({group: jnp.concatenate(taps, axis=1)} if layout.fused
              else dict(zip(members, taps, strict=True)))
    out.update({n: {"kernel": w} for n, w in stored.items()})
  return out


# ------------------------------------------------------------------------ the fast-weight op


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
