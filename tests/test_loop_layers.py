"""The looped block range (`ModelConfig.loop_layers`) in the sleep scan, against an oracle, and
in decoding streams, against the sleep scan.

The oracle is a plain Python loop over windows that calls the model's blocks one by one, in the
order the range defines (prelude once, the range N times in a window that sleeps, else once,
coda once), keeping each GDN layer's state and (sliding eviction) each attention layer's last
L-1 keys/values from the last time it ran. It shares only the blocks themselves and the window
masks (`window_context`) with the code under test, not its layer loop, remat or scans.

A stream (`sleep_lm.inference.stream`, `sleep_lm.inference.decoding`) is checked as
tests/test_generate.py checks the whole stack: its logits for window c are the sleep scan's with
windows c.. supervised (the windows before c sleep, window c gets the one wake pass a stream's
logits come from).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rule110
from sleep_lm.common.validation import FieldError
from sleep_lm.inference import decoding
from sleep_lm.inference import stream as stream_lib
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params, split_caches
from sleep_lm.model.layers import TRAIN, AttentionCache, GDNCache
from sleep_lm.model.sleep import sleep_forward, static_schedule
from sleep_lm.model.windows import window_context
from sleep_lm.training.run_config import RunConfig
from tests.numerics import rel_rms
from tests.test_generate import stream_logits

L = 6          # window
T = 20         # 4 windows, the last one partial
LAYERS = ("attn", "gdn", "attn", "gdn")


def config(**overrides) -> ModelConfig:
  base = dict(vocab_size=7, d_model=32, layers=LAYERS, attn_head_dim=16, gdn_head_dim=16,
              mlp_dim=48, window=L, passes=1, dtype="float32")
  return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(init_params(config(), jax.random.key(0)))


forward = jax.jit(sleep_forward, static_argnums=0, static_argnames="schedule")


def data(seed=0, batch=2, t=T):
  """Tokens and a loss mask supervising windows 1 and 3: schedule (sleep, wake, sleep, wake)
  (t = 2L: (sleep, wake))."""
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 7, (batch, t)), jnp.int32)
  mask = np.zeros((batch, t), np.float32)
  mask[:, L + 2] = 1.0
  mask[:, t - 2:] = 1.0
  return tokens, jnp.asarray(mask)


def oracle(cfg: ModelConfig, params, tokens, mask):
  """(logits, final GDN states) of the sleep schedule, layer by layer in Python (one jit of the
  unrolled loop: the windows' sleep flags are read from the concrete mask first)."""
  t = tokens.shape[1]
  sleeps = tuple(not np.asarray(mask)[:, s:s + L].any() for s in range(0, t, L))
  return _oracle(cfg, sleeps, params, tokens)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _oracle(cfg: ModelConfig, sleeps, params, tokens):
  model, variables = HybridLM(cfg), {"params": params}
  h = model.apply(variables, tokens, method=HybridLM.embed)
  b, t = h.shape[:2]
  n = len(cfg.layers)
  a, e = cfg.loop_layers if cfg.loop_layers is not None else (0, n)
  sliding = cfg.eviction == "sliding"
  keep = L - 1 if sliding else 0
  heads, dim = cfg.num_gdn_heads, cfg.gdn_head_dim
  kv_shape = (b, keep, cfg.num_kv_heads, cfg.attn_head_dim)
  states = {i: jnp.zeros((b, heads, dim, dim), jnp.float32)
            for i, kind in enumerate(cfg.layers) if kind == "gdn"}
  prefix = {i: AttentionCache(jnp.zeros(kv_shape), jnp.zeros(kv_shape))
            for i, kind in enumerate(cfg.layers) if kind == "attn"}
  outs = []
  for start, sleeps_here in zip(range(0, t, L), sleeps, strict=True):
    x = jnp.pad(h[:, start:start + L], ((0, 0), (0, max(0, start + L - t)), (0, 0)))
    order = [*range(a), *list(range(a, e)) * (cfg.passes if sleeps_here else 1), *range(e, n)]
    ctx = window_context(jnp.asarray(start), L, retained=keep, sliding=sliding, total=t)
    own = {}
    for i in order:
      gdn = cfg.layers[i] == "gdn"
      cache = GDNCache(states[i]) if gdn else (prefix[i] if sliding else None)
      x, cache = model.apply(variables, x, ctx, cache,
                             method=lambda m, x, ctx, c, i=i: m.blocks[i](x, ctx, c))
      if gdn:
        states[i] = cache.state
      else:
        own[i] = cache
    if sliding:
      for i, kv in own.items():
        keys = jnp.concatenate([prefix[i].keys, kv.keys], 1)
        values = jnp.concatenate([prefix[i].values, kv.values], 1)
        prefix[i] = AttentionCache(keys[:, -keep:], values[:, -keep:])
    outs.append(x)
  hidden = jnp.concatenate(outs, 1)[:, :t]
  logits = model.apply(variables, hidden, method=HybridLM.logits)
  return logits, tuple(states[i] for i in sorted(states))


# Each case compiles for 10-20 s on a loaded 2-core CPU: two in the default suite (a partial
# range inside the stack with sliding eviction, a range at the start with hard eviction), every
# other one under `pytest -m slow`.
DEFAULT_CASES = {((1, 3), 2, "sliding"), ((0, 2), 2, "hard")}
CASES = [pytest.param(span, passes, eviction,
                      marks=[] if (span, passes, eviction) in DEFAULT_CASES else [pytest.mark.slow])
         for span in [(1, 3), (0, 2), (2, 4)]
         for passes in (2, 3)
         for eviction in ("hard", "sliding")] + [
  pytest.param((1, 3), 1, eviction, marks=[pytest.mark.slow]) for eviction in ("hard", "sliding")]


@pytest.mark.parametrize(("span", "passes", "eviction"), CASES)
def test_sleep_scan_matches_the_oracle(params, span, passes, eviction):
  cfg = config(loop_layers=span, passes=passes, eviction=eviction)
  tokens, mask = data()
  assert static_schedule(cfg, mask) == (True, False, True, False)
  want_logits, want_states = oracle(cfg, params, tokens, mask)
  for schedule in (None, static_schedule(cfg, mask)):      # traced, static
    out = forward(cfg, params, tokens, mask, schedule=schedule)
    assert rel_rms(out.logits, want_logits) < 1e-5, schedule
    for got, want in zip(out.states, want_states, strict=True):
      assert rel_rms(got, want) < 1e-5, schedule
    np.testing.assert_array_equal(out.sleeps, [True, False, True, False])


def test_the_range_matters(params):
  """A partial range computes another function than the whole stack (the oracle is not vacuous)."""
  tokens, mask = data()
  whole = forward(config(passes=3), params, tokens, mask).logits
  part = forward(config(passes=3, loop_layers=(1, 3)), params, tokens, mask).logits
  assert rel_rms(part, whole) > 1e-3


@pytest.mark.parametrize("eviction", ["hard", pytest.param("sliding", marks=pytest.mark.slow)])
def test_whole_stack_is_todays_program(params, eviction):
  """loop_layers=None and (0, len(layers)): the same program (jaxpr) and the same output, and
  the oracle agrees."""
  tokens, mask = data()
  none, whole = (config(passes=2, eviction=eviction, loop_layers=x) for x in (None, (0, 4)))
  want_logits, _ = oracle(none, params, tokens, mask)
  for schedule in (None, static_schedule(none, mask)):
    run = jax.jit(lambda p, cfg, schedule=schedule: sleep_forward(
        cfg, p, tokens, mask, schedule=schedule).logits, static_argnums=1)
    assert str(jax.make_jaxpr(run, static_argnums=1)(params, none)) == str(
        jax.make_jaxpr(run, static_argnums=1)(params, whole))
    a, b = run(params, none), run(params, whole)
    np.testing.assert_array_equal(a, b)
    assert rel_rms(a, want_logits) < 1e-5


@pytest.mark.slow      # ~35 s of compiling on a loaded 2-core CPU
def test_gradients_match_the_oracle(params):
  cfg = config(loop_layers=(1, 3), passes=2, eviction="sliding", remat="full")
  tokens, mask = data(t=2 * L)                              # (sleep, wake): short to compile
  schedule = static_schedule(cfg, mask)

  def loss(fn):
    def f(p):
      logits = fn(p)
      logp = jax.nn.log_softmax(logits)
      return -jnp.sum(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0] * mask)
    return jax.grad(f)(params)

  want = jax.jit(lambda: loss(lambda p: oracle(cfg, p, tokens, mask)[0]))()
  for sched in (None, schedule):
    got = jax.jit(lambda sched=sched: loss(
        lambda p: sleep_forward(cfg, p, tokens, mask, schedule=sched).logits))()
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    err = rel_rms(np.concatenate([x.ravel() for x in flat_got]),
                  np.concatenate([x.ravel() for x in flat_want]))
    assert err < 1e-5, sched
    for name in ("layer_0_attn", "layer_2_attn", "layer_3_gdn"):   # prelude, range, coda
      assert np.abs(np.asarray(jax.tree.leaves(got[name])[0])).max() > 0


