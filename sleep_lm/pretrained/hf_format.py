"""A Hugging Face model folder (config.json + *.safetensors) -> `Checkpoint`.

Supported `model_type`s: "llama" (LlamaForCausalLM) and "qwen2" (Qwen2ForCausalLM, whose q/k/v
projections have biases). Weights come from `model.safetensors`, or the shards that
`model.safetensors.index.json` lists, or every `*.safetensors` in the folder; F32, F16 and BF16
tensors are read (PyTorch `.bin` files are not). Refused by name: another `hidden_act` than
silu, RoPE scaling (`rope_scaling`, or a `rope_parameters.rope_type` other than "default"),
partial rotary embeddings, Llama's `attention_bias` / `mlp_bias`, Qwen2's sliding window.
A `lm_head.weight` stored next to tied embeddings is accepted only when it equals the embedding.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sleep_lm.pretrained.checkpoint import Architecture, Checkpoint, CheckpointError
from sleep_lm.pretrained.names import TABLES, expand, map_tensors

HF_FAMILIES = ("llama", "qwen2")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_config(folder: Path) -> dict:
  path = folder / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read JSON: {e}") from e


def _rope_base(cfg: dict, where: str) -> float:
  """rope_theta, from the top level (transformers 4.x) or `rope_parameters` (5.x); RoPE scaling
  of any kind is refused."""
  params = cfg.get("rope_parameters") or {}
  if isinstance(params, dict) and params.get("rope_type", "default") != "default":
    raise CheckpointError(f"{where}: rope_parameters.rope_type = {params['rope_type']!r} (RoPE "
                          "scaling) is not supported")
  scaling = cfg.get("rope_scaling")
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind != "default":
      raise CheckpointError(f"{where}: rope_scaling = {scaling!r} (type {kind!r}) is not "
                            "supported")
  base = cfg.get("rope_theta", params.get("rope_theta", 10_000.0) if isinstance(params, dict)
                 else 10_000.0)
  return float(base)


def read_architecture(cfg: dict, where: str) -> tuple[Architecture, bool]:
  """The hyper-parameters from config.json, and whether the head is tied."""
  family = cfg.get("model_type")
  if family not in HF_FAMILIES:
    raise CheckpointError(f"{where}: model_type {family!r} is not supported; supported: "
                          f"{HF_FAMILIES} (architectures {cfg.get('architectures')})")

  def get(key, default=None, required=True):
    if key not in cfg or cfg[key] is None:
      if required and default is None:
        raise CheckpointError(f"{where}: config.json has no {key!r}")
      return default
    return cfg[key]

  act = get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{where}: hidden_act = {act!r} is not supported (SwiGLU needs 'silu')")
  for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
    if get(key, False):
      raise CheckpointError(f"{where}: {key} = true is not supported")
  if float(get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError(f"{where}: partial_rotary_factor = {cfg['partial_rotary_factor']} is "
                          "not supported (RoPE must rotate the whole head)")
  d, heads = get("hidden_size"), get("num_attention_heads")
  head_dim = get("head_dim", required=False) or (d // heads if d % heads == 0 else None)
  if head_dim is None:
    raise CheckpointError(f"{where}: hidden_size = {d} is not a multiple of num_attention_heads "
                          f"= {heads} and head_dim is missing")
  eos = get("eos_token_id", required=False)
  tied = bool(get("tie_word_embeddings", False))
  arch = Architecture(
      family=family, vocab_size=get("vocab_size"), d_model=d,
      layers=get("num_hidden_layers"), heads=heads,
      kv_heads=get("num_key_value_heads", heads), head_dim=head_dim,
      mlp_dim=get("intermediate_size"), rope_base=_rope_base(cfg, where),
      norm_eps=float(get("rms_norm_eps")), tied_embeddings=tied, qkv_bias=family == "qwen2",
      context_length=get("max_position_embeddings"),
      bos_id=get("bos_token_id", required=False),
      eos_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos))
  return arch, tied


def safetensors_files(folder: Path) -> list[Path]:
  """The weight files: the index's shards, else model.safetensors, else every *.safetensors."""
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: cannot read its weight_map: {e}") from e
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    absent = [p.name for p in files if not p.is_file()]
    if absent:
      raise CheckpointError(f"{index}: lists shard(s) that are not in the folder: {absent}")
    return files
  if (folder / "model.safetensors").is_file():
    return [folder / "model.safetensors"]
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not "
                          "read; save the model with safe_serialization=True)")
  return files


def read_hf(folder: str | os.PathLike) -> Checkpoint:
  """Reads a Hugging Face Llama/Qwen2 folder into a `Checkpoint`."""
  try:
    from safetensors import safe_open
  except ImportError as e:
    raise CheckpointError("reading safetensors needs the `safetensors` package: pip install "
                          "'sleep_lm[pretrained]'") from e
  folder = Path(folder)
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: not a folder")
  where = str(folder)
  arch, tied = read_architecture(read_config(folder), where)
  table = TABLES["hf", arch.family]
  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}
    stored: dict[str, tuple[int, ...]] = {}
    types: dict[str, str] = {}
    for path in safetensors_files(folder):
      try:
        f = stack.enter_context(safe_open(str(path), framework="numpy"))
      except Exception as e:   # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot open as safetensors: {e}") from e
      for name in f.keys():
        if name in handles:
          raise CheckpointError(f"{where}: tensor {name!r} is stored twice (in "
                                f"{handles[name][1].name} and {path.name})")
        sl = f.get_slice(name)
        handles[name] = (f, path)
        stored[name] = tuple(int(n) for n in sl.get_shape())
        types[name] = sl.get_dtype()

    def load(name):
      if types[name] not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: tensor {name!r} has dtype {types[name]}; only "
                              f"{FLOAT_DTYPES} are read")
      return handles[name][0].get_tensor(name).astype(np.float32)

    tied_head = tied and "lm_head.weight" in stored
    weights = map_tensors(table, arch, stored, load, where,
                          allow_extra=lambda name: tied_head and name == "lm_head.weight")
    if tied_head:
      head = load("lm_head.weight")
      if head.shape != weights["embed"].shape or not np.array_equal(head, weights["embed"]):
        raise CheckpointError(f"{where}: tie_word_embeddings is true but 'lm_head.weight' differs "
                              "from 'model.embed_tokens.weight'")
  plan = expand(table, arch)
  return Checkpoint(arch, weights, source=where,
                    source_types={n: types[src] for n, (src, _) in plan.items()})
