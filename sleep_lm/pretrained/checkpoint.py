"""The neutral in-memory form of a pretrained decoder: its hyper-parameters and canonical tensors.

Every reader (GGUF, Hugging Face folder) produces a `Checkpoint`; everything downstream (the NumPy
oracle, sleep_lm's importer) consumes only this form, so the file formats stay in their readers.

A `Checkpoint` is valid by construction: `Architecture` checks its fields, and `Checkpoint`
checks that it holds exactly the tensors `canonical_shapes(arch)` names, each float32 of that
shape.

Canonical tensors (all float32; matrices [in, out], i.e. y = x @ W, like a Flax `nn.Dense`
kernel; `H` heads, `G` key/value heads, `Dh` head size, `F` MLP width, `V` vocabulary, `D` width):

  embed                      [V, D]       token embedding (row = token id)
  blocks.{i}.attn_norm       [D]          RMSNorm gain before attention
  blocks.{i}.attn.q_proj     [D, H*Dh]    query; column h*Dh + j is head h, feature j
  blocks.{i}.attn.k_proj     [D, G*Dh]    key
  blocks.{i}.attn.v_proj     [D, G*Dh]    value
  blocks.{i}.attn.o_proj     [H*Dh, D]    attention output
  blocks.{i}.attn.q_bias     [H*Dh]       only when arch.qkv_bias (Qwen2)
  blocks.{i}.attn.k_bias     [G*Dh]       only when arch.qkv_bias
  blocks.{i}.attn.v_bias     [G*Dh]       only when arch.qkv_bias
  blocks.{i}.mlp_norm        [D]          RMSNorm gain before the MLP
  blocks.{i}.mlp.gate_proj   [D, F]       SwiGLU: down(silu(x @ gate) * (x @ up))
  blocks.{i}.mlp.up_proj     [D, F]
  blocks.{i}.mlp.down_proj   [F, D]
  final_norm                 [D]          RMSNorm gain before the head
  lm_head                    [D, V]       only when not arch.tied_embeddings (else h @ embed.T)

Query and key features are in the rotate-half ("NeoX", Hugging Face) RoPE layout: within a head,
feature j < Dh/2 is rotated together with feature j + Dh/2 at frequency base^(-2j/Dh). That is
sleep_lm's `apply_rope` convention; readers undo any other layout (see `names.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from sleep_lm.common.errors import UserError
from sleep_lm.common.validation import (
  FieldError,
  check_bool,
  check_choice,
  check_int,
  expect,
  is_finite_number,
)

FAMILIES = ("llama", "qwen2")


class CheckpointError(UserError):
  """A checkpoint that cannot be read: a missing, unexpected or misshapen tensor, an unsupported
  architecture, field or tensor type. The message names the file, the tensor or field, and what
  was expected."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Hyper-parameters of a Llama-family decoder (pre-norm RMSNorm blocks, RoPE attention with
  grouped key/value heads, SwiGLU MLP).

  Attributes:
    family: "llama" or "qwen2" (Qwen2 = Llama with biases on the q/k/v projections).
    vocab_size: rows of the embedding (may exceed the tokenizer's vocabulary: padding rows).
    d_model: width of the residual stream.
    layers: number of blocks.
    heads: query heads.
    kv_heads: key/value heads (grouped-query attention: heads % kv_heads == 0).
    head_dim: size of each head (RoPE rotates all of it; partial rotary is refused by readers).
    mlp_dim: SwiGLU hidden width.
    rope_base: RoPE frequency base (theta). No RoPE scaling: readers refuse it by name.
    norm_eps: RMSNorm epsilon (added to the mean square).
    tied_embeddings: the output head is the transposed embedding (no `lm_head` tensor).
    qkv_bias: the q/k/v projections have biases (`*_bias` tensors).
    context_length: the context the model was trained for (informational).
    bos_id: beginning-of-sequence token id, if the checkpoint names one.
    eos_ids: end-of-sequence token ids (some models have several).
  """
  family: str
  vocab_size: int
  d_model: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float
  norm_eps: float
  tied_embeddings: bool
  qkv_bias: bool
  context_length: int
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
    try:
      self._check_fields()
    except FieldError as e:        # a checkpoint's hyper-parameter: the user's to fix
      raise CheckpointError(str(e)) from None

  def _check_fields(self):
    check_choice("Architecture.family", self.family, FAMILIES)
    for field in ("vocab_size", "d_model", "layers", "heads", "kv_heads", "head_dim", "mlp_dim",
                  "context_length"):
      check_int(f"Architecture.{field}", getattr(self, field), 1)
    expect(self.heads % self.kv_heads == 0, "Architecture.kv_heads",
           f"must divide heads = {self.heads}, got {self.kv_heads}")
    expect(self.head_dim % 2 == 0, "Architecture.head_dim",
           f"must be even (RoPE), got {self.head_dim}")
    for field in ("rope_base", "norm_eps"):
      value = getattr(self, field)
      expect(is_finite_number(value) and value > 0, f"Architecture.{field}",
             f"must be a finite number > 0, got {value!r}")
    for field in ("tied_embeddings", "qkv_bias"):
      check_bool(f"Architecture.{field}", getattr(self, field))
    ids = ([self.bos_id] if self.bos_id is not None else []) + list(self.eos_ids)
    expect(all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids),
           "Architecture.bos_id/eos_ids", f"token ids must be in [0, {self.vocab_size}), got bos "
           f"{self.bos_id!r}, eos {self.eos_ids!r}")

  @property
  def q_dim(self) -> int:
    return self.heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.kv_heads * self.head_dim


def canonical_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
  """Every tensor a checkpoint of `arch` holds, by canonical name, with its shape."""
  d, f, v = arch.d_model, arch.mlp_dim, arch.vocab_size
  shapes: dict[str, tuple[int, ...]] = {"embed": (v, d)}
  for i in range(arch.layers):
    b = f"blocks.{i}."
    shapes[b + "attn_norm"] = (d,)
    shapes[b + "attn.q_proj"] = (d, arch.q_dim)
    shapes[b + "attn.k_proj"] = (d, arch.kv_dim)
    shapes[b + "attn.v_proj"] = (d, arch.kv_dim)
    shapes[b + "attn.o_proj"] = (arch.q_dim, d)
    if arch.qkv_bias:
      shapes[b + "attn.q_bias"] = (arch.q_dim,)
      shapes[b + "attn.k_bias"] = (arch.kv_dim,)
      shapes[b + "attn.v_bias"] = (arch.kv_dim,)
    shapes[b + "mlp_norm"] = (d,)
    shapes[b + "mlp.gate_proj"] = (d, f)
    shapes[b + "mlp.up_proj"] = (d, f)
    shapes[b + "mlp.down_proj"] = (f, d)
  shapes["final_norm"] = (d,)
  if not arch.tied_embeddings:
    shapes["lm_head"] = (d, v)
  return shapes


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
  """A pretrained decoder in canonical form.

  Attributes:
    arch: the hyper-parameters.
    tensors: canonical name -> float32 array (see the module docstring for names and shapes).
    source: where it was read from (a path), for messages.
    source_types: canonical name -> the tensor's type in the file ("F32", "BF16", "Q4_1", ...).
    metadata: other facts the reader kept (e.g. the model's name, the GGUF file type), as strings.
  """
  arch: Architecture
  tensors: Mapping[str, np.ndarray]
  source: str = ""
  source_types: Mapping[str, str] = dataclasses.field(default_factory=dict)
  metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    where = f" ({self.source})" if self.source else ""
    expected = canonical_shapes(self.arch)
    missing = [n for n in expected if n not in self.tensors]
    extra = sorted(n for n in self.tensors if n not in expected)
    if missing or extra:
      raise CheckpointError(f"Checkpoint{where}: tensors do not match the architecture: missing "
                            f"{name_list(missing)}, unexpected {name_list(extra)}")
    for name, shape in expected.items():
      t = self.tensors[name]
      if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.shape != shape:
        got = (f"{t.dtype} {t.shape}" if isinstance(t, np.ndarray) else type(t).__name__)
        raise CheckpointError(f"Checkpoint{where}: tensor {name!r} must be float32 {shape}, "
                              f"got {got}")

  @property
  def num_parameters(self) -> int:
    return sum(int(t.size) for t in self.tensors.values())


def name_list(names, limit: int = 6, quote: bool = True) -> str:
  """A short listing of names for a message: the first `limit`, then how many more."""
  names = list(names)
  if not names:
    return "none"
  shown = ", ".join(repr(n) if quote else str(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