@pytest.mark.parametrize("value", [(2, 2), (3, 1), (-1, 2), (0, 5), (1,), (1, 2, 3), "1,3",
                                   (1.0, 3), (True, 3)])
def test_bad_values_name_the_field(value):
  with pytest.raises(FieldError, match=r"ModelConfig\.loop_layers.*0 <= a < b <= 4"):
    config(loop_layers=value)
  c = rule110.get_config()
  c.model.loop_layers = value
  with pytest.raises(ValueError, match=r"config\.model\.loop_layers"):
    RunConfig.from_config(c)


def test_from_a_json_list_and_through_the_run_config():
  assert ModelConfig.from_mapping(dict(vocab_size=7, loop_layers=[1, 3])).loop_layers == (1, 3)
  c = rule110.get_config()
  assert "loop_layers" not in c.model           # old configs and config.json files unchanged
  assert RunConfig.from_config(c).model.loop_layers is None
  c.model.loop_layers = (1, 3)
  assert RunConfig.from_config(c).model.loop_layers == (1, 3)


def test_retrofit_keeps_the_whole_stack_and_refuses_a_partial_range():
  from sleep_lm.common.errors import UserError
  from sleep_lm.model.retrofit import inserted_config
  assert inserted_config(config(), (1,)).loop_layers is None
  assert inserted_config(config(loop_layers=(0, 4)), (1,)).loop_layers == (0, 5)
  with pytest.raises(UserError, match=r"config\.model\.loop_layers"):
    inserted_config(config(loop_layers=(1, 3)), (1,))


