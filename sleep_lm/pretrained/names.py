"""Name-mapping tables, one per (file format, architecture family), and the one function that
applies them.

A table is data: for each canonical tensor (see `checkpoint.py`) the name it has in the file and
the operation that turns the stored array into the canonical one. Stored arrays are read in NumPy
order, i.e. [out, in] for the projections in both formats (GGUF lists dimensions innermost first:
ne = [in, out]), so matrices are transposed to [in, out].

The GGUF `llama` family stores q/k rows permuted. Llama's Hugging Face weights pair feature j of a
head with feature j + Dh/2 for RoPE (rotate-half); llama.cpp's `llama` graph applies RoPE to
adjacent pairs (2j, 2j + 1) (its "normal" RoPE type), so its converter (convert_hf_to_gguf.py,
`LlamaModel.permute`) reorders each head's q/k rows: stored row 2j is HF row j and stored row
2j + 1 is HF row j + Dh/2, per head, with Dh/2 = rows / heads / 2 (key rows use the key/value
heads). `unpermute_rope_rows` inverts that. GGUF `qwen2` uses llama.cpp's NeoX RoPE type (the
rotate-half pairing), so its q/k rows are stored unpermuted.

`map_tensors` checks, before reading any data: every canonical tensor has its source tensor, no
source tensor is left over (except names a table marks as ignorable), and every shape is the one
the architecture implies. Each failure names the file, the tensor and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from sleep_lm.pretrained.checkpoint import (
  Architecture,
  CheckpointError,
  canonical_shapes,
  name_list,
)

# Operations: "copy" (vectors, the embedding), "linear" ([out, in] -> [in, out]),
# "linear_rope_q" / "linear_rope_k" (undo the GGUF llama q/k row permutation, then transpose).
OPS = ("copy", "linear", "linear_rope_q", "linear_rope_k")


class Entry(NamedTuple):
  """One row of a table: canonical name, source name ("{i}" = block index), operation."""
  canonical: str
  source: str
  op: str


class Table(NamedTuple):
  """A family's names in one format. `ignore`: regular expressions of source tensors that carry
  no weights and are dropped (e.g. precomputed RoPE frequencies of old checkpoints)."""
  name: str
  entries: tuple[Entry, ...]
  ignore: tuple[str, ...] = ()


def _gguf_table(name: str, rope_permuted: bool) -> Table:
  q_op, k_op = ("linear_rope_q", "linear_rope_k") if rope_permuted else ("linear", "linear")
  return Table(name, (
      Entry("embed", "token_embd.weight", "copy"),
      Entry("blocks.{i}.attn_norm", "blk.{i}.attn_norm.weight", "copy"),
      Entry("blocks.{i}.attn.q_proj", "blk.{i}.attn_q.weight", q_op),
      Entry("blocks.{i}.attn.k_proj", "blk.{i}.attn_k.weight", k_op),
      Entry("blocks.{i}.attn.v_proj", "blk.{i}.attn_v.weight", "linear"),
      Entry("blocks.{i}.attn.o_proj", "blk.{i}.attn_output.weight", "linear"),
      Entry("blocks.{i}.attn.q_bias", "blk.{i}.attn_q.bias", "copy"),
      Entry("blocks.{i}.attn.k_bias", "blk.{i}.attn_k.bias", "copy"),
      Entry("blocks.{i}.attn.v_bias", "blk.{i}.attn_v.bias", "copy"),
      Entry("blocks.{i}.mlp_norm", "blk.{i}.ffn_norm.weight", "copy"),
      Entry("blocks.{i}.mlp.gate_proj", "blk.{i}.ffn_gate.weight", "linear"),
      Entry("blocks.{i}.mlp.up_proj", "blk.{i}.ffn_up.weight", "linear"),
      Entry("blocks.{i}.mlp.down_proj", "blk.{i}.ffn_down.weight", "linear"),
      Entry("final_norm", "output_norm.weight", "copy"),
      Entry("lm_head", "output.weight", "linear"),
  ))


def _hf_table(name: str) -> Table:
  return Table(name, (
      Entry("embed", "model.embed_tokens.weight", "copy"),
      Entry("blocks.{i}.attn_norm", "model.layers.{i}.input_layernorm.weight", "copy"),
      Entry("blocks.{i}.attn.q_proj", "model.layers.{i}.self_attn.q_proj.weight", "linear"),
      Entry("blocks.{i}.attn.k_proj", "model.layers.{i}.self_attn.k_proj.weight", "linear"),
      Entry("blocks.{i}.attn.v_proj", "model.layers.{i}.self_attn.v_proj.weight", "linear"),
      Entry("blocks.{i}.attn.o_proj", "model.layers.{i}.self_attn.o_proj.weight", "linear"),
      Entry("blocks.{i}.attn.q_bias", "model.layers.{i}.self_attn.q_proj.bias", "copy"),
      Entry("blocks.{i}.attn.k_bias", "model.layers.{i}.self_attn.k_proj.bias", "copy"),
      Entry("blocks.{i}.attn.v_bias", "model.layers.{i}.self_attn.v_proj.bias", "copy"),
      Entry("blocks.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
      Entry("blocks.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj.weight", "linear"),
      Entry("blocks.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj.weight", "linear"),
      Entry("blocks.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj.weight", "linear"),
      Entry("final_norm", "model.norm.weight", "copy"),
      Entry("lm_head", "lm_head.weight", "linear"),
  ), ignore=(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",))


# (format, family) -> table. Both families share their names within a format; Qwen2 checkpoints
# have the bias tensors, Llama ones must not (the architecture's `qkv_bias` decides which
# entries are expected; a bias in a checkpoint without it is a leftover and refused).
TABLES: dict[tuple[str, str], Table] = {
    ("gguf", "llama"): _gguf_table("GGUF llama", rope_permuted=True),
    ("gguf", "qwen2"): _gguf_table("GGUF qwen2", rope_permuted=False),
    ("hf", "llama"): _hf_table("Hugging Face LlamaForCausalLM"),
    ("hf", "qwen2"): _hf_table("Hugging Face Qwen2ForCausalLM"),
}
assert all(e.op in OPS for t in TABLES.values() for e in t.entries), "unknown op in a table"


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation of an [out, ...] array with `heads` heads: stored row
  h*Dh + 2j + s (s = 0, 1) goes back to row h*Dh + s*Dh/2 + j."""
  rows = w.shape[0]
  if rows % (2 * heads):
    raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
  half = rows // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expand(table: Table, arch: Architecture) -> dict[str, tuple[str, str]]:
  """canonical name -> (source name, op) for every tensor `arch` has."""
  by_pattern: dict[str, Entry] = {e.canonical: e for e in table.entries}
  out = {}
  for canonical in canonical_shapes(arch):
    pattern = re.sub(r"blocks\.\d+\.", "blocks.{i}.", canonical)
    entry = by_pattern.get(pattern)
    if entry is None:   # a table that misses a canonical tensor is a bug, not a user error
      raise AssertionError(f"table {table.name!r} has no entry for {pattern!r}")
    block = re.match(r"blocks\.(\d+)\.", canonical)
    source = entry.source.format(i=block.group(1)) if block else entry.source
    out[canonical] = (source, entry.op)
  return out


