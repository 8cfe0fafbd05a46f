"""Model configuration: one frozen dataclass, checked on construction.

Every field that can be wrong raises a `sleep_lm.common.validation.FieldError` (a ValueError) that
names the field ("ModelConfig.<field>") and the allowed values, so a typo in an ml-collections
override fails at start-up rather than deep inside a jitted scan. `RunConfig` builds it with
`from_mapping(..., path="config.model")`, which names the field at its config path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from kernels import available_implementations
from kernels.gated_delta_rule.base import CHUNK_SIZES, MAX_HEAD_DIM
from kernels.swiglu import default_tiles_fit
from sleep_lm.common import validation
from sleep_lm.common.validation import check_bool, check_choice, check_int, expect, is_int

BLOCK_TYPES = ("attn", "gdn")
RULES = ("gdn", "gated_linear")
EVICTIONS = ("hard", "sliding", "none")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "blocks")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas_triton")
MLP_IMPLEMENTATIONS = (None, "xla", "pallas_triton")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The hybrid model and its sleep schedule.

  Attributes:
    vocab_size: number of token ids.
    d_model: width of the residual stream.
    layers: the layer pattern, one entry per layer, each "attn" or "gdn"; every layer is a mixer
      (softmax attention or Gated DeltaNet) followed by a SwiGLU MLP (unless `mlp_layers` says
      not), both pre-norm residual.
    attn_head_dim: attention head size.
    attn_heads: attention query heads; None: d_model / attn_head_dim (which must then divide).
    attn_kv_heads: attention key/value heads (grouped-query attention: query head n reads key/value
      head n // (attn_heads / attn_kv_heads), as Hugging Face's `repeat_kv`); must divide the
      query heads; None: as many as query heads (multi-head attention). Decode caches hold
      attn_kv_heads heads.
    attn_qkv_bias: the attention's q, k, v projections have biases (Qwen2); False: none.
    gdn_head_dim: GDN key and value head size; heads = d_model / gdn_head_dim.
    mlp_dim: SwiGLU hidden width (default 4 * d_model).
    conv_kernel: GDN causal depthwise convolution width.
    rule: fast-weight update: "gdn" (gated delta rule) or "gated_linear" (the paper's Eq. 3).
    window: L, the number of tokens the KV cache holds; sequences are processed L at a time.
    passes: N, passes over each consolidation window (N = 1 is the plain hybrid).
    eviction: "hard" (drop the whole cache after each window), "sliding" (keep the last L-1
      keys/values of the final pass) or "none" (one window over the whole sequence: the
      full-cache attention baseline).
    remat: jax.checkpoint policy around each pass: "none", "full" (save nothing), "dots" (save
      matmul outputs) or "dots_no_batch" (save matmuls without batch dimensions); or "blocks":
      each layer checkpointed on its own (save nothing inside a layer, only the residual stream
      between layers), for passes too long to recompute whole (a full-cache window of a deep
      model: with "full", the backward of the one pass holds every layer's activations).
    dtype: compute dtype of matmuls, attention and the fast-weight op ("float32" or
      "bfloat16"). Parameters, fast-weight states, norms and the residual stream (carried through
      up to 4N + 1 window-passes) stay float32 whatever this says: mixed precision.
    rope_base: RoPE frequency base.
    norm_eps: epsilon of every RMSNorm (x / sqrt(mean(x^2) + eps) * gain).
    tie_embeddings: the output head is the transposed embedding (logits = h @ embedding^T, no
      `head` parameter); False: a `head` matrix of its own.
    tied_logit_scale: tied embeddings only: the logits are scaled by 1/sqrt(d_model) (PaLM's
      recipe). The table is initialised at std 1 and at initialisation the residual stream is
      mostly the token's own embedding, so unscaled tied logits start at std ~sqrt(d_model) over
      the vocabulary and ~d_model for the current token (16 and 256 at width 256: a first loss
      of ~100 nats); scaled, at std ~1 and ~sqrt(d_model). False for imported pretrained models
      (they were trained unscaled).
    mlp_layers: per layer, whether it has its SwiGLU MLP (and the MLP's norm); None: every layer
      does. A layer without one is norm + mixer + residual only (the paper's inserted Jet layers).
    loop_layers: the block range [a, b) that a consolidation window loops (Jet-Nemotron's middle
      blocks): such a window runs layers [0, a) once (the prelude), [a, b) N times, each pass
      feeding its output to the next (the first is the range's wake pass), then [b, len(layers))
      once (the coda) on the range's final output; a window that does not sleep runs every layer
      once. None: the whole stack (a = 0, b = len(layers)). Decoding streams compute the same
      (`sleep_lm.inference.decoding`: the sleep re-runs the coda from its states at the window's
      start).
    kernel_implementation: name passed to `kernels.gated_delta_rule(implementation=...)`, or
      None for the backend's best.
    chunk_size: largest chunk for the chunked op; shorter windows use the smallest allowed
      chunk that covers them.
    attention_implementation: None, "xla" or "cudnn": passed to `jax.nn.dot_product_attention`
      (None is XLA's); "pallas_triton": JAX's Pallas flash-attention kernel for the causal calls
      (`kernels.attention`: training windows, a fresh window's prefill; no band), XLA's for the
      masked ones (a decode step against its cache).
    mlp_implementation: None or "xla": the SwiGLU MLP as XLA's products and fusions;
      "pallas_triton": `kernels.swiglu` (Pallas kernels that keep the gate and up products off
      HBM; training layout on one device, decode layouts keep XLA's; interpreted off a GPU).
    merge_projections: in the training layout, the mixers' projections that read one input
      (attention q|k|v, GDN q|k|v|a|b|gate) as one product of their matrices concatenated at
      each call, its output split: the same parameters and function; the backward then forms dx
      in one product and the matrices' gradients in another, instead of one product each and a
      sum of the dx (XLA merges the forward's products by itself, not the backward's). Not
      where a projection's output axis is split over devices (tensor parallel): there each
      stays its own product. Not the SwiGLU's gate|up either: merged, the kernel plan of the
      Rule 110 step grew. Kernel plan of that step (N = 4, 3 seeds, H200): 318.2 GB against
      332.1 with XLA's MLP, 260.2 against 274.1 with the SwiGLU kernels; measured on an H200
      128.17 against 127.48 ms: no faster (docs/performance.md, "Second cut").
    unroll: unroll the window and pass scans of a static schedule into straight-line code (no
      loop carries or stacked residuals to copy; longer compiles).
    scan_layers: run the layers of a pass as `jax.lax.scan`s over maximal runs of a repeated
      group of layers (`sleep_lm.model.hybrid.layer_groups`: SmolLM2 + 4 GDN layers,
      (A*7 G) x 4 + AA, is one scan of 4 repetitions of the 8-layer group and 2 single layers;
      (A G) x 8 a scan of 8 repetitions of 2), so that the program holds each group once rather than
      every layer: shorter compiles, same values. The parameters stay one subtree per layer
      (checkpoints, the optimizer's labels and masks unchanged); each pass stacks the repeated
      layers' parameters and caches to scan over them and unstacks the new caches (copies at every
      call, a decode step included: decode speed with the flag is not measured). False: every layer
      in line (`unroll` does not unroll these scans).
  """
  vocab_size: int
  d_model: int = 256
  layers: tuple[str, ...] = ("attn", "gdn", "attn", "gdn")
  attn_head_dim: int = 64
  attn_heads: int | None = None
  attn_kv_heads: int | None = None
  attn_qkv_bias: bool = False
  gdn_head_dim: int = 64
  mlp_dim: int | None = None
  conv_kernel: int = 4
  rule: str = "gdn"
  window: int = 24
  passes: int = 1
  eviction: str = "hard"
  remat: str = "none"
  dtype: str = "float32"
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  tied_logit_scale: bool = False
  mlp_layers: tuple[bool, ...] | None = None
  loop_layers: tuple[int, int] | None = None
  kernel_implementation: str | None = None
  chunk_size: int = 64
  attention_implementation: str | None = None
  mlp_implementation: str | None = None
  merge_projections: bool = False
  unroll: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if isinstance(self.mlp_layers, (list, tuple)):
      object.__setattr__(self, "mlp_layers", tuple(self.mlp_layers))
    if isinstance(self.loop_layers, list):     # from config.json
      object.__setattr__(self, "loop_layers", tuple(self.loop_layers))

    for field in ("vocab_size", "d_model", "attn_head_dim", "gdn_head_dim", "conv_kernel"):
      check_int(f"ModelConfig.{field}", getattr(self, field), minimum=1)
    expect(is_int(self.window) and self.window >= 1, "ModelConfig.window",
           f"L must be an integer >= 1, got {self.window!r}")
    expect(is_int(self.passes) and self.passes >= 1, "ModelConfig.passes",
           f"N must be an integer >= 1, got {self.passes!r}")
    expect(len(self.layers) >= 1, "ModelConfig.layers", "needs at least one layer")
    unknown = [b for b in self.layers if b not in BLOCK_TYPES]
    expect(not unknown, "ModelConfig.layers",
           f"unknown block name(s) {unknown}; allowed: {BLOCK_TYPES}")
    expect(self.passes == 1 or "gdn" in self.layers, "ModelConfig.passes",
           f"N = {self.passes} > 1 needs at least one 'gdn' layer (only fast-weight states "
           f"survive eviction), got layers {self.layers}")
    expect(self.attn_heads is not None or self.d_model % self.attn_head_dim == 0,
           "ModelConfig.attn_head_dim", f"must divide d_model = {self.d_model} when attn_heads "
           f"is None, got {self.attn_head_dim}")
    expect(self.d_model % self.gdn_head_dim == 0, "ModelConfig.gdn_head_dim",
           f"must divide d_model = {self.d_model}, got {self.gdn_head_dim}")
    for field in ("attn_heads", "attn_kv_heads"):
      value = getattr(self, field)
      expect(value is None or (is_int(value) and value >= 1), f"ModelConfig.{field}",
             f"must be None or an integer >= 1, got {value!r}")
    expect(self.attn_kv_heads is None or self.num_attn_heads % self.attn_kv_heads == 0,
           "ModelConfig.attn_kv_heads", f"must divide the query heads ({self.num_attn_heads}), "
           f"got {self.attn_kv_heads}")
    expect(validation.is_finite_number(self.norm_eps) and self.norm_eps > 0, "ModelConfig.norm_eps",
           f"must be a finite number > 0, got {self.norm_eps!r}")
    check_bool("ModelConfig.attn_qkv_bias", self.attn_qkv_bias)
    check_bool("ModelConfig.tie_embeddings", self.tie_embeddings)
    check_bool("ModelConfig.tied_logit_scale", self.tied_logit_scale)
    expect(not self.tied_logit_scale or self.tie_embeddings, "ModelConfig.tied_logit_scale",
           "scales the tied head's logits: needs tie_embeddings=True (an untied head is "
           "initialised at its own scale)")
    expect(self.mlp_layers is None or (
        isinstance(self.mlp_layers, tuple) and len(self.mlp_layers) == len(self.layers)
        and all(isinstance(x, bool) for x in self.mlp_layers)), "ModelConfig.mlp_layers",
        f"must be None (every layer has an MLP) or one True/False per layer ({len(self.layers)} "
        f"layers), got {self.mlp_layers!r}")
    n = len(self.layers)
    expect(self.loop_layers is None or (
        isinstance(self.loop_layers, tuple) and len(self.loop_layers) == 2
        and all(is_int(x) for x in self.loop_layers)
        and 0 <= self.loop_layers[0] < self.loop_layers[1] <= n), "ModelConfig.loop_layers",
        f"must be None (the whole stack) or a pair (a, b) of layer indices with "
        f"0 <= a < b <= {n} (the model's layers), got {self.loop_layers!r}")
    expect(self.gdn_head_dim <= MAX_HEAD_DIM, "ModelConfig.gdn_head_dim",
           f"must be <= {MAX_HEAD_DIM}, got {self.gdn_head_dim}")
    expect(self.mlp_dim is None or (is_int(self.mlp_dim) and self.mlp_dim >= 1),
           "ModelConfig.mlp_dim", f"must be None or an integer >= 1, got {self.mlp_dim!r}")
    check_choice("ModelConfig.rule", self.rule, RULES)
    check_choice("ModelConfig.eviction", self.eviction, EVICTIONS)
    expect(self.eviction != "none" or self.passes == 1, "ModelConfig.passes",
           "eviction='none' keeps the whole sequence in one window: nothing to consolidate, "
           f"so N must be 1, got {self.passes}")
    check_choice("ModelConfig.remat", self.remat, REMAT_POLICIES)
    check_choice("ModelConfig.dtype", self.dtype, DTYPES)
    check_choice("ModelConfig.chunk_size", self.chunk_size, CHUNK_SIZES)
    impls = available_implementations()
    expect(self.kernel_implementation is None or self.kernel_implementation in impls,
           "ModelConfig.kernel_implementation", f"must be None or one of {impls}, got "
           f"{self.kernel_implementation!r}")
    check_bool("ModelConfig.unroll", self.unroll)
    check_bool("ModelConfig.merge_projections", self.merge_projections)
    check_bool("ModelConfig.scan_layers", self.scan_layers)
    check_choice("ModelConfig.attention_implementation", self.attention_implementation,
                 ATTENTION_IMPLEMENTATIONS)
    check_choice("ModelConfig.mlp_implementation", self.mlp_implementation, MLP_IMPLEMENTATIONS)
    if self.mlp_implementation == "pallas_triton":
      f = self.hidden_dim
      expect(default_tiles_fit(self.d_model, f),
             "ModelConfig.mlp_implementation", f"'pallas_triton' needs d_model a multiple of 64 "
             f"and an MLP width (mlp_dim) a multiple of 128 or 16, 32 or 64; got d_model="
             f"{self.d_model}, MLP width {f}: use None ('xla')")

  @property
  def num_attn_heads(self) -> int:
    """Query heads."""
    return self.attn_heads if self.attn_heads is not None else self.d_model // self.attn_head_dim

  @property
  def num_kv_heads(self) -> int:
    """Key/value heads (the decode caches' heads)."""
    return self.attn_kv_heads if self.attn_kv_heads is not None else self.num_attn_heads

  def has_mlp(self, index: int) -> bool:
    """Whether layer `index` has its SwiGLU MLP."""
    return self.mlp_layers is None or self.mlp_layers[index]

  @property
  def loop_span(self) -> tuple[int, int]:
    """(a, b): the layers [a, b) a consolidation window loops N times (`loop_layers`)."""
    return self.loop_layers if self.loop_layers is not None else (0, len(self.layers))

  @property
  def partial_loop(self) -> bool:
    """Whether sleep loops less than the whole stack (a prelude or a coda runs once)."""
    return self.loop_span != (0, len(self.layers))

  @property
  def num_gdn_heads(self) -> int:
    return self.d_model // self.gdn_head_dim

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or 4 * self.d_model

  @property
  def num_gdn_layers(self) -> int:
    return sum(b == "gdn" for b in self.layers)

  @property
  def num_attn_layers(self) -> int:
    return sum(b == "attn" for b in self.layers)

  @property
  def activation_dtype(self):
    return jax.numpy.dtype(self.dtype)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], path: str = "ModelConfig") -> ModelConfig:
    """Builds a config from a dict or ConfigDict at config path `path` (e.g. "config.model"),
    rejecting unknown keys by name; its errors name the field there."""
    return validation.from_mapping(cls, values, path, owner="ModelConfig")
