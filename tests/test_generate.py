"""Streaming generation (sleep_lm.inference.stream, sleep_lm.inference.decoding) against the
training forward, sampling, and the CLI (sleep_lm.generate).

The equivalence tested: a stream's logits for the tokens of window c are those of `sleep_forward`
over the tokens up to the end of window c with only window c supervised (the windows before it
sleep with N passes, window c gets the one wake pass), and its GDN states after window c sleeps
are those of `sleep_forward` over windows 0..c with none supervised. Prompts end mid-window and at
a window boundary; decoding continues token by token across further boundaries.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rule110 as rule110_config
from sleep_lm import generate
from sleep_lm.common.errors import UserError
from sleep_lm.inference import decoding
from sleep_lm.inference import stream as stream_lib
from sleep_lm.inference.decoding import sample
from sleep_lm.inference.stream import Stream
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params, split_caches
from sleep_lm.model.sleep import parallel_forward, sleep_forward

ROOT = Path(__file__).resolve().parents[1]
L = 6            # window
T = 18           # three windows
TOL = 1e-5       # relative error (max |a - b| / max |b|), float32 on CPU: measured <= 1.1e-6


def small_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=7, d_model=32, layers=("attn", "gdn"), attn_head_dim=16,
              gdn_head_dim=16, mlp_dim=48, window=L, passes=1)
  return ModelConfig(**{**base, **overrides})


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def params():
  # One parameter set serves every N and eviction mode: they do not change the parameters.
  cfg = small_config()
  return nn.meta.unbox(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)))


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, 7, (2, T)).astype(np.int32)


def stream_logits(cfg, params, tokens, prompt_len, **kwargs):
  """Prefill `prompt_len` tokens at once, then teacher-forced decode one token at a time."""
  stream = Stream(cfg, params, tokens.shape[0], **kwargs)
  logits = [stream.feed(tokens[:, :prompt_len])]
  compiled_after_first_step = None
  for i in range(prompt_len, tokens.shape[1]):
    logits.append(stream.feed(tokens[:, i:i + 1]))
    if compiled_after_first_step is None:
      compiled_after_first_step = stream.fns.wake._cache_size()
  # The decode step compiled once: crossing windows and growing the context recompiles nothing.
  assert stream.fns.wake._cache_size() == compiled_after_first_step
  return jnp.concatenate(logits, axis=1), stream


@pytest.mark.parametrize("passes, eviction", [
    (1, "hard"), (2, "sliding"), (4, "hard"),
    *(pytest.param(n, e, marks=pytest.mark.slow)     # CI time: run with -m slow
      for n, e in ((1, "sliding"), (2, "hard"), (4, "sliding")))])
def test_generation_matches_training_forward(params, tokens, passes, eviction):
  cfg = small_config(passes=passes, eviction=eviction)
  reference = jax.jit(lambda p, x, m: sleep_forward(cfg, p, x, m))
  want = []
  for c in range(T // L):
    mask = np.zeros((2, T), np.float32)
    mask[:, c * L:] = 1.0   # windows before c sleep; c gets one pass (later ones do not matter)
    want.append(reference(params, tokens, mask).logits[:, c * L:(c + 1) * L])
  want = jnp.concatenate(want, axis=1)
  want_states = reference(params, tokens, np.zeros((2, T), np.float32)).states

  for prompt_len in (9, 6):          # ends mid-window; ends exactly at a window boundary
    got, stream = stream_logits(cfg, params, tokens, prompt_len)
    assert got.shape == (2, T, 7)
    assert rel_err(got, want) < TOL, prompt_len
    assert stream.sleep_events == T // L and stream.position == T
    gdn, _ = split_caches(cfg, stream.state.caches)
    for s, w in zip((c.state for c in gdn), want_states, strict=True):
      assert rel_err(s, w) < TOL, prompt_len       # the state after the last window slept

  if passes == 1 and eviction == "hard":             # the plain hybrid: one parallel forward
    plain = jax.jit(lambda p, x: parallel_forward(cfg, p, x).logits)(params, tokens)
    assert rel_err(got, plain) < TOL
  if passes > 1:                                     # the sleep matters (the test can fail)
    assert rel_err(got[:, L:], reference(params, tokens, np.ones((2, T), np.float32)
                                         ).logits[:, L:]) > 1e-3


def test_prefill_of_several_windows_per_call(params, tokens, monkeypatch):
  """Whole windows two per call (a scan over windows) give what one per call gives (the path
  test_generation_matches_training_forward checks against the training forward)."""
  cfg = small_config(passes=2, eviction="sliding")
  one = Stream(cfg, params, 2)
  want = one.feed(tokens)
  monkeypatch.setattr(stream_lib, "PREFILL_TOKENS", 2 * L)
  two = Stream(cfg, params, 2)
  got = two.feed(tokens)                       # 2 windows, then 1
  assert two.fns.prefill._cache_size() == 2 and two.sleep_events == 3
  assert rel_err(got, want) < TOL
  for a, b in zip(jax.tree.leaves(two.state), jax.tree.leaves(one.state), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL * max(1.0, float(np.abs(b).max())))


def test_full_cache_stream_is_the_plain_forward(params, tokens):
  cfg = small_config(eviction="none")
  got, _ = stream_logits(cfg, params, tokens, 5, capacity=T)
  plain = jax.jit(HybridLM(cfg).apply)({"params": params}, tokens)    # one causal window
  assert rel_err(got, plain) < TOL
  with pytest.raises(ValueError, match="capacity"):
    Stream(cfg, params, 2, capacity=T).feed(np.zeros((2, T + 1), np.int32))
  with pytest.raises(ValueError, match="capacity"):
    Stream(cfg, params, 2)


def test_length_limited_attention_is_the_position_mask(params):
  """The cuDNN decode path (keys limited by key_value_seq_lengths, no mask) attends to what the
  position mask allows; checked here with the XLA implementation, which takes both."""
  cfg = small_config(eviction="none")
  lay = decoding.cache_layout(cfg, 8)
  state = decoding.init_state(cfg, 2, 8)
  keys = iter(jax.random.split(jax.random.key(3), 8))
  caches = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), state.caches)
  h = jax.random.normal(next(keys), (2, 1, 32))
  by_mask = decoding.step_context(cfg, lay, jnp.asarray(5), 2, 1)
  assert by_mask.mask is not None and by_mask.kv_lengths is None
  by_length = by_mask.replace(mask=None, kv_lengths=jnp.full((2,), 6, jnp.int32))
  step = jax.jit(lambda ctx: HybridLM(cfg).apply({"params": params}, h, caches, ctx,
                                                 method=HybridLM.run_pass)[0])
  assert rel_err(step(by_length), step(by_mask)) < 1e-6
  assert rel_err(step(by_length.replace(kv_lengths=jnp.full((2,), 5, jnp.int32))),
                 step(by_mask)) > 1e-4


def test_greedy_generation_is_its_own_teacher_forcing(params, tokens):
  cfg = small_config(passes=2, eviction="sliding")
  stream = Stream(cfg, params, 2)
  first = stream.feed(tokens[:, :9])[:, -1]         # the shapes test_generation... compiled
  out = np.asarray(stream.generate(9, first))
  assert out.shape == (2, 9) and stream.position == 18 and stream.sleep_events == 3
  # Two windows' worth (3 then 6 tokens, a sleep between): one compiled loop for any count.
  assert stream.fns.generate._cache_size() == 1
  sequence = np.concatenate([tokens[:, :9], out], axis=1)
  replay = Stream(cfg, params, 2)
  logits = jnp.concatenate([replay.feed(sequence[:, :9]), replay.feed(sequence[:, 9:])], 1)
  np.testing.assert_array_equal(np.argmax(logits[:, 8:17], -1), out)
  with pytest.raises(ValueError, match="loop: must be one of"):
    Stream(cfg, params, 2, loop="while")


@pytest.mark.slow
def test_fixed_loop_generates_what_the_dynamic_one_does(params, tokens):
  cfg = small_config(passes=2, eviction="sliding")
  dynamic, fixed = Stream(cfg, params, 2), Stream(cfg, params, 2, loop="fixed")
  want = dynamic.generate(9, dynamic.feed(tokens[:, :9])[:, -1], temperature=1.0, seed=4)
  got = fixed.generate(9, fixed.feed(tokens[:, :9])[:, -1], temperature=1.0, seed=4)
  np.testing.assert_array_equal(got, want)
  assert fixed.fns.generate_fixed._cache_size() == 2          # counts 3, then 6


def test_sampling():
  logits = jax.random.normal(jax.random.key(1), (4, 7)) * 3
  key = jax.random.key(2)
  greedy = np.argmax(logits, -1)
  np.testing.assert_array_equal(sample(logits, key), greedy)
  np.testing.assert_array_equal(sample(logits, key, temperature=1.0, top_k=1), greedy)
  top2 = np.argsort(-np.asarray(logits), -1)[:, :2]
  draws = np.stack([sample(logits, jax.random.fold_in(key, i), temperature=5.0, top_k=2)
                    for i in range(32)])                                 # [32, B]
  assert all(set(draws[:, b]) == set(top2[b]) for b in range(4))          # both, and only them
  again = sample(logits, jax.random.fold_in(key, 0), temperature=5.0, top_k=2)
  np.testing.assert_array_equal(again, draws[0])                         # a seed reproduces
  wide = np.stack([sample(logits, jax.random.fold_in(key, i), temperature=100.0)
                   for i in range(32)])
  assert len(set(wide.ravel())) == 7                                     # no top-k: any token


def test_parse_prompt():
  assert generate.parse_prompt("01Q1", 3, "01Q") == [0, 1, 2, 1]
  assert generate.parse_prompt("2,0, 1", 3, "01Q") == [2, 0, 1]
  assert generate.parse_prompt("2,", 3, None) == [2]
  for bad in ("01x", "3,", "", "a,b"):
    with pytest.raises(generate.UserError):
      generate.parse_prompt(bad, 3, "01Q")


# --------------------------------------------------------------------------------- the CLI

TINY = {"model.d_model": 32, "model.attn_head_dim": 16, "model.gdn_head_dim": 16,
        "model.mlp_dim": 32, "model.layers": ("attn", "gdn"), "model.passes": 2,
        "model.window": 6, "seeds": 2, "batch_size": 4, "steps": 1, "optimizer.warmup_steps": 0,
        "eval_size": 8, "eval_batch_size": 8}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as `sleep_lm.train` leaves it: config.json and a checkpoint of 2 seeds' states
  (the initial ones: generation does not care whether they were trained)."""
  from sleep_lm.training import trainer
  from sleep_lm.training import workdir as workdir_lib
  from sleep_lm.training.checkpointing import Checkpointer
  from sleep_lm.training.run_config import RunConfig

  config = rule110_config.get_config("smoke")
  for key, value in TINY.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  path = tmp_path_factory.mktemp("generate") / "run"
  run = RunConfig.checked(config)
  mesh, boxed = trainer.setup(run)
  state, _ = trainer.initial_state(run, mesh, boxed)
  workdir_lib.claim(path, run.config)
  ckpt = Checkpointer(path / "checkpoints")
  ckpt.save(state, 1, {"step": 1, "data_position": 1, "pending": []})
  ckpt.close()
  return path, jax.tree.map(lambda x: np.asarray(x[1]), state.params)