# ------------------------------------------------------------------------------- decoding


def worst_position_error(got, want) -> float:
  """The largest relative RMS error of one position's logits (over the batch and vocabulary)."""
  a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float((np.linalg.norm(a - b, axis=(0, 2)) / np.linalg.norm(b, axis=(0, 2))).max())


# Each case compiles the sleep scan and a stream's functions (~8 s on a loaded 2-core CPU, 1.5 s
# more for the chunk): one in the default suite, the range whose coda has an attention and a GDN
# layer, under sliding eviction (the coda's re-run gives both its states and its retained keys),
# every other one under `pytest -m slow`. The slow ones feed a prompt that ends with a chunk.
DECODE_DEFAULT = ((0, 2), 3, "sliding")


def decode_case(span, passes, eviction):
  if (span, passes, eviction) == DECODE_DEFAULT:
    return pytest.param(span, passes, eviction, 2 * L)
  return pytest.param(span, passes, eviction, 2 * L + 3, marks=pytest.mark.slow)


DECODE_CASES = [decode_case(span, passes, eviction) for span in [(1, 3), (0, 2), (2, 4)]
                for passes in (2, 3) for eviction in ("hard", "sliding")]


@pytest.mark.parametrize(("span", "passes", "eviction", "prompt_len"), DECODE_CASES)
def test_streams_decode_as_the_sleep_scan(params, monkeypatch, span, passes, eviction,
                                          prompt_len):
  """Fed token by token (wake steps, a sleep at each boundary), and fed a prompt at once (two
  whole windows in one prefill call, then, if it has 15 tokens, a 3-token chunk) then token by
  token: over three windows that sleep and a last partial one, every position's logits are the
  sleep scan's, and the GDN states after the last token those of the scan (windows 0-2 slept,
  window 3's wake pass)."""
  cfg = config(loop_layers=span, passes=passes, eviction=eviction)
  tokens, _ = data()
  runs = []
  for c in range(-(-T // L)):
    mask = np.zeros((2, T), np.float32)
    mask[:, c * L:] = 1.0
    runs.append(forward(cfg, params, tokens, jnp.asarray(mask)))    # traced: one compile
  want = jnp.concatenate([r.logits[:, c * L:(c + 1) * L] for c, r in enumerate(runs)], axis=1)
  monkeypatch.setattr(stream_lib, "PREFILL_TOKENS", 2 * L)
  for prompt in (1, prompt_len):
    got, stream = stream_logits(cfg, params, np.asarray(tokens), prompt)
    assert worst_position_error(got, want) < 1e-5, prompt
    assert stream.sleep_events == T // L and stream.position == T
    gdn, _ = split_caches(cfg, stream.state.caches)
    for s, w in zip((c.state for c in gdn), runs[-1].states, strict=True):
      assert rel_rms(s, w) < 1e-5, prompt
  assert stream.fns.prefill._cache_size() == 1                       # two windows per call
  # The sleeps matter (the check can fail): without them windows 1.. are the no-sleep run's.
  assert rel_rms(got[:, L:], runs[0].logits[:, L:]) > 1e-3


def test_only_a_partial_range_that_sleeps_changes_the_decode_state(params):
  """The whole stack, or N = 1: the decode state is that of loop_layers=None (the plain one: no
  coda snapshot), and with N = 1 so are the wake and prefill programs (the sleep only evicts). A
  partial range with N > 1 adds the coda's GDN states, and its wake pass keeps the range's
  output (another program)."""
  tokens = jnp.zeros((2, 1), jnp.int32)
  jaxpr = lambda cfg, fn, *a: str(jax.make_jaxpr(functools.partial(
      fn, cfg, decoding.cache_layout(cfg), TRAIN))(params, *a))   # training layout: no compile
  structure = lambda cfg: jax.tree.structure(decoding.init_state(cfg, 2))

  def programs(cfg):
    state = decoding.init_state(cfg, 2)
    return (jaxpr(cfg, decoding.wake, state, tokens),
            jaxpr(cfg, decoding.prefill, state, jnp.zeros((2, L), jnp.int32)))

  for passes, span in ((1, (1, 3)), (2, (0, 4))):
    assert structure(config(passes=passes, loop_layers=span)) == structure(
        config(passes=passes)), (passes, span)
    assert decoding.init_state(config(passes=passes, loop_layers=span), 2).coda is None
  assert programs(config(passes=1, loop_layers=(1, 3))) == programs(config(passes=1))
  heads, dim = config().num_gdn_heads, config().gdn_head_dim
  for span, coda in (((0, 2), 1), ((1, 3), 1), ((2, 4), 0)):      # GDN layers in the coda
    state = decoding.init_state(config(passes=2, loop_layers=span), 2)
    assert [x.shape for x in state.coda] == [(2, heads, dim, dim)] * coda, span
    assert state.hidden.shape == (2, L, 32)
  plain, partial = config(passes=2), config(passes=2, loop_layers=(1, 3))
  assert jaxpr(partial, decoding.wake, decoding.init_state(partial, 2), tokens) != jaxpr(
      plain, decoding.wake, decoding.init_state(plain, 2), tokens)
