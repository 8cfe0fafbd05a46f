"""Model features of pretrained architectures as ModelConfig data (issue 23, phase B): grouped-query
attention, the RMSNorm epsilon, tied embeddings, MLP-less layers.

Each is checked against an obviously-equivalent model in today's features on fresh random
parameters: GQA against multi-head attention whose key/value projections repeat each key/value
head for its group of query heads (Hugging Face's `repeat_kv`); the tied head against an untied
head holding the transposed embedding; an MLP-less layer against the same layer whose MLP's down
projection is zero; the norms against a NumPy RMSNorm. Then decoding (a `Stream`, every window
sleeping with N = 2 passes) against the training forward on a config with all of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.common.validation import FieldError
from sleep_lm.inference.stream import Stream
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params
from sleep_lm.model.layers import RMSNorm
from sleep_lm.model.sleep import sleep_forward

TOL = 1e-5


def config(**overrides) -> ModelConfig:
  base = dict(vocab_size=11, d_model=32, layers=("attn", "attn"), attn_head_dim=8,
              gdn_head_dim=16, mlp_dim=40, window=6)
  return ModelConfig(**{**base, **overrides})


def make_params(cfg: ModelConfig, seed: int = 0):
  """Random parameters of every shape `HybridLM(cfg)` creates (`jax.eval_shape` of its init:
  nothing compiled), drawn with NumPy."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))

  def draw(path, leaf):
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1 + 0.1 * x if "norm" in jax.tree_util.keystr(path) else 0.3 * x
  return jax.tree_util.tree_map_with_path(draw, shapes)


def logits(cfg, params, tokens):
  return np.asarray(jax.jit(HybridLM(cfg).apply)({"params": params}, tokens), np.float64)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def tokens(seed: int = 0, shape=(2, 12)):
  return np.random.default_rng(seed).integers(0, 11, shape).astype(np.int32)


def test_defaults_keep_todays_parameters():
  cfg = config()
  assert (cfg.num_attn_heads, cfg.num_kv_heads, cfg.norm_eps, cfg.tie_embeddings) == (
      4, 4, 1e-6, False)
  shapes = jax.tree.map(lambda x: x.shape, make_params(cfg))
  assert shapes["layer_0_attn"] == {n: {"kernel": (32, 32)} for n in ("q", "k", "v", "out")}
  assert shapes["head"] == {"kernel": (32, 11)}
  assert not cfg.attn_qkv_bias
  assert all(f"layer_{i}_{n}" in shapes for i in range(2) for n in ("mlp", "mlp_norm"))


