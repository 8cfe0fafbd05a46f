"""The hybrid language model: embedding, one pass of the layer stack, output head.

`HybridLM` is a linen module whose methods are the three stages that the sleep scan
(`sleep_lm.sleep`) composes: `embed`, `run_pass` (one pass of every layer over a window, GDN
states in and out) and `logits`. Each is a pure function of the parameters and its inputs, so the
scan can call them through `model.apply(..., method=...)` inside `jax.lax.scan`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleep_lm.config import ModelConfig
from sleep_lm.layers import Attention, GatedDeltaNet, P, RMSNorm, SwiGLU, dense
from sleep_lm.sharding import ACTIVATION

Array = jax.Array


class PassContext(NamedTuple):
  """Where the tokens of a pass sit, shared by every layer of that pass.

  positions: [T] absolute token positions (RoPE).
  segment_pos: [T] position inside the token's window (the GDN conv restarts at 0).
  valid: [T] False for padding past the end of the sequence.
  mask: [1, 1, T, P+T] bool, which keys (prefix then own) each query attends to.
  prefix: per attention layer, retained (keys, values) [B,P,H,K] of the sliding variant, or None.
  """
  positions: Array
  segment_pos: Array
  valid: Array
  mask: Array
  prefix: tuple[tuple[Array, Array], ...] | None = None


class StepContext(NamedTuple):
  """Where the T new tokens of a wake step sit (`HybridLM.wake_step`).

  positions: [T] absolute token positions (RoPE).
  segment_pos: [T] positions inside the current window (the GDN conv restarts at 0).
  slot: [] int, the cache slot of the first new token.
  mask: [1, 1, T, C] bool, which cache slots each query attends to (by key position), or None
    when kv_lengths is given.
  kv_lengths: [B] int32, attend to cache slots [0, kv_lengths) (one query per stream), or None.
  """
  positions: Array
  segment_pos: Array
  slot: Array
  mask: Array | None
  kv_lengths: Array | None = None


def zero_states(config: ModelConfig, batch: int) -> tuple[Array, ...]:
  """Fresh fast-weight states, one float32 [B,H,K,V] per GDN layer."""
  h, d = config.num_gdn_heads, config.gdn_head_dim
  return tuple(jnp.zeros((batch, h, d, d), jnp.float32) for _ in range(config.num_gdn_layers))


class HybridLM(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    dt = cfg.activation_dtype
    # The lookup runs on the float32 table and casts after: its gradient is a scatter-add into
    # the table, which in bfloat16 (a few rows, thousands of colliding updates) took 150 ms of a
    # 200 ms step on an H200 (docs/kernels.md, end to end).
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
        embedding_init=P(nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    mixers, mixer_norms, mlps, mlp_norms = [], [], [], []
    for i, kind in enumerate(cfg.layers):
      mixer_cls = Attention if kind == "attn" else GatedDeltaNet
      mixers.append(mixer_cls(cfg, name=f"layer_{i}_{kind}"))
      mixer_norms.append(RMSNorm(dt, name=f"layer_{i}_mixer_norm"))
      mlps.append(SwiGLU(cfg.hidden_dim, dt, name=f"layer_{i}_mlp"))
      mlp_norms.append(RMSNorm(dt, name=f"layer_{i}_mlp_norm"))
    self.mixers, self.mixer_norms, self.mlps, self.mlp_norms = mixers, mixer_norms, mlps, mlp_norms
    self.final_norm = RMSNorm(dt, name="final_norm")
    self.head = dense(cfg.vocab_size, ("embed", "vocab"), dt, "head")

  def embed(self, tokens: Array) -> Array:
    """[B,T] int -> [B,T,D] float32: the residual stream stays float32 (mixed precision); each
    layer's norm casts its input to the compute dtype and its bf16 output is added back in f32.

    Sharded: the table's d_model may be split (FSDP); it is gathered before the lookup (as FSDP
    gathers every weight), so that the rows come out split like the batch rather than along
    d_model, which XLA would have to reshard (it replicated them)."""
    table = nn.with_logical_constraint(self.embedding.embedding, ("vocab", None))
    return nn.with_logical_constraint(jnp.take(table, tokens, axis=0), ACTIVATION)

  def run_pass(self, h: Array, states: tuple[Array, ...], ctx: PassContext
               ) -> tuple[Array, tuple[Array, ...], tuple[tuple[Array, Array], ...]]:
    """One pass of every layer over h [B,T,D].

    Returns the new h, the GDN states after the pass, and each attention layer's own (RoPE'd)
    keys/values of this pass (what the sliding variant retains).
    """
    new_states, kvs = [], []
    h = nn.with_logical_constraint(h, ACTIVATION)     # block boundaries: see sleep_lm.sharding
    state_iter = iter(states)
    prefix_iter = iter(ctx.prefix) if ctx.prefix is not None else None
    for kind, mixer, mixer_norm, mlp, mlp_norm in zip(
        self.config.layers, self.mixers, self.mixer_norms, self.mlps, self.mlp_norms, strict=True):
      x = mixer_norm(h)
      if kind == "attn":
        prefix = next(prefix_iter) if prefix_iter is not None else None
        y, kv = mixer(x, ctx.positions, ctx.mask, prefix)
        kvs.append(kv)
      else:
        y, state = mixer(x, next(state_iter), ctx.segment_pos, ctx.valid)
        new_states.append(state)
      h = h + y.astype(h.dtype)
      h = h + mlp(mlp_norm(h)).astype(h.dtype)
      h = nn.with_logical_constraint(h, ACTIVATION)
    return h, tuple(new_states), tuple(kvs)

  def wake_step(self, h: Array, states: tuple[Array, ...], conv_states: tuple, caches: tuple,
                ctx: StepContext) -> tuple[Array, tuple[Array, ...], tuple, tuple]:
    """The wake pass over T new tokens h [B,T,D] of the current window (T = 1: one decode
    step), against fixed-size caches (`sleep_lm.generate`).

    conv_states: per GDN layer, the (q, k, v) conv histories of `GatedDeltaNet.step`; caches:
    per attention layer, (keys, values) [B,C,H,K]. Returns the new h and the updated states,
    conv histories and caches. Computes what `run_pass` computes for these tokens when it is
    given the window so far (tested in tests/test_generate.py).
    """
    new_states, new_convs, new_caches = [], [], []
    state_iter, conv_iter, cache_iter = iter(states), iter(conv_states), iter(caches)
    for kind, mixer, mixer_norm, mlp, mlp_norm in zip(
        self.config.layers, self.mixers, self.mixer_norms, self.mlps, self.mlp_norms, strict=True):
      x = mixer_norm(h)
      if kind == "attn":
        y, cache = mixer.step(x, ctx.positions, next(cache_iter), ctx.slot, mask=ctx.mask,
                              kv_lengths=ctx.kv_lengths)
        new_caches.append(cache)
      else:
        y, state, conv = mixer.step(x, next(state_iter), next(conv_iter), ctx.segment_pos)
        new_states.append(state)
        new_convs.append(conv)
      h = h + y.astype(h.dtype)
      h = h + mlp(mlp_norm(h)).astype(h.dtype)
    return h, tuple(new_states), tuple(new_convs), tuple(new_caches)

  def logits(self, h: Array) -> Array:
    """[B,T,D] -> [B,T,vocab] float32 logits."""
    return self.head(self.final_norm(h)).astype(jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    """Plain single-window forward; used to create parameters (`init`)."""
    t = tokens.shape[1]
    pos = jnp.arange(t)
    ctx = PassContext(pos, pos, jnp.ones((t,), bool),
                      jnp.tril(jnp.ones((t, t), bool))[None, None])
    h, _, _ = self.run_pass(self.embed(tokens), zero_states(self.config, tokens.shape[0]), ctx)
    return self.logits(h)


def init_params(config: ModelConfig, rng: Array, batch: int = 1):
  """Boxed (logically partitioned) parameters; `nn.meta.unbox` gives plain arrays."""
  tokens = jnp.zeros((batch, min(config.window, 8)), jnp.int32)
  return HybridLM(config).init(rng, tokens)["params"]