def test_cli_generates_from_a_workdir(workdir):
  path, params_1 = workdir
  lines = []
  out = generate.generate_from_workdir(path, "0110101Q", max_new_tokens=9, seed_index=1,
                                       num_streams=2, temperature=1.0, top_k=2, seed=3,
                                       log=lines.append)
  assert np.asarray(out["tokens"]).shape == (2, 9) and out["sleep_events"] == 2
  assert any(line.startswith("stream 1: ") and len(line) == len("stream 1: ") + 9
             for line in lines)
  assert any("decode: 9 tokens" in line for line in lines)
  # The model of seed index 1 is the one used, and the seed reproduces the samples: a stream
  # built from that model's parameters draws the same tokens.
  stream = Stream(generate.load_run(path).model, params_1, 2)
  prompt = np.tile(np.array([0, 1, 1, 0, 1, 0, 1, 2], np.int32), (2, 1))
  want = stream.generate(9, stream.feed(prompt, last_only=True), temperature=1.0, top_k=2,
                         seed=3)
  np.testing.assert_array_equal(out["tokens"], np.asarray(want))
  assert len({tuple(row) for row in out["tokens"]}) == 2      # the two streams sample apart


def test_user_errors_are_one_line(workdir):
  """What the CLI prints as `error: ...` with status 2 (sleep_lm.cli): one line each."""
  path, _ = workdir
  for kwargs in (dict(prompt="01x"), dict(prompt="01", seed_index=2), dict(prompt="01", step=7)):
    prompt = kwargs.pop("prompt")
    with pytest.raises(UserError) as e:
      generate.generate_from_workdir(path, prompt, max_new_tokens=2, log=lambda _: None, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
  with pytest.raises(UserError, match="config.json"):
    generate.generate_from_workdir(path.parent / "nowhere", "01", max_new_tokens=2)


@pytest.mark.slow
def test_cli_subprocess(workdir):
  path, _ = workdir
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "sleep_lm.generate", f"--workdir={path}", "--prompt=0110Q",
         "--max_new_tokens=7"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stream 0: " in out.stdout and "ms per token" in out.stdout
  bad = subprocess.run(cmd[:-2] + ["--prompt=0x"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")