def test_grouped_query_attention_is_attention_with_repeated_kv_heads():
  heads, kv, hd = 4, 2, 8
  gqa = config(attn_kv_heads=kv)
  params = make_params(gqa, seed=1)
  assert params["layer_0_attn"]["k"]["kernel"].shape == (32, kv * hd)
  assert params["layer_0_attn"]["q"]["kernel"].shape == (32, heads * hd)
  mha = config()
  repeated = jax.tree.map(lambda x: x, params)
  for i in (0, 1):
    for n in ("k", "v"):
      w = params[f"layer_{i}_attn"][n]["kernel"].reshape(32, kv, 1, hd)
      # query head h reads kv head h // (heads / kv): kv head j repeated for heads 2j, 2j + 1
      repeated[f"layer_{i}_attn"][n] = {"kernel": jnp.broadcast_to(
          w, (32, kv, heads // kv, hd)).reshape(32, heads * hd)}
  x = tokens(1)
  want = logits(mha, repeated, x)
  assert rel_err(logits(gqa, params, x), want) < TOL
  # The grouping matters: kv heads paired with the wrong query heads give other logits.
  swapped = jax.tree.map(lambda x: x, repeated)
  for n in ("k", "v"):
    w = repeated["layer_0_attn"][n]["kernel"].reshape(32, heads, hd)
    swapped["layer_0_attn"][n] = {"kernel": w[:, [0, 2, 1, 3]].reshape(32, heads * hd)}
  assert rel_err(logits(mha, swapped, x), want) > 1e-3


def test_query_heads_decoupled_from_the_width():
  cfg = config(attn_heads=6, attn_kv_heads=3, attn_head_dim=8)      # 6 * 8 = 48 != d_model 32
  params = make_params(cfg)
  assert params["layer_0_attn"]["q"]["kernel"].shape == (32, 48)
  assert params["layer_0_attn"]["out"]["kernel"].shape == (48, 32)
  assert params["layer_0_attn"]["v"]["kernel"].shape == (32, 24)
  assert np.isfinite(logits(cfg, params, tokens())).all()


def test_tied_head_is_the_transposed_embedding():
  tied = config(tie_embeddings=True)
  params = make_params(tied, seed=2)
  assert "head" not in params
  untied = dict(params, head={"kernel": params["embedding"]["embedding"].T})
  x = tokens(2)
  assert rel_err(logits(tied, params, x), logits(config(), untied, x)) < TOL


def test_scaled_tied_head_is_the_transposed_embedding_over_sqrt_d():
  scaled = config(tie_embeddings=True, tied_logit_scale=True)
  params = make_params(scaled, seed=5)
  untied = dict(params, head={"kernel": params["embedding"]["embedding"].T / np.sqrt(32)})
  x = tokens(5)
  assert rel_err(logits(scaled, params, x), logits(config(), untied, x)) < TOL


@pytest.mark.parametrize("scale", [False, True])
def test_tied_logits_at_initialisation(scale):
  """The model's own initialiser (std-1 table), width 256: at initialisation the residual stream
  is mostly the token's own embedding e, so the tied logits are about (e' . e) sqrt(d) / |e|:
  std ~sqrt(d) = 16 over the vocabulary and ~d = 256 for the current token unscaled; std ~1
  and ~sqrt(d) scaled. The first loss follows (the next token is rarely the current one)."""
  d, vocab = 256, 512
  cfg = config(vocab_size=vocab, d_model=d, attn_head_dim=64, tie_embeddings=True,
               tied_logit_scale=scale)
  params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
  x = np.random.default_rng(0).integers(0, vocab, (4, 12)).astype(np.int32)
  out = logits(cfg, params, x)
  own = np.take_along_axis(out, x[..., None], axis=-1)[..., 0].mean()
  loss = float(np.mean(jax.nn.logsumexp(out, axis=-1) - np.take_along_axis(
      out, np.roll(x, -1, axis=1)[..., None], axis=-1)[..., 0]))
  std = np.median(out.std(axis=-1))
  if scale:
    assert 0.5 < std < 2 and 0.5 * d ** 0.5 < own < 2 * d ** 0.5 and loss < 2 * d ** 0.5
  else:
    assert 8 < std < 32 and 0.5 * d < own < 2 * d and loss > 0.25 * d


def test_mlp_less_layer_is_a_layer_whose_mlp_adds_nothing():
  cfg = config(mlp_layers=(True, False))
  params = make_params(cfg, seed=3)
  assert "layer_1_mlp" not in params and "layer_1_mlp_norm" not in params
  assert "layer_0_mlp" in params and "layer_0_mlp_norm" in params
  full = make_params(config(), seed=4)
  padded = dict(params, layer_1_mlp=jax.tree.map(jnp.zeros_like, full["layer_1_mlp"]),
                layer_1_mlp_norm=full["layer_1_mlp_norm"])
  x = tokens(3)
  assert rel_err(logits(cfg, params, x), logits(config(), padded, x)) < TOL


def test_qkv_biases_are_added_to_the_projections():
  cfg = config(attn_qkv_bias=True)
  params = make_params(cfg, seed=6)
  assert params["layer_0_attn"]["k"]["bias"].shape == (32,)
  assert "bias" not in params["layer_0_attn"]["out"]
  # Zero biases compute the bias-free model; non-zero ones change it. (Their values against an
  # independent forward: tests/test_importer.py, Qwen2 checkpoints against the NumPy oracle.)
  zero = jax.tree.map(lambda x: x, params)
  for i in (0, 1):
    for n in "qkv":
      zero[f"layer_{i}_attn"][n] = {"kernel": params[f"layer_{i}_attn"][n]["kernel"],
                                   "bias": np.zeros(32, np.float32)}
  plain = jax.tree.map(lambda x: x, zero)
  for i in (0, 1):
    for n in "qkv":
      plain[f"layer_{i}_attn"][n] = {"kernel": zero[f"layer_{i}_attn"][n]["kernel"]}
  x = tokens(6)
  assert rel_err(logits(cfg, zero, x), logits(config(), plain, x)) < TOL
  assert rel_err(logits(cfg, params, x), logits(cfg, zero, x)) > 1e-3


def test_norm_eps_reaches_every_norm():
  x = np.random.default_rng(4).standard_normal((3, 5, 16)).astype(np.float32) * 0.05
  gain = np.random.default_rng(5).standard_normal(16).astype(np.float32)
  for eps in (1e-6, 1e-2):
    got = RMSNorm(eps=eps).apply({"params": {"scale": gain}}, x)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + eps) * gain
    assert rel_err(got, want) < 1e-6
  # The model's norms take config.norm_eps: with a large eps the logits move.
  params = make_params(config())
  x = tokens(4)
  assert rel_err(logits(config(norm_eps=0.5), params, x), logits(config(), params, x)) > 1e-2


@pytest.mark.parametrize("eviction", [pytest.param("hard", marks=pytest.mark.slow), "sliding"])
def test_decoding_with_every_feature_matches_training(eviction):
  """GQA, q/k/v biases, tied head, an MLP-less GDN layer, eps 1e-5; every window sleeps with
  N = 2 (the stream's decode layout fuses q|k|v and their biases): a stream fed
  a prompt and then one token at a time gives the training forward's logits (as
  tests/test_generate.py checks for today's configs). Hard eviction under `slow`."""
  L, T = 6, 13
  cfg = config(layers=("attn", "gdn"), attn_kv_heads=2, tie_embeddings=True,
               mlp_layers=(True, False), attn_qkv_bias=True,
               norm_eps=1e-5, passes=2, eviction=eviction, window=L)
  params = make_params(cfg, seed=5)
  x = tokens(5, (2, T))
  forward = jax.jit(lambda p, x, m: sleep_forward(cfg, p, x, m))
  want = []
  for c in range(-(-T // L)):
    mask = np.zeros((2, T), np.float32)
    mask[:, c * L:] = 1.0           # windows before c sleep; window c gets the one wake pass
    want.append(forward(params, x, mask).logits[:, c * L:(c + 1) * L])
  want = np.concatenate(want, axis=1)
  stream = Stream(cfg, params, 2)
  assert stream.state.caches[0].keys.shape[2] == 2          # the caches hold the kv heads
  assert stream.params["layer_0_attn"]["qkv"]["bias"].shape == (8 * 4 + 2 * 8 * 2,)
  got = [stream.feed(x[:, :L])] + [stream.feed(x[:, i:i + 1]) for i in range(L, T)]
  assert rel_err(np.concatenate(got, axis=1), want) < TOL


@pytest.mark.parametrize("overrides, field, words", [
    (dict(attn_kv_heads=3), "attn_kv_heads", "must divide the query heads (4)"),
    (dict(attn_kv_heads=0), "attn_kv_heads", "None or an integer >= 1"),
    (dict(attn_heads=2.5), "attn_heads", "None or an integer >= 1"),
    (dict(attn_head_dim=12), "attn_head_dim", "when attn_heads is None"),
    (dict(norm_eps=0.0), "norm_eps", "finite number > 0"),
    (dict(tie_embeddings=1), "tie_embeddings", "True or False"),
    (dict(tied_logit_scale=1, tie_embeddings=True), "tied_logit_scale", "True or False"),
    (dict(tied_logit_scale=True), "tied_logit_scale", "needs tie_embeddings=True"),
    (dict(attn_qkv_bias=None), "attn_qkv_bias", "True or False"),
    (dict(mlp_layers=(True,)), "mlp_layers", "one True/False per layer (2 layers)"),
    (dict(mlp_layers=(1, 0)), "mlp_layers", "one True/False per layer"),
])
def test_errors_name_the_field(overrides, field, words):
  with pytest.raises(FieldError, match=f"ModelConfig.{field}") as e:
    config(**overrides)
  assert words in str(e.value)


def test_mlp_layers_from_a_json_list():
  cfg = ModelConfig.from_mapping(dict(vocab_size=5, d_model=32, layers=["attn", "gdn"],
                                      attn_head_dim=16, gdn_head_dim=16,
                                      mlp_layers=[True, False]))
  assert cfg.mlp_layers == (True, False) and hash(cfg)
