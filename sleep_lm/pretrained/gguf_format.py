"""GGUF (llama.cpp's format) -> `Checkpoint`, through the `gguf` package's reader and dequantizer.

Supported: `general.architecture` "llama" (q/k rows permuted by llama.cpp's converter, undone
here; see `names.py`) and "qwen2" (q/k/v biases, no permutation). Every tensor type the `gguf`
package can dequantize is read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...);
integer and unknown types are refused by name. Hyper-parameters come from the metadata keys
`{arch}.embedding_length`, `{arch}.block_count`, `{arch}.attention.head_count(_kv)`,
`{arch}.attention.key_length` (else d / heads), `{arch}.feed_forward_length`,
`{arch}.rope.freq_base` (llama.cpp's default 10000 when absent), `{arch}.rope.dimension_count`
(must be the head size), `{arch}.attention.layer_norm_rms_epsilon`, `{arch}.context_length`,
and the tokenizer's bos/eos ids. RoPE scaling (`{arch}.rope.scaling.*`, a `rope_freqs.weight`
tensor), mixtures of experts, sliding-window attention and per-layer head counts are refused by
name. The head is tied when the file has no `output.weight`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sleep_lm.pretrained.checkpoint import Architecture, Checkpoint, CheckpointError
from sleep_lm.pretrained.names import TABLES, expand, map_tensors

GGUF_FAMILIES = ("llama", "qwen2")
_REQUIRED = object()


def open_gguf(path: str | os.PathLike) -> Any:
  """Opens a GGUF file (memory-mapped; reading the metadata takes a few seconds for a 49K-token
  vocabulary). Returns a `gguf.GGUFReader`."""
  try:
    from gguf import GGUFReader
  except ImportError as e:
    raise CheckpointError("reading GGUF files needs the `gguf` package: pip install "
                          "'sleep_lm[pretrained]' (or pip install gguf==0.19.0)") from e
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"GGUF file {path!r} does not exist")
  try:
    return GGUFReader(path)
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from e


def reader_path(reader: Any) -> str:
  return str(getattr(reader.data, "filename", "GGUF file"))


def field(reader: Any, key: str, kind: type, default: Any = _REQUIRED, why: str = "") -> Any:
  """A metadata value of type `kind` (int, float, str, bool or list), `default` when absent."""
  where = reader_path(reader)
  f = reader.fields.get(key)
  if f is None:
    if default is _REQUIRED:
      raise CheckpointError(f"{where}: metadata key {key!r} is missing" + (f" ({why})" if why
                                                                           else ""))
    return default
  from gguf import GGUFValueType
  is_array = f.types and f.types[0] == GGUFValueType.ARRAY
  value = f.contents()
  if kind is list:
    ok = is_array
  elif is_array:
    ok = False
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and f.types[0] == GGUFValueType.FLOAT32:
      value = float(str(np.float32(value)))   # the decimal the writer meant, e.g. 1e-05
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  else:
    ok = isinstance(value, kind)
  if not ok:
    shown = f"an array of {len(f.data)}" if is_array else repr(value)
    raise CheckpointError(f"{where}: metadata key {key!r} must be a single {kind.__name__}"
                          f"{' array' if kind is list else ''}, got {shown}"
                          + (f" ({why})" if why else ""))
  return float(value) if kind is float else value


def read_architecture(reader: Any) -> Architecture:
  """The hyper-parameters from the metadata (and, for the vocabulary, the bias and the tied head,
  from which tensors exist)."""
  where = reader_path(reader)
  split = field(reader, "split.count", int, 1)
  if split > 1:
    raise CheckpointError(f"{where}: a GGUF split into {split} files; merge it first "
                          "(llama.cpp's `llama-gguf-split --merge`)")
  family = field(reader, "general.architecture", str)
  if family not in GGUF_FAMILIES:
    raise CheckpointError(f"{where}: GGUF architecture {family!r} is not supported; supported: "
                          f"{GGUF_FAMILIES} (Llama-family decoders)")
  p = family + "."
  tensors = {t.name: t for t in reader.tensors}
  for key in (p + "expert_count", p + "attention.sliding_window"):
    if field(reader, key, int, 0):
      raise CheckpointError(f"{where}: metadata {key!r} = {field(reader, key, int)}: mixtures "
                            "of experts and sliding-window attention are not supported")
  scaling = field(reader, p + "rope.scaling.type", str, "none")
  factor = field(reader, p + "rope.scaling.factor", float, 1.0)
  if scaling != "none" or factor not in (0.0, 1.0):
    raise CheckpointError(f"{where}: RoPE scaling ({p}rope.scaling.type = {scaling!r}, factor "
                          f"{factor}) is not supported")
  if "rope_freqs.weight" in tensors:
    raise CheckpointError(f"{where}: tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency "
                          "scaling) is not supported")

  d = field(reader, p + "embedding_length", int, why="d_model")
  heads = field(reader, p + "attention.head_count", int, why="query heads")
  kv_heads = field(reader, p + "attention.head_count_kv", int, heads)
  if heads >= 1 and d % heads and p + "attention.key_length" not in reader.fields:
    raise CheckpointError(f"{where}: {p}embedding_length = {d} is not a multiple of "
                          f"{p}attention.head_count = {heads} and {p}attention.key_length is "
                          "missing")
  head_dim = field(reader, p + "attention.key_length", int, d // max(heads, 1))
  value_dim = field(reader, p + "attention.value_length", int, head_dim)
  if value_dim != head_dim:
    raise CheckpointError(f"{where}: {p}attention.value_length = {value_dim} differs from the "
                          f"key length {head_dim}: not supported")
  rope_dim = field(reader, p + "rope.dimension_count", int, head_dim)
  if rope_dim != head_dim:
    raise CheckpointError(f"{where}: {p}rope.dimension_count = {rope_dim} is not the head size "
                          f"{head_dim}: partial rotary embeddings are not supported")
  if "token_embd.weight" not in tensors:
    raise CheckpointError(f"{where}: missing tensor 'token_embd.weight' (the embedding)")
  embd = tensors["token_embd.weight"]
  vocab = int(embd.shape[1]) if len(embd.shape) == 2 else -1
  declared = field(reader, p + "vocab_size", int, vocab)
  if declared != vocab:
    raise CheckpointError(f"{where}: {p}vocab_size = {declared} but 'token_embd.weight' has "
                          f"{vocab} rows")
  eos = field(reader, "tokenizer.ggml.eos_token_id", int, None)
  eot = field(reader, "tokenizer.ggml.eot_token_id", int, None)
  return Architecture(
      family=family, vocab_size=vocab, d_model=d,
      layers=field(reader, p + "block_count", int, why="number of blocks"),
      heads=heads, kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=field(reader, p + "feed_forward_length", int, why="MLP width"),
      rope_base=field(reader, p + "rope.freq_base", float, 10_000.0),
      norm_eps=field(reader, p + "attention.layer_norm_rms_epsilon", float, why="RMSNorm eps"),
      tied_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors,
      context_length=field(reader, p + "context_length", int, why="context length"),
      bos_id=field(reader, "tokenizer.ggml.bos_token_id", int, None),
      eos_ids=tuple(dict.fromkeys(i for i in (eos, eot) if i is not None)))


def dequantize(reader_tensor: Any, where: str) -> np.ndarray:
  """A tensor's values as float32 through `gguf.quants.dequantize`, in NumPy order."""
  from gguf import quants
  t = reader_tensor
  try:
    values = quants.dequantize(t.data, t.tensor_type)
  except NotImplementedError as e:
    raise CheckpointError(f"{where}: tensor {t.name!r} has type {t.tensor_type.name}, which the "
                          f"gguf package cannot dequantize ({e})") from e
  if not np.issubdtype(values.dtype, np.floating):
    raise CheckpointError(f"{where}: tensor {t.name!r} has the integer type "
                          f"{t.tensor_type.name}; weights must be floating point or quantized")
  return values.reshape(tuple(int(n) for n in reversed(t.shape))).astype(np.float32, copy=False)


def read_gguf(source: str | os.PathLike | Any) -> Checkpoint:
  """Reads a GGUF file (a path, or a reader from `open_gguf`) into a `Checkpoint`."""
  reader = source if hasattr(source, "tensors") else open_gguf(source)
  where = reader_path(reader)
  arch = read_architecture(reader)
  tensors = {t.name: t for t in reader.tensors}
  stored = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}
  weights = map_tensors(TABLES["gguf", arch.family], arch, stored,
                        lambda name: dequantize(tensors[name], where), where)
  plan = expand(TABLES["gguf", arch.family], arch)
  metadata = {k: str(field(reader, k, str)) for k in
              ("general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre") if k in reader.fields}
  return Checkpoint(arch, weights, source=where,
                    source_types={n: tensors[src].tensor_type.name for n, (src, _) in plan.items()},
                    metadata=metadata)
