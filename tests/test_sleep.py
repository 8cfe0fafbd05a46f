"""The hybrid model and the sleep scan: equivalences, information flow, baselines, dtypes."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import Context, HybridLM, init_params, window_pass, zero_states
from sleep_lm.model.sleep import (
  parallel_forward,
  sleep_forward,
  sleep_forward_embedded,
  sleep_schedule,
)
from sleep_lm.training.step import (
  OptimizerConfig,
  create_train_state,
  make_optimizer,
  masked_loss_and_metrics,
  train_step,
)

L = 6          # window
T = 20         # 4 windows, the last one partial


def small_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=7, d_model=32, layers=("attn", "gdn", "attn", "gdn"), attn_head_dim=16,
              gdn_head_dim=16, mlp_dim=48, window=L, passes=1)
  return ModelConfig(**{**base, **overrides})


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(init_params(small_config(), jax.random.key(0)))


def tokens_and_mask(seed, batch=3, seq=T, supervised_from=None):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 7, (batch, seq)), jnp.int32)
  mask = np.zeros((batch, seq), np.float32)
  mask[:, (seq - 2 if supervised_from is None else supervised_from):] = 1.0
  return tokens, jnp.asarray(mask)


@pytest.mark.parametrize("rule", ["gdn", "gated_linear"])
def test_one_pass_equals_parallel_hybrid(rule):
  cfg = small_config(rule=rule)
  params = nn.meta.unbox(init_params(cfg, jax.random.key(1)))
  tokens, mask = tokens_and_mask(1)
  windowed = sleep_forward(cfg, params, tokens, mask)
  parallel = parallel_forward(cfg, params, tokens)
  assert windowed.logits.shape == (3, T, 7)
  assert rel_err(windowed.logits, parallel.logits) < 1e-5
  for s_w, s_p in zip(windowed.states, parallel.states, strict=True):
    assert rel_err(s_w, s_p) < 1e-5


def test_schedule_follows_loss_mask_and_batch_shares_it():
  mask = np.zeros((2, 14), np.float32)
  mask[0, 13] = 1.0    # window 2 (partial) supervised by example 0
  mask[1, 7] = 1.0     # window 1 supervised by example 1 only
  np.testing.assert_array_equal(sleep_schedule(jnp.asarray(mask), 6), [True, False, False])


def unrolled_sleep(cfg, params, tokens, mask):
  """Algorithm 1 as a plain Python loop over windows and passes (hard eviction)."""
  model = HybridLM(cfg)
  v = {"params": params}
  b, t = tokens.shape
  h_all = model.apply(v, tokens, method=HybridLM.embed)
  states = zero_states(cfg, b)
  outs = []
  for start in range(0, t, cfg.window):
    h = h_all[:, start:start + cfg.window]
    n = h.shape[1]
    pos = jnp.arange(n)
    ctx = Context(start + pos, pos, jnp.ones((n,), bool),
                  jnp.tril(jnp.ones((n, n), bool))[None, None])
    supervised = bool(np.asarray(mask)[:, start:start + cfg.window].any())
    for _ in range(1 if supervised else cfg.passes):
      h, states, _ = window_pass(cfg, params, ctx, None, h, states)
    outs.append(h)
  return model.apply(v, jnp.concatenate(outs, 1), method=HybridLM.logits), states


def test_n_passes_happen(params):
  tokens, mask = tokens_and_mask(2)
  cfg3 = small_config(passes=3)
  out3 = jax.jit(lambda p, x, m: sleep_forward(cfg3, p, x, m))(params, tokens, mask)
  np.testing.assert_array_equal(out3.sleeps, [True, True, True, False])
  ref_logits, ref_states = unrolled_sleep(cfg3, params, tokens, mask)
  assert rel_err(out3.logits, ref_logits) < 1e-5
  for s, r in zip(out3.states, ref_states, strict=True):
    assert rel_err(s, r) < 1e-5
  out2 = sleep_forward(small_config(passes=2), params, tokens, mask)
  assert rel_err(out2.logits, out3.logits) > 1e-2


def test_earlier_window_acts_only_through_states(params):
  cfg = small_config(passes=2)
  tokens_a, mask = tokens_and_mask(3, seq=2 * L, supervised_from=L)
  tokens_b = tokens_a.at[:, :L].set((tokens_a[:, :L] + 1) % 7)   # differ in window 0 only
  full_a = sleep_forward(cfg, params, tokens_a, mask)
  full_b = sleep_forward(cfg, params, tokens_b, mask)
  assert rel_err(full_a.logits[:, L:], full_b.logits[:, L:]) > 1e-3   # window 0 matters...

  first = sleep_forward(cfg, params, tokens_a[:, :L], mask[:, :L])
  second = sleep_forward(cfg, params, tokens_a[:, L:], mask[:, L:], initial_states=first.states)
  assert rel_err(second.logits, full_a.logits[:, L:]) < 1e-5          # ...through S alone
  zeroed = [sleep_forward(cfg, params, x[:, L:], mask[:, L:]).logits for x in (tokens_a, tokens_b)]
  np.testing.assert_array_equal(zeroed[0], zeroed[1])                 # no S, no dependence


@pytest.mark.slow   # CI time: run with -m slow
def test_gradients_reach_earlier_window_only_through_states(params):
  cfg = small_config(passes=2)
  tokens, mask = tokens_and_mask(4, seq=2 * L, supervised_from=L)
  targets = (tokens + 3) % 7
  h = HybridLM(cfg).apply({"params": params}, tokens, method=HybridLM.embed)

  def loss_from(logits):
    return masked_loss_and_metrics(logits, targets[:, L:], mask[:, L:])[0]

  grad_full = jax.grad(
      lambda h: loss_from(sleep_forward_embedded(cfg, params, h, mask).logits[:, L:]))(h)
  states_0, pullback = jax.vjp(
      lambda h0: sleep_forward_embedded(cfg, params, h0, mask[:, :L]).states, h[:, :L])
  d_states = jax.grad(lambda s: loss_from(sleep_forward_embedded(
      cfg, params, h[:, L:], mask[:, L:], initial_states=s).logits))(states_0)
  (grad_via_states,) = pullback(d_states)
  assert float(jnp.abs(grad_full[:, :L]).max()) > 1e-6
  assert rel_err(grad_full[:, :L], grad_via_states) < 1e-4


def test_attention_only_baselines(params):
  del params
  tokens_a, mask = tokens_and_mask(5, seq=2 * L, supervised_from=L)
  tokens_b = tokens_a.at[:, :L].set((tokens_a[:, :L] + 1) % 7)
  evict = small_config(layers=("attn", "attn"))
  p = nn.meta.unbox(init_params(evict, jax.random.key(2)))
  out = [sleep_forward(evict, p, x, mask).logits[:, L:] for x in (tokens_a, tokens_b)]
  np.testing.assert_array_equal(out[0], out[1])      # hard eviction, no state: window 0 is gone
  assert sleep_forward(evict, p, tokens_a, mask).states == ()
  full = small_config(layers=("attn", "attn"), eviction="none")
  out = [sleep_forward(full, p, x, mask) for x in (tokens_a, tokens_b)]
  assert out[0].sleeps.shape == (1,)
  assert rel_err(out[0].logits[:, L:], out[1].logits[:, L:]) > 1e-3   # full cache sees it


def test_full_cache_equals_one_causal_pass_over_the_sequence(params):
  """eviction="none" (the full-cache baseline) is the plain causal model: one pass over every
  token, each query attending to every earlier key, the GDN state and conv never restarting."""
  cfg = small_config(eviction="none")
  tokens, mask = tokens_and_mask(8)
  out = sleep_forward(cfg, params, tokens, mask)
  pos = jnp.arange(T)
  causal = pos[None, :] <= pos[:, None]
  ctx = Context(pos, pos, jnp.ones((T,), bool), causal[None, None])
  model, v = HybridLM(cfg), {"params": params}
  h = model.apply(v, tokens, method=HybridLM.embed)
  h, _, _ = window_pass(cfg, params, ctx, None, h, zero_states(cfg, 3))
  assert rel_err(out.logits, model.apply(v, h, method=HybridLM.logits)) < 1e-5


def test_windows_without_a_retained_prefix_are_causal_not_masked():
  """Hard eviction and "none" (and a first sliding window) pass `causal` and no [T, S] mask, so
  that cuDNN skips the masked blocks; their values equal the masked path's (the two tests
  above compare them with explicit masks). A retained prefix still needs the mask."""
  from sleep_lm.model.windows import window_context
  ctx = window_context(jnp.asarray(L), L, total=T)
  assert ctx.causal and ctx.mask is None
  np.testing.assert_array_equal(ctx.valid, np.arange(L, 2 * L) < T)
  ctx = window_context(jnp.asarray(L), L, retained=L - 1, sliding=True)
  assert not ctx.causal and ctx.mask.shape == (1, 1, L, 2 * L - 1)


def test_sliding_one_pass_equals_parallel_sliding_window_hybrid(params):
  cfg = small_config(eviction="sliding")
  tokens, mask = tokens_and_mask(6)
  out = sleep_forward(cfg, params, tokens, mask)
  # Independent computation: one pass over everything, each query attending to its last L keys.
  pos = jnp.arange(T)
  window_mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - L)
  ctx = Context(pos, pos % L, jnp.ones((T,), bool), window_mask[None, None])
  model, v = HybridLM(cfg), {"params": params}
  h = model.apply(v, tokens, method=HybridLM.embed)
  h, states, _ = window_pass(cfg, params, ctx, None, h, zero_states(cfg, 3))
  assert rel_err(out.logits, model.apply(v, h, method=HybridLM.logits)) < 1e-5
  hard = sleep_forward(small_config(), params, tokens, mask)
  assert rel_err(out.logits, hard.logits) > 1e-3
  slept = sleep_forward(small_config(eviction="sliding", passes=2), params, tokens, mask)
  assert bool(jnp.isfinite(slept.logits).all())
  assert rel_err(slept.logits, out.logits) > 1e-3


@pytest.mark.parametrize("policy", [pytest.param(p, marks=pytest.mark.slow)
                                    for p in ("full", "dots", "blocks")])
def test_remat_policy_keeps_values_and_gradients(params, policy):
  tokens, mask = tokens_and_mask(7)
  targets = (tokens + 1) % 7

  def loss(p, cfg):
    return masked_loss_and_metrics(sleep_forward(cfg, p, tokens, mask).logits, targets, mask)[0]

  base = jax.value_and_grad(loss)(params, small_config(passes=2))
  remat = jax.value_and_grad(loss)(params, small_config(passes=2, remat=policy))
  assert rel_err(remat[0], base[0]) < 1e-6
  for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(base[1]), strict=True):
    assert rel_err(a, b) < 1e-4


def test_block_remat_holds_less_than_one_pass_remat():
  """remat="blocks" exists for one long pass (a full-cache window): with "full" its backward
  recomputes the whole pass and holds every layer's activations at once; per layer it holds one
  layer's. XLA's memory analysis of the compiled gradient says so (3x less here)."""
  t = 256

  def temp_bytes(policy):
    cfg = small_config(eviction="none", remat=policy, d_model=64, mlp_dim=256, window=t)
    p = nn.meta.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    ids = jax.ShapeDtypeStruct((8, t), jnp.int32)
    grad = jax.grad(lambda p, x: sleep_forward(cfg, p, x, jnp.ones(x.shape)).logits.mean())
    return jax.jit(grad).lower(p, ids).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("blocks") < 0.5 * temp_bytes("full")
  shapes = lambda policy: jax.eval_shape(lambda: init_params(small_config(remat=policy),
                                                             jax.random.key(0)))
  assert shapes("blocks") == shapes("none")          # same parameter names and shapes


@pytest.mark.slow   # CI time: run with -m slow
def test_bf16_activations_with_fp32_states(params):
  tokens, mask = tokens_and_mask(8)
  out32 = sleep_forward(small_config(passes=2), params, tokens, mask)
  cfg16 = small_config(passes=2, dtype="bfloat16")
  out16 = jax.jit(lambda p: sleep_forward(cfg16, p, tokens, mask))(params)
  assert out16.hidden.dtype == jnp.float32          # mixed precision: f32 residual stream
  assert all(s.dtype == jnp.float32 for s in out16.states)
  assert out16.logits.dtype == jnp.float32
  assert rel_err(out16.logits, out32.logits) < 5e-2
  grads = jax.grad(lambda p: sleep_forward(cfg16, p, tokens, mask).logits.sum())(params)
  assert all(bool(jnp.isfinite(g).all()) and g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_train_step_compiles_once_and_learns():
  cfg = small_config(passes=2)
  optimizer = make_optimizer(OptimizerConfig(total_steps=40, warmup_steps=2))
  traces = []

  def counted(state, batch):
    traces.append(1)
    return train_step(state, batch, model_cfg=cfg, optimizer=optimizer)

  step = jax.jit(counted)
  state = create_train_state(cfg, optimizer, jax.random.key(0))
  rng = np.random.default_rng(9)
  losses = []
  for i in range(12):
    tokens = jnp.asarray(rng.integers(0, 7, (4, T)), jnp.int32)
    mask = np.zeros((4, T), np.float32)
    mask[:, T - 2 - (i % 2) * L:] = 1.0        # two different sleep schedules, one shape
    batch = {"inputs": tokens, "targets": tokens, "loss_mask": jnp.asarray(mask)}
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert len(traces) == 1
  assert int(state.step) == 12
  assert np.mean(losses[-3:]) < np.mean(losses[:3])   # copying the input token is learnable


def test_parameters_carry_logical_axis_names():
  boxed = init_params(small_config(), jax.random.key(0))
  allowed = {"vocab", "embed", "mlp", "heads", "head_dim", "gdn_heads", "conv"}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed


@pytest.mark.parametrize("overrides, field", [
    (dict(window=0), "window"),
    (dict(passes=0), "passes"),
    (dict(layers=("attn", "attn"), passes=2), "passes"),
    (dict(layers=("attn", "mamba")), "layers"),
    (dict(attn_head_dim=24), "attn_head_dim"),
    (dict(gdn_head_dim=20), "gdn_head_dim"),
    (dict(rule="hebb"), "rule"),
    (dict(eviction="soft"), "eviction"),
    (dict(remat="some"), "remat"),
    (dict(dtype="float16"), "dtype"),
    (dict(kernel_implementation="cuda"), "kernel_implementation"),
    (dict(eviction="none", passes=2), "passes"),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
    small_config(**overrides)


def test_config_from_mapping_rejects_unknown_keys():
  with pytest.raises(ValueError, match="unknown field.*windw"):
    ModelConfig.from_mapping(dict(vocab_size=3, windw=4))
  assert ModelConfig.from_mapping(dict(vocab_size=3, layers=["gdn"])).layers == ("gdn",)


def test_sliding_with_one_token_window_retains_nothing():
  """L = 1: the sliding cache keeps L-1 = 0 keys, so it equals hard eviction."""
  tokens, mask = tokens_and_mask(10, seq=7)
  sliding = small_config(window=1, passes=2, eviction="sliding")
  p = nn.meta.unbox(init_params(sliding, jax.random.key(3)))
  got = sleep_forward(sliding, p, tokens, mask).logits
  want = sleep_forward(small_config(window=1, passes=2), p, tokens, mask).logits
  assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("eviction, unroll", [
    ("hard", False), pytest.param("sliding", True, marks=pytest.mark.slow)])
def test_static_schedule_equals_traced(eviction, unroll):
  """The schedule known before tracing (no cond) computes the traced one's values and grads."""
  from sleep_lm.model.sleep import static_schedule
  cfg = small_config(passes=2, eviction=eviction, unroll=unroll, layers=("attn", "gdn"))
  params = nn.meta.unbox(init_params(cfg, jax.random.key(4)))
  tokens, mask = tokens_and_mask(11)
  schedule = static_schedule(cfg, mask)
  assert schedule == (True, True, True, False)

  def loss(p, s):
    out = sleep_forward(cfg, p, tokens, mask, schedule=s)
    return masked_loss_and_metrics(out.logits, tokens, mask)[0], out

  (l_traced, o_traced), g_traced = jax.value_and_grad(loss, has_aux=True)(params, None)
  (l_static, o_static), g_static = jax.value_and_grad(loss, has_aux=True)(params, schedule)
  assert rel_err(o_static.logits, o_traced.logits) < 1e-6
  for a, b in zip(o_static.states, o_traced.states, strict=True):
    assert rel_err(a, b) < 1e-6
  np.testing.assert_array_equal(o_static.sleeps, o_traced.sleeps)
  for a, b in zip(jax.tree.leaves(g_static), jax.tree.leaves(g_traced), strict=True):
    assert rel_err(a, b) < 1e-5
  with pytest.raises(ValueError, match="one flag per window"):
    sleep_forward(cfg, params, tokens, mask, schedule=(True, False))
