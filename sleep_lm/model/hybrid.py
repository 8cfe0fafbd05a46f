"""The hybrid language model: embedding, one pass of the layer stack, output head.

`HybridLM` is a linen module whose methods are the stages that the sleep scan
(`sleep_lm.model.sleep`) and the decoder (`sleep_lm.inference.decoding`) compose: `embed`,
`run_pass` (every layer's `Block` over the tokens of one call, per-layer caches in and out) and
`logits`. Each is a pure function of the
parameters and its inputs, so the scans call them through `model.apply(..., method=...)`.

`run_pass` is the one layer loop: a training pass over a window, a replay (sleep) pass, prefill,
and a decode step differ only in their `Context` and caches (`sleep_lm.model.layers`). With
`ModelConfig.scan_layers` it runs each maximal run of a repeated group of layers as a
`jax.lax.scan` over the group's repetitions (`layer_groups`), the parameters staying one subtree
per layer.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.array_types import Arr, Float, typed
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.layers import (
  TRAIN,
  Attention,
  AttentionCache,
  Block,
  Context,
  GatedDeltaNet,
  GDNCache,
  Layout,
  Linear,
  P,
  RMSNorm,
  SwiGLU,
  convert_module_params,
)
from sleep_lm.model.sharding import ACTIVATION

Array = jax.Array


def zero_states(config: ModelConfig, batch: int) -> tuple[Array, ...]:
  """Fresh fast-weight states, one float32 [B,H,K,V] per GDN layer."""
  h, d = config.num_gdn_heads, config.gdn_head_dim
  return tuple(jnp.zeros((batch, h, d, d), jnp.float32) for _ in range(config.num_gdn_layers))


def join_caches(config: ModelConfig, gdn, attn) -> tuple:
  """Per-layer caches (layer order) from the GDN layers' and the attention layers' caches."""
  gdn, attn = iter(gdn), iter(attn)
  return tuple(next(gdn) if kind == "gdn" else next(attn) for kind in config.layers)


def split_caches(config: ModelConfig, caches) -> tuple[tuple, tuple]:
  """(the GDN layers' caches, the attention layers' caches), each in layer order."""
  pairs = list(zip(config.layers, caches, strict=True))
  return (tuple(c for kind, c in pairs if kind == "gdn"),
          tuple(c for kind, c in pairs if kind == "attn"))


def pass_caches(config: ModelConfig, states, prefix=None) -> tuple:
  """The per-layer caches of a pass over a window (`run_pass`): each GDN layer's state S (its
  conv starts with the window), each attention layer's retained prefix (`AttentionCache`,
  sliding eviction) or None."""
  prefix = prefix if prefix is not None else (None,) * config.num_attn_layers
  return join_caches(config, (GDNCache(s) for s in states), prefix)


@typed
def window_pass(config: ModelConfig, params, ctx: Context, prefix, h: Float[Arr, "b t d"], states,
                layout: Layout = TRAIN, span: tuple[int, int] | None = None
                ) -> tuple[Float[Array, "b t d"], tuple, tuple]:
  """One pass of the layer stack over a window (a training pass, a replay pass, a prefill
  window): the GDN states and, for sliding eviction, the attention layers' retained prefix in;
  (h, the GDN states after the window, the attention layers' own keys/values) out.

  span: (a, b), only the layers [a, b) run (`HybridLM.run_pass`): the other GDN layers' states
  come back unchanged, and only the attention layers inside the span are returned (in layer
  order; `attn_in_span`). None: the whole stack."""
  model = HybridLM(config, layout)
  h, caches = model.apply({"params": params}, h, pass_caches(config, states, prefix), ctx,
                          method=HybridLM.run_pass, span=span)
  gdn, attn = split_caches(config, caches)
  if span is not None:
    attn = tuple(attn[j] for j in attn_in_span(config, span))
  return h, tuple(c.state for c in gdn), attn


def attn_in_span(config: ModelConfig, span: tuple[int, int]) -> tuple[int, ...]:
  """The indices (among the attention layers, in layer order) of the attention layers in the
  layers [a, b)."""
  return _in_span(config, "attn", span)


def gdn_in_span(config: ModelConfig, span: tuple[int, int]) -> tuple[int, ...]:
  """The indices (among the GDN layers, in layer order: those of the states tuple) of the GDN
  layers in the layers [a, b)."""
  return _in_span(config, "gdn", span)


def _in_span(config: ModelConfig, kind: str, span: tuple[int, int]) -> tuple[int, ...]:
  indices = [i for i, k in enumerate(config.layers) if k == kind]
  return tuple(j for j, i in enumerate(indices) if span[0] <= i < span[1])


def loop_segments(config: ModelConfig) -> tuple[tuple[int, int] | None, ...]:
  """(prelude, range, coda): the layer spans of a window that sleeps (`ModelConfig.loop_layers`:
  [0, a) once, [a, b) N times, [b, len(layers)) once), None where empty; the range is None
  (the whole stack, `window_pass`'s default) when it is every layer, so that the program is the
  plain one."""
  first, last = config.loop_span
  return ((0, first) if first > 0 else None,
          (first, last) if config.partial_loop else None,
          (last, len(config.layers)) if last < len(config.layers) else None)


class LayerGroup(NamedTuple):
  """`repeats` consecutive repetitions of the `period` layers from `start` (an index into the
  sequence `layer_groups` was given); repeats 1: one layer (period 1) run on its own."""
  start: int
  period: int
  repeats: int

  @property
  def stop(self) -> int:
    return self.start + self.period * self.repeats


def layer_groups(signatures: Sequence[Hashable]) -> tuple[LayerGroup, ...]:
  """The layers (one signature each: layers with equal signatures can share one scan body)
  split into consecutive segments, each a single layer or r >= 2 repetitions of a group of p
  layers whose signatures repeat position by position, chosen to make the program smallest.

  Size: one layer body per single layer, p per scan (its body, traced once) plus one for the
  scan itself (its loop, the stacking of its parameters and caches); ties go to fewer scans,
  then to the scan that starts first, then to the shorter period. So a run becomes a scan when
  its repetitions after the first hold two layers or more: two repetitions of one layer stay in
  line, two of two layers or three of one become a scan; among periods that tile the same
  layers the shortest wins (A G A G A G A G: 4 x (A G), not 2 x (A G A G)). SmolLM2 + 4 GDN
  layers, (A*7 G) x 4 + A A: 4 x (A*7 G) and two single layers."""
  sig = list(signatures)
  n = len(sig)
  # best[i]: (size, scans, segments) of the cheapest split of layers [i, n).
  best: list[tuple[int, int, tuple[LayerGroup, ...]]] = [(0, 0, ())] * (n + 1)
  for i in reversed(range(n)):
    options = []
    for p in range(1, (n - i) // 2 + 1):
      reps = 1
      while i + (reps + 1) * p <= n and sig[i + reps * p:i + (reps + 1) * p] == sig[i:i + p]:
        reps += 1
      for r in range(reps, 1, -1):
        size, scans, rest = best[i + r * p]
        options.append((size + p + 1, scans + 1, (LayerGroup(i, p, r),) + rest))
    size, scans, rest = best[i + 1]
    options.append((size + 1, scans, (LayerGroup(i, 1, 1),) + rest))
    best[i] = min(options, key=lambda o: o[:2])     # min keeps the first of equals
  return best[0][2]


def _block_fn(config: ModelConfig, index: int, layout: Layout, ctx: Context):
  """(params, h, cache) -> (h, cache): `Block(config, index, layout)` as a pure function of its
  parameters (named as layer `index`'s), checkpointed on its own with remat "blocks" (as
  `nn.remat(Block)` in `HybridLM`: nothing saved inside the layer)."""
  block = Block(config, index, layout, parent=None)

  def fn(params, h, cache):
    return block.apply({"params": params}, h, ctx, cache)
  # prevent_cse=False: inside a scan, which keeps XLA from merging the recomputation anyway.
  return jax.checkpoint(fn, prevent_cse=False) if config.remat == "blocks" else fn


def _layer_params(params, index: int, as_index: int) -> dict:
  """Layer `index`'s parameter subtrees (layer_{index}_...) under layer `as_index`'s names."""
  src, dst = f"layer_{index}_", f"layer_{as_index}_"
  return {dst + k[len(src):]: v for k, v in params.items() if k.startswith(src)}


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _shapes(tree) -> Hashable:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


class HybridLM(nn.Module):
  config: ModelConfig
  layout: Layout = TRAIN

  def setup(self):
    cfg = self.config
    dt = cfg.activation_dtype
    # The lookup runs on the float32 table and casts after: its gradient is a scatter-add into
    # the table, which in bfloat16 (a few rows, thousands of colliding updates) took 150 ms of a
    # 200 ms step on an H200 (docs/kernels.md, end to end).
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
        embedding_init=P(nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    # remat="blocks": each layer recomputed on its own in the backward (only the residual
    # stream between layers is saved), same parameters.
    block_cls = nn.remat(Block) if cfg.remat == "blocks" else Block
    self.blocks = [block_cls(cfg, i, self.layout) for i in range(len(cfg.layers))]
    for block in self.blocks:   # its parameters directly under the model: layer_{i}_...
      nn.share_scope(self, block)
    self.final_norm = RMSNorm(dt, eps=cfg.norm_eps, name="final_norm")
    if not cfg.tie_embeddings:
      self.head = Linear(cfg.vocab_size, ("embed", "vocab"), dt, self.layout, name="head")

  def embed(self, tokens: Array) -> Array:
    """[B,T] int -> [B,T,D] float32: the residual stream stays float32 (mixed precision); each
    layer's norm casts its input to the compute dtype and its bf16 output is added back in f32.

    Sharded: the table's d_model may be split (FSDP); it is gathered before the lookup (as FSDP
    gathers every weight), so that the rows come out split like the batch rather than along
    d_model, which XLA would have to reshard (it replicated them)."""
    table = nn.with_logical_constraint(self.embedding.embedding, ("vocab", None))
    return nn.with_logical_constraint(jnp.take(table, tokens, axis=0), ACTIVATION)

  def run_pass(self, h: Array, caches: tuple, ctx: Context,
               span: tuple[int, int] | None = None) -> tuple[Array, tuple]:
    """Every layer once over h [B,T,D]; caches: one per layer (`GDNCache` for a GDN layer,
    `AttentionCache` or None for an attention layer). Returns the new h and the layers' new
    caches (GDN: the state after the tokens; attention: see `layers.Attention`).

    span: (a, b), run only the layers [a, b) (a segment of a looped block range,
    `ModelConfig.loop_layers`); the other layers' caches come back as they went in. None: all.

    `ModelConfig.scan_layers` (not while initializing: the parameters are made by the plain
    loop): the layers of the span run as `layer_groups` splits them, each repeated group as a
    `jax.lax.scan` over its repetitions (`_scan_group`); the same function."""
    if len(caches) != len(self.blocks):
      raise ValueError(f"run_pass: needs one cache per layer ({len(self.blocks)}), got "
                       f"{len(caches)}")
    start, stop = (0, len(self.blocks)) if span is None else span
    # block boundaries: see sleep_lm.model.sharding
    h = nn.with_logical_constraint(h, ACTIVATION)
    new = list(caches)
    if self.config.scan_layers and not self.is_initializing():
      params = nn.meta.unbox(self.variables["params"])
      groups = layer_groups([self._signature(params, i, caches[i]) for i in range(start, stop)])
      groups = [g._replace(start=g.start + start) for g in groups]
    else:
      params, groups = None, [LayerGroup(i, 1, 1) for i in range(start, stop)]
    for g in groups:
      if g.repeats == 1:
        h, new[g.start] = self.blocks[g.start](h, ctx, caches[g.start])
      else:
        h, new[g.start:g.stop] = self._scan_group(g, params, h, caches[g.start:g.stop], ctx)
      h = nn.with_logical_constraint(h, ACTIVATION)
    return h, tuple(new)

  def _signature(self, params, index: int, cache) -> Hashable:
    """What must be equal for two layers to share a scan body: the mixer, whether there is an
    MLP (all `Block` reads of its index), the parameters' names (past the layer prefix), shapes
    and dtypes, and the cache's structure, shapes and dtypes."""
    return (self.config.layers[index], self.config.has_mlp(index),
            _shapes(_layer_params(params, index, 0)), _shapes(cache))

  def _scan_group(self, group: LayerGroup, params, h: Array, caches: Sequence, ctx: Context
                  ) -> tuple[Array, list]:
    """The layers of `group` (their caches in layer order) as a scan over its repetitions: the
    parameters and caches of position q of every repetition stacked on a leading axis (the
    parameters renamed as the first repetition's), the body the group's blocks as pure
    functions (`_block_fn`). Returns h and the layers' new caches in layer order."""
    p, r = group.period, group.repeats
    firsts = range(group.start, group.start + p)
    blocks = [_block_fn(self.config, i, self.layout, ctx) for i in firsts]
    xs = (tuple(_stack([_layer_params(params, i + k * p, i) for k in range(r)]) for i in firsts),
          tuple(_stack([caches[q + k * p] for k in range(r)]) for q in range(p)))

    def body(h, xs):
      out = []
      for block, block_params, cache in zip(blocks, *xs, strict=True):
        h, cache = block(block_params, h, cache)
        h = nn.with_logical_constraint(h, ACTIVATION)
        out.append(cache)
      return h, tuple(out)

    h, ys = jax.lax.scan(body, h, xs)
    return h, [jax.tree.map(lambda x, k=k: x[k], ys[q]) for k in range(r) for q in range(p)]

  def logits(self, h: Array) -> Array:
    """[B,T,D] -> [B,T,vocab] float32 logits; tied: final-normed h @ embedding^T (in the
    compute dtype, like the untied head)."""
    x = self.final_norm(h)
    if self.config.tie_embeddings:
      dt = self.config.activation_dtype
      table = self.embedding.embedding.astype(dt)
      logits = jnp.einsum("...d,vd->...v", x.astype(dt), table).astype(jnp.float32)
      return logits * self.config.d_model ** -0.5 if self.config.tied_logit_scale else logits
    return self.head(x).astype(jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    """Plain single-window forward; used to create parameters (`init`)."""
    t = tokens.shape[1]
    pos = jnp.arange(t)
    # causal, not a [T, T] mask: cuDNN's vmap rule cannot batch a broadcast mask (seeds vmap init)
    ctx = Context(pos, pos, jnp.ones((t,), bool), causal=True)
    caches = pass_caches(self.config, zero_states(self.config, tokens.shape[0]))
    h, _ = self.run_pass(self.embed(tokens), caches, ctx)
    return self.logits(h)


def init_params(config: ModelConfig, rng: Array, batch: int = 1):
  """Boxed (logically partitioned) parameters; `nn.meta.unbox` gives plain arrays."""
  tokens = jnp.zeros((batch, min(config.window, 8)), jnp.int32)
  return HybridLM(config).init(rng, tokens)["params"]


def convert_params(config: ModelConfig, params, layout: Layout) -> dict:
  """Training-layout parameters (unboxed, one model) as `HybridLM(config, layout)` reads them:
  projections fused and stored as the layout says, matrices in the compute dtype. Run once when
  a stream is built; training never sees this layout."""
  dt = config.activation_dtype
  out = dict(params)
  for i, kind in enumerate(config.layers):
    mixer = Attention if kind == "attn" else GatedDeltaNet
    out[f"layer_{i}_{kind}"] = convert_module_params(params[f"layer_{i}_{kind}"], mixer,
                                                     layout, dt)
    if config.has_mlp(i):
      out[f"layer_{i}_mlp"] = convert_module_params(params[f"layer_{i}_mlp"], SwiGLU, layout,
                                                    dt)
  if not config.tie_embeddings:
    out.update(convert_module_params({"head": params["head"]}, _Head, layout, dt))
  return out


class _Head:
  PROJECTIONS = {"head": ("head",)}


__all__ = ["AttentionCache", "Context", "GDNCache", "HybridLM", "LayerGroup", "attn_in_span",
           "convert_params", "gdn_in_span", "init_params", "join_caches", "layer_groups",
           "loop_segments", "pass_caches", "split_caches", "window_pass", "zero_states"]