def source_shape(shape: tuple[int, ...], op: str) -> tuple[int, ...]:
  """The shape a tensor has in the file (NumPy order) given its canonical shape."""
  return shape if op == "copy" else shape[::-1]


def map_tensors(table: Table, arch: Architecture, stored: Mapping[str, tuple[int, ...]],
                load: Callable[[str], np.ndarray], where: str,
                allow_extra: Callable[[str], bool] = lambda name: False) -> dict[str, np.ndarray]:
  """Reads a checkpoint's tensors into canonical form.

  Args:
    table: the format's and family's names.
    arch: the architecture read from the file's metadata.
    stored: source tensor name -> shape in NumPy order, for every tensor in the file.
    load: source name -> the stored values as a floating-point array (dequantized).
    where: the file, for messages.
    allow_extra: says whether a source tensor that maps to nothing may be dropped (the reader's
      own rule, e.g. a tied `lm_head.weight` equal to the embedding); the table's `ignore`
      patterns are always dropped.
  Returns:
    canonical name -> float32 array.
  """
  plan = expand(table, arch)
  expected = canonical_shapes(arch)
  missing = [f"{src!r} (canonical {name})" for name, (src, _) in plan.items() if src not in stored]
  if missing:
    raise CheckpointError(f"{where}: missing tensor(s) for a {table.name} with "
                          f"{arch.layers} blocks: {name_list(missing, 8, quote=False)}")
  used = {src for src, _ in plan.values()}
  leftover = sorted(n for n in stored if n not in used
                    and not any(re.fullmatch(p, n) for p in table.ignore) and not allow_extra(n))
  if leftover:
    raise CheckpointError(
        f"{where}: tensor(s) this {table.name} reader does not know (an architecture feature it "
        f"does not support, e.g. biases, or more blocks than the metadata says): "
        f"{name_list(leftover, 8)}")
  for name, (src, op) in plan.items():
    want = source_shape(expected[name], op)
    if tuple(stored[src]) != want:
      raise CheckpointError(f"{where}: tensor {src!r} (canonical {name}) has shape "
                            f"{tuple(stored[src])}, expected {want} from the metadata")
  out = {}
  for name, (src, op) in plan.items():
    w = np.asarray(load(src))
    if w.shape != tuple(stored[src]):
      raise CheckpointError(f"{where}: tensor {src!r} read back with shape {w.shape}, its header "
                            f"says {tuple(stored[src])}")
    if op == "linear_rope_q":
      w = unpermute_rope_rows(w, arch.heads)
    elif op == "linear_rope_k":
      w = unpermute_rope_rows(w, arch.kv_heads)
    if op != "copy":
      w = w.T
    out[name] = np.ascontiguousarray(w, dtype=np.float32)
  return out
