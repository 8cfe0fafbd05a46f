"""A `Checkpoint` as sleep_lm parameters: the all-attention `ModelConfig` of its architecture and
the training-layout parameter tree of `HybridLM` holding its tensors.

One table (`PARAM_NAMES`) maps canonical names to sleep_lm parameter paths; one function
(`import_params`) applies it. Canonical matrices are already [in, out] (`Linear` / `nn.Dense`
kernels) and norm gains are `RMSNorm` scales, so every tensor is copied as is. Before copying, the
function checks the whole mapping against the parameters `HybridLM(config)` creates
(`jax.eval_shape` of its init): every parameter filled, no tensor left over, every shape equal;
a mismatch is a `CheckpointError` naming the canonical tensor and the parameter path.

  canonical                 sleep_lm parameter (layer index i)
  embed                     embedding/embedding
  blocks.{i}.attn_norm      layer_{i}_mixer_norm/scale
  blocks.{i}.attn.q_proj    layer_{i}_attn/q/kernel       (k_proj, v_proj: k, v)
  blocks.{i}.attn.o_proj    layer_{i}_attn/out/kernel
  blocks.{i}.attn.q_bias    layer_{i}_attn/q/bias         (k_bias, v_bias: k, v; Qwen2)
  blocks.{i}.mlp_norm       layer_{i}_mlp_norm/scale
  blocks.{i}.mlp.gate_proj  layer_{i}_mlp/gate/kernel     (up_proj, down_proj: up, down)
  final_norm                final_norm/scale
  lm_head                   head/kernel                    (tied: none, the embedding serves)

Qwen2's q/k/v biases become `ModelConfig.attn_qkv_bias` and the projections' `bias` parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np

from sleep_lm.model.config import ModelConfig
from sleep_lm.pretrained.checkpoint import Architecture, Checkpoint, CheckpointError, name_list

# canonical name pattern -> sleep_lm parameter path ({i}: the layer index).
PARAM_NAMES: tuple[tuple[str, str], ...] = (
    ("embed", "embedding/embedding"),
    ("blocks.{i}.attn_norm", "layer_{i}_mixer_norm/scale"),
    ("blocks.{i}.attn.q_proj", "layer_{i}_attn/q/kernel"),
    ("blocks.{i}.attn.k_proj", "layer_{i}_attn/k/kernel"),
    ("blocks.{i}.attn.v_proj", "layer_{i}_attn/v/kernel"),
    ("blocks.{i}.attn.o_proj", "layer_{i}_attn/out/kernel"),
    ("blocks.{i}.attn.q_bias", "layer_{i}_attn/q/bias"),
    ("blocks.{i}.attn.k_bias", "layer_{i}_attn/k/bias"),
    ("blocks.{i}.attn.v_bias", "layer_{i}_attn/v/bias"),
    ("blocks.{i}.mlp_norm", "layer_{i}_mlp_norm/scale"),
    ("blocks.{i}.mlp.gate_proj", "layer_{i}_mlp/gate/kernel"),
    ("blocks.{i}.mlp.up_proj", "layer_{i}_mlp/up/kernel"),
    ("blocks.{i}.mlp.down_proj", "layer_{i}_mlp/down/kernel"),
    ("final_norm", "final_norm/scale"),
    ("lm_head", "head/kernel"),
)
_PATTERNS = tuple((re.compile(re.escape(c).replace(r"\{i\}", r"(\d+)") + "$"), p)
                  for c, p in PARAM_NAMES)


def param_path(canonical: str) -> str | None:
  """The sleep_lm parameter path of a canonical tensor name, or None if it has none."""
  for pattern, path in _PATTERNS:
    m = pattern.match(canonical)
    if m:
      return path.format(i=m.group(1)) if m.groups() else path
  return None


def model_config(arch: Architecture, *, eviction: str = "none", window: int | None = None,
                 **overrides) -> ModelConfig:
  """The all-attention sleep_lm config of `arch`: layers ("attn",) * n, its heads (GQA), head
  size, MLP width, RoPE base, RMSNorm epsilon and head tying; eviction "none" (one window over
  the whole sequence: exactly the pretrained model) unless a window eviction is asked for.

  window: L, needed for eviction "hard" / "sliding"; for "none" it defaults to the model's
  context length (training ignores it then). `overrides`: any other ModelConfig field (dtype,
  passes, gdn_head_dim, ...). Q/k/v biases (Qwen2): `attn_qkv_bias`."""
  if eviction != "none" and window is None:
    raise CheckpointError(f"eviction={eviction!r} needs a window (L)")
  gdn_head_dim = arch.head_dim if arch.d_model % arch.head_dim == 0 else 64
  fields = dict(
      vocab_size=arch.vocab_size, d_model=arch.d_model, layers=("attn",) * arch.layers,
      attn_head_dim=arch.head_dim,
      attn_heads=None if arch.heads * arch.head_dim == arch.d_model else arch.heads,
      attn_kv_heads=None if arch.kv_heads == arch.heads else arch.kv_heads,
      attn_qkv_bias=arch.qkv_bias,
      gdn_head_dim=gdn_head_dim, mlp_dim=arch.mlp_dim, rope_base=float(arch.rope_base),
      norm_eps=float(arch.norm_eps), tie_embeddings=arch.tied_embeddings, eviction=eviction,
      window=window if window is not None else arch.context_length)
  return ModelConfig(**(fields | overrides))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every training-layout parameter of `HybridLM(config)`, path -> shape (nothing computed)."""
  import flax.linen as nn

  from sleep_lm.model.hybrid import init_params
  tree = jax.eval_shape(lambda: nn.meta.unbox(init_params(config, jax.random.key(0))))
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def import_params(checkpoint: Checkpoint, config: ModelConfig) -> dict:
  """The parameters of `HybridLM(config)` (training layout, float32 NumPy arrays, no seed
  axis) holding `checkpoint`'s tensors; `config` is usually `model_config(checkpoint.arch)`.
  Every parameter must come from the checkpoint and every tensor must be used (else a
  `CheckpointError` naming them)."""
  where = f" ({checkpoint.source})" if checkpoint.source else ""
  expected = expected_shapes(config)
  mapped, leftover = {}, []
  for name in checkpoint.tensors:
    path = param_path(name)
    if path is None or path not in expected:
      leftover.append(f"{name} (-> {path or 'no sleep_lm parameter'})")
    else:
      mapped[path] = name
  missing = [p for p in expected if p not in mapped]
  if leftover or missing:
    raise CheckpointError(
        f"import{where}: the checkpoint does not fit the sleep_lm model: tensors without a "
        f"parameter: {name_list(leftover, quote=False)}; parameters without a tensor: "
        f"{name_list(missing)}")
  for path, name in mapped.items():
    got = checkpoint.tensors[name].shape
    if got != expected[path]:
      raise CheckpointError(f"import{where}: tensor {name!r} {got} does not fit parameter "
                            f"{path!r} {expected[path]}")
  return _nest({path: np.asarray(checkpoint.tensors[name], np.float32)
                for path, name in mapped.items()})
