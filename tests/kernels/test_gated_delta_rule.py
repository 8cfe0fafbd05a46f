"""Tests of the gated delta rule / gated linear rule op against a float64 token loop.

The oracles live in this file and do not use the package: a NumPy float64 loop for the forward
pass and a float64 `lax.scan` (under `jax.enable_x64`) for gradients. Per head, with S in R^{KxV}:
  S_t = exp(g_t) S_{t-1}
  delta rule : S_t += k_t (beta_t (v_t - S_t^T k_t))^T      linear rule: S_t += beta_t k_t v_t^T
  o_t = S_t^T (scale q_t)       (q, k first L2-normalised when use_qk_l2norm)
Errors are relative RMS, ||x - ref|| / ||ref||, per output and per gradient.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from tests.numerics import rel_rms

RULES = ("delta", "linear")
IMPLS = ("recurrent", "chunked")
EPS = 1e-6  # the L2 norm's epsilon: x / sqrt(sum x^2 + EPS)

# fp32 vs float64. Worst cases measured on CPU: 1.2e-6 (o, final state) and 2e-6 (dg; other
# gradients <= 7e-7). The thresholds leave 15-50x of room for other reduction orders while a
# real mistake (a sign, a mask, a missing gradient path) gives 1e-4 .. 1.
FWD_TOL = 2e-5
GRAD_TOL = 1e-4
# bf16 inputs (the rounded inputs are what the oracle gets): o itself is rounded to bf16 (~2e-3
# relative RMS measured) and a backend may run its products on bf16 operands.
BF16_TOL = 1e-2


# ---------------------------------------------------------------------------------------------
# Oracles (independent of the package).


def _l2norm(xp, x):
  return x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + EPS)


def np_rule(q, k, v, g, beta, s0, *, scale, use_qk_l2norm, delta):
  """Float64 NumPy token loop. Shapes as the op's; s0 None means zeros."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  if use_qk_l2norm:
    q, k = _l2norm(np, q), _l2norm(np, k)
  q = q * scale
  s = np.zeros((b, h, dk, dv)) if s0 is None else np.array(s0, np.float64)
  o = np.zeros((b, t, h, dv))
  for i in range(t):
    s = s * np.exp(g[:, i])[..., None, None]
    if delta:
      update = beta[:, i, :, None] * (v[:, i] - np.einsum("bhkv,bhk->bhv", s, k[:, i]))
    else:
      update = beta[:, i, :, None] * v[:, i]
    s = s + k[:, i, :, :, None] * update[:, :, None, :]
    o[:, i] = np.einsum("bhkv,bhk->bhv", s, q[:, i])
  return o, s


def _jnp_rule(q, k, v, g, beta, s0, *, scale, use_qk_l2norm, delta):
  """Float64 jnp token scan (call under jax.enable_x64) for the reference gradients."""
  if use_qk_l2norm:
    q, k = _l2norm(jnp, q), _l2norm(jnp, k)
  q = q * scale

  def step(s, x):
    q_t, k_t, v_t, g_t, b_t = x
    s = s * jnp.exp(g_t)[..., None, None]
    if delta:
      v_t = v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t, precision="highest")
    s = s + k_t[..., :, None] * (b_t[..., None] * v_t)[..., None, :]
    return s, jnp.einsum("bhkv,bhk->bhv", s, q_t, precision="highest")

  s, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)))
  return jnp.moveaxis(o, 0, 1), s


@functools.partial(jax.jit, static_argnames=("use_qk_l2norm", "delta"))
def _jnp_rule_vjp(args, cotangents, scale, *, use_qk_l2norm, delta):
  f = functools.partial(_jnp_rule, scale=scale, use_qk_l2norm=use_qk_l2norm, delta=delta)
  out, pullback = jax.vjp(f, *args)
  return out, pullback(cotangents)


_T_REF = 130  # reference gradients run padded to this length: one compile per (l2 norm, rule)


def ref_vjp(args, cotangents, *, scale, use_qk_l2norm, delta):
  """(o, final_state), grads of (q, k, v, g, beta, initial_state), in float64.

  Tokens appended with q = k = v = 0, g = 0, beta = 0 and a zero cotangent on their o leave the
  state, the outputs and every gradient of the real tokens unchanged.
  """
  t = args[0].shape[1]
  assert t <= _T_REF
  pad = lambda x: np.pad(np.asarray(x, np.float64),
                         [(0, 0), (0, _T_REF - t)] + [(0, 0)] * (x.ndim - 2))
  args = tuple(pad(x) for x in args[:5]) + (np.asarray(args[5], np.float64),)
  cotangents = (pad(cotangents[0]), np.asarray(cotangents[1], np.float64))
  with jax.enable_x64(True):
    args, cotangents = jax.tree.map(jnp.asarray, (args, cotangents))
    (o, s), grads = _jnp_rule_vjp(args, cotangents, jnp.float64(scale),
                                  use_qk_l2norm=use_qk_l2norm, delta=delta)
    o, s, grads = jax.tree.map(lambda x: np.asarray(x, np.float64), (o, s, grads))
  return (o[:, :t], s), tuple(x[:, :t] for x in grads[:5]) + (grads[5],)


# ---------------------------------------------------------------------------------------------
# The op under test, jitted.

_STATIC = ("rule", "impl", "chunk_size", "scale", "use_qk_l2norm")


def _call(q, k, v, g, beta, s0, *, rule, impl, chunk_size, scale, use_qk_l2norm):
  fn = kernels.gated_delta_rule if rule == "delta" else kernels.gated_linear_rule
  return fn(q, k, v, g, beta, scale=scale, initial_state=s0, use_qk_l2norm=use_qk_l2norm,
            chunk_size=chunk_size, implementation=impl)


_op = jax.jit(_call, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _op_vjp(args, cotangents, **static):
  out, pullback = jax.vjp(functools.partial(_call, **static), *args)
  return out, pullback(cotangents)


def _static(rule, impl, chunk_size, scale, use_qk_l2norm):
  # "recurrent" ignores chunk_size: one value lets its tests share compilations (CPU time is
  # mostly XLA compiles, so tests below also reuse each other's shapes where they can).
  chunk_size = 64 if impl == "recurrent" else chunk_size
  return dict(rule=rule, impl=impl, chunk_size=chunk_size, scale=scale,
              use_qk_l2norm=use_qk_l2norm)


def op(args, *, rule, impl, chunk_size=64, scale=None, use_qk_l2norm=False):
  return _op(*args, **_static(rule, impl, chunk_size, scale, use_qk_l2norm))


def op_vjp(args, cotangents, *, rule, impl, chunk_size=64, scale=None, use_qk_l2norm=False):
  """((o, final_state), grads of (q, k, v, g, beta, initial_state))."""
  return _op_vjp(args, cotangents, **_static(rule, impl, chunk_size, scale, use_qk_l2norm))


# ---------------------------------------------------------------------------------------------
# Inputs and metrics.


@pytest.fixture
def rng(request):
  """A generator seeded from the test's id (its name and parameters): fresh inputs per test."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def make_inputs(rng, *, b=2, t=75, h=2, dk=16, dv=32, normalize_k=True, with_state=True,
                dtype=np.float32):
  """Random q, k, v, g (= log sigmoid(N(0,1)) <= 0), beta (= sigmoid(N(0,1))), initial state.

  Without the in-op L2 norm, k is given unit norm so that the delta rule stays contractive.
  """
  q = rng.standard_normal((b, t, h, dk))
  k = rng.standard_normal((b, t, h, dk))
  if normalize_k:
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((b, t, h, dv))
  g = -np.logaddexp(0.0, -rng.standard_normal((b, t, h)))
  beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))
  s0 = rng.standard_normal((b, h, dk, dv)) * 0.5 if with_state else None
  cast = lambda x: None if x is None else jnp.asarray(x.astype(np.float32)).astype(dtype)
  return tuple(cast(x) for x in (q, k, v, g, beta)) + (cast(s0),)


def assert_close(got, ref, tol, what):
  err = rel_rms(got, ref)
  assert err < tol, f"{what}: relative RMS error {err:.3g} >= {tol:.1g}"


def ref(args, *, rule, scale=None, use_qk_l2norm=False):
  dk = args[0].shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  return np_rule(*args, scale=scale, use_qk_l2norm=use_qk_l2norm, delta=rule == "delta")


# ---------------------------------------------------------------------------------------------
# Forward against the float64 loop.

# Every length with every chunk size for the delta rule; for the (simpler) linear rule every
# length and every chunk size at least once. None of T = 1, 63, 75, 130 is a chunk multiple.
_LENGTH_CASES = (
    [("delta", "recurrent", t, 64) for t in (1, 63, 75, 130)]
    + [("linear", "recurrent", t, 64) for t in (1, 63, 75, 130)]
    + [("delta", "chunked", t, c) for t in (1, 63, 75, 130) for c in (16, 32, 64)]
    + [("linear", "chunked", t, c) for t, c in ((1, 16), (63, 32), (75, 64), (130, 32))]
    + [(rule, "single_token", 1, 64) for rule in RULES])


@pytest.mark.parametrize("rule,impl,t,chunk_size", _LENGTH_CASES)
def test_forward_matches_float64_loop(rng, rule, impl, t, chunk_size):
  args = make_inputs(rng, b=2, t=t, h=2, dk=16, dv=32)
  o, s = op(args, rule=rule, impl=impl, chunk_size=chunk_size)
  o_ref, s_ref = ref(args, rule=rule)
  assert o.shape == (2, t, 2, 32) and s.shape == (2, 2, 16, 32)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_close(o, o_ref, FWD_TOL, "o")
  assert_close(s, s_ref, FWD_TOL, "final_state")


# (use_qk_l2norm, scale, with initial state): every value of each option, each pair of options.
# The chunked form gets all four; the recurrent one the two that still cover every value.
_OPTION_CASES = [(True, None, False), (True, 0.3, True), (False, 0.7, False), (False, None, True)]
_OPTION_CASES = ([("chunked",) + c for c in _OPTION_CASES]
                 + [("recurrent",) + c for c in _OPTION_CASES[1:3]])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl,use_qk_l2norm,scale,with_state", _OPTION_CASES)
def test_options_match_float64_loop(rng, rule, impl, use_qk_l2norm, scale, with_state):
  # With the in-op L2 norm, k is given raw (norm ~4) so that the normalisation matters.
  args = make_inputs(rng, b=2, t=75, h=3, dk=16, dv=32, normalize_k=not use_qk_l2norm,
                     with_state=with_state)
  args = (args[0] * 3.0,) + args[1:]  # q far from unit norm: the norm and the scale both matter
  o, s = op(args, rule=rule, impl=impl, chunk_size=32, scale=scale, use_qk_l2norm=use_qk_l2norm)
  o_ref, s_ref = ref(args, rule=rule, scale=scale, use_qk_l2norm=use_qk_l2norm)
  assert_close(o, o_ref, FWD_TOL, "o")
  assert_close(s, s_ref, FWD_TOL, "final_state")


_SHAPE_CASES = ([("chunked", 1, 1, 16, 32), ("chunked", 3, 2, 32, 16), ("chunked", 2, 4, 8, 8),
                 ("recurrent", 3, 2, 32, 16)])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl,b,h,dk,dv", _SHAPE_CASES)
def test_shapes_match_float64_loop(rng, rule, impl, b, h, dk, dv):
  args = make_inputs(rng, b=b, t=40, h=h, dk=dk, dv=dv)
  o, s = op(args, rule=rule, impl=impl, chunk_size=16)
  assert o.shape == (b, 40, h, dv) and s.shape == (b, h, dk, dv)
  o_ref, s_ref = ref(args, rule=rule)
  assert_close(o, o_ref, FWD_TOL, "o")
  assert_close(s, s_ref, FWD_TOL, "final_state")


@pytest.mark.parametrize("rule", ["delta", pytest.param("linear", marks=pytest.mark.slow)])
def test_single_token_options_and_refusal(rng, rule):
  """The decode step's op: every option value and bf16 inputs at T = 1; longer inputs refused
  (by name only: the model asks for it when T = 1)."""
  for use_qk_l2norm, scale, with_state in ((True, 0.3, True), (False, 0.7, False)):
    args = make_inputs(rng, b=3, t=1, h=2, dk=16, dv=32, normalize_k=not use_qk_l2norm,
                       with_state=with_state)
    args = (args[0] * 3.0,) + args[1:]
    o, s = op(args, rule=rule, impl="single_token", scale=scale, use_qk_l2norm=use_qk_l2norm)
    o_ref, s_ref = ref(args, rule=rule, scale=scale, use_qk_l2norm=use_qk_l2norm)
    assert_close(o, o_ref, FWD_TOL, "o")
    assert_close(s, s_ref, FWD_TOL, "final_state")
  args = make_inputs(rng, b=2, t=1, h=2, dk=16, dv=32, dtype=jnp.bfloat16)
  o, s = op(args, rule=rule, impl="single_token")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = ref(tuple(np.asarray(x.astype(jnp.float32)) for x in args), rule=rule)
  assert_close(o, o_ref, BF16_TOL, "o")
  assert_close(s, s_ref, BF16_TOL, "final_state")
  with pytest.raises(NotImplementedError, match="T = 1.*got T = 2"):
    op(make_inputs(rng, b=1, t=2, h=1, dk=16, dv=16), rule=rule, impl="single_token")
  assert "single_token" not in kernels.default_implementations("gpu")


# ---------------------------------------------------------------------------------------------
# Gradients against the float64 scan, with random cotangents on both outputs.

# Every chunk size and the L2 norm on and off; the delta rule also with T = 63, chunks of 32.
_GRAD_CASES = [("recurrent", 75, 64, False), ("recurrent", 63, 64, True),
               ("chunked", 1, 16, False), ("chunked", 75, 16, False), ("chunked", 130, 64, True)]
_GRAD_CASES = ([(rule,) + c for rule in RULES for c in _GRAD_CASES]
               + [("delta", "chunked", 63, 32, True)]
               + [("delta", "single_token", 1, 64, True)])


@pytest.mark.parametrize("rule,impl,t,chunk_size,use_qk_l2norm", _GRAD_CASES)
def test_gradients_match_float64(rng, rule, impl, t, chunk_size, use_qk_l2norm):
  args = make_inputs(rng, b=2, t=t, h=2, dk=16, dv=32, normalize_k=not use_qk_l2norm)
  cts = (jnp.asarray(rng.standard_normal((2, t, 2, 32)), jnp.float32),
         jnp.asarray(rng.standard_normal((2, 2, 16, 32)), jnp.float32))
  scale = 0.3 if use_qk_l2norm else None
  (o, s), grads = op_vjp(args, cts, rule=rule, impl=impl, chunk_size=chunk_size, scale=scale,
                         use_qk_l2norm=use_qk_l2norm)
  (o_ref, s_ref), grads_ref = ref_vjp(args, cts, scale=16 ** -0.5 if scale is None else scale,
                                      use_qk_l2norm=use_qk_l2norm, delta=rule == "delta")
  # The gradient oracle's forward pass is the NumPy loop's.
  o_np, s_np = ref(args, rule=rule, scale=scale, use_qk_l2norm=use_qk_l2norm)
  np.testing.assert_allclose(o_ref, o_np, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(s_ref, s_np, rtol=1e-9, atol=1e-9)
  assert_close(o, o_ref, FWD_TOL, "o")
  assert_close(s, s_ref, FWD_TOL, "final_state")
  for name, grad, grad_ref in zip(("q", "k", "v", "g", "beta", "initial_state"), grads,
                                  grads_ref, strict=True):
    assert grad.dtype == jnp.float32, name
    assert_close(grad, grad_ref, GRAD_TOL, f"d{name}")


# ---------------------------------------------------------------------------------------------
# Properties.


# Splits of T = 130 (chunks of 32) inside a chunk (1, 55, 67) and on a chunk boundary (64); most
# pick a prefix or a suffix length that test_forward_matches_float64_loop already compiled.
_SPLIT_CASES = ([("delta", "chunked", s) for s in (1, 55, 64)]
                + [("linear", "chunked", 67), ("delta", "recurrent", 55),
                   ("linear", "recurrent", 55)])


@pytest.mark.parametrize("rule,impl,split", _SPLIT_CASES)
def test_prefix_then_suffix_equals_one_pass(rng, rule, impl, split):
  t, chunk_size = 130, 32
  args = make_inputs(rng, b=2, t=t, h=2, dk=16, dv=32)
  o, s = op(args, rule=rule, impl=impl, chunk_size=chunk_size)
  head = tuple(x[:, :split] for x in args[:5])
  tail = tuple(x[:, split:] for x in args[:5])
  o1, s1 = op(head + (args[5],), rule=rule, impl=impl, chunk_size=chunk_size)
  o2, s2 = op(tail + (s1,), rule=rule, impl=impl, chunk_size=chunk_size)
  assert_close(jnp.concatenate([o1, o2], axis=1), o, 1e-5, "o")
  assert_close(s2, s, 1e-5, "final_state")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", IMPLS)
def test_beta_zero_keeps_state(rng, rule, impl):
  q, k, v, _, _, s0 = make_inputs(rng, b=2, t=63, h=2, dk=16, dv=32, normalize_k=False)
  zeros = jnp.zeros(q.shape[:3], jnp.float32)
  o, s = op((q, k, v, zeros, zeros, s0), rule=rule, impl=impl, chunk_size=32)
  np.testing.assert_allclose(s, s0, rtol=1e-6, atol=1e-6)
  o_expected = np.einsum("bhkv,bthk->bthv", np.asarray(s0, np.float64),
                         16 ** -0.5 * np.asarray(q, np.float64))
  assert_close(o, o_expected, FWD_TOL, "o")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g_mode", ["-30", "-80", "mixed"])
def test_tiny_decay_stays_finite(rng, rule, impl, g_mode):
  b, t, h = 2, 75, 2
  q, k, v, _, beta, s0 = make_inputs(rng, b=b, t=t, h=h, dk=16, dv=32)
  if g_mode == "mixed":  # -80 and 0 interleaved at random
    g = np.where(rng.random((b, t, h)) < 0.5, -80.0, 0.0)
  else:
    g = np.full((b, t, h), float(g_mode))
  args = (q, k, v, jnp.asarray(g, jnp.float32), beta, s0)
  cts = (jnp.asarray(rng.standard_normal((b, t, h, 32)), jnp.float32),
         jnp.asarray(rng.standard_normal((b, h, 16, 32)), jnp.float32))
  (o, s), grads = op_vjp(args, cts, rule=rule, impl=impl, chunk_size=16)  # as a gradient case
  assert np.all(np.isfinite(o)) and np.all(np.isfinite(s))
  for name, grad in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, strict=True):
    assert np.all(np.isfinite(grad)), f"d{name} is not finite"
  o_ref, s_ref = ref(args, rule=rule)
  assert_close(o, o_ref, FWD_TOL, "o")
  assert_close(s, s_ref, FWD_TOL, "final_state")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dtypes_bf16_in_bf16_out(rng, rule, impl):
  """bf16 everything (initial state too): o in bf16, final state in float32.

  (float32 in, float32 out is checked by test_forward_matches_float64_loop.)
  """
  args = make_inputs(rng, b=2, t=75, h=2, dk=16, dv=32, dtype=jnp.bfloat16)
  o, s = op(args, rule=rule, impl=impl, chunk_size=64)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = ref(tuple(np.asarray(x.astype(jnp.float32)) for x in args), rule=rule)
  assert_close(o, o_ref, BF16_TOL, "o")
  assert_close(s, s_ref, BF16_TOL, "final_state")


# ---------------------------------------------------------------------------------------------
# Dispatch and argument checks.


def test_available_implementations():
  names = kernels.available_implementations()
  assert isinstance(names, tuple) and {"recurrent", "chunked"} <= set(names)


@pytest.mark.parametrize("rule", RULES)
def test_default_implementation_is_chunked_on_cpu(rng, rule):
  if jax.default_backend() != "cpu":
    pytest.skip("the default order is backend-specific")
  args = make_inputs(rng, b=2, t=75, h=2, dk=16, dv=32)
  o, s = op(args, rule=rule, impl=None)  # every option at its default
  o_c, s_c = op(args, rule=rule, impl="chunked", chunk_size=64)
  np.testing.assert_array_equal(o, o_c)
  np.testing.assert_array_equal(s, s_c)
  o_ref, s_ref = ref(args, rule=rule)
  assert_close(o, o_ref, FWD_TOL, "o")
  assert_close(s, s_ref, FWD_TOL, "final_state")


def _bad(name, b=2, t=5, h=2, dk=16, dv=32):
  """Valid arguments (as a dict), with one made invalid according to `name`."""
  z = lambda *shape: jnp.zeros(shape, jnp.float32)
  kw = dict(q=z(b, t, h, dk), k=z(b, t, h, dk), v=z(b, t, h, dv), g=z(b, t, h), beta=z(b, t, h),
            initial_state=None, chunk_size=64, implementation=None)
  if name == "q_rank":
    kw["q"] = z(b, t, h * dk)
  elif name == "g_rank":
    kw["g"] = z(b, t, h, 1)
  elif name == "k_shape":
    kw["k"] = z(b, t, h, dk + 1)
  elif name == "v_bth":
    kw["v"] = z(b, t + 1, h, dv)
  elif name == "beta_shape":
    kw["beta"] = z(b, t, h + 1)
  elif name == "k_dim":
    kw["q"], kw["k"] = z(b, t, h, 257), z(b, t, h, 257)
  elif name == "v_dim":
    kw["v"] = z(b, t, h, 257)
  elif name == "initial_state":
    kw["initial_state"] = z(b, h, dv, dk)
  elif name == "chunk_size":
    kw["chunk_size"] = 48
  elif name == "implementation":
    kw["implementation"] = "no_such_kernel"
  return kw


_BAD_CASES = [("q_rank", r"\bq must have rank 4"), ("g_rank", r"\bg must have rank 3"),
              ("k_shape", r"\bk must have q's shape"), ("v_bth", r"\bv must have shape"),
              ("beta_shape", r"\bbeta must have shape"), ("k_dim", r"head dim K .*257"),
              ("v_dim", r"\bv head dim V .*257"), ("initial_state", r"initial_state must"),
              ("chunk_size", r"chunk_size must .*48"),
              ("implementation", r"implementation must .*no_such_kernel")]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case,match", _BAD_CASES)
def test_bad_inputs_raise_value_error(rule, case, match):
  fn = kernels.gated_delta_rule if rule == "delta" else kernels.gated_linear_rule
  kw = _bad(case)
  with pytest.raises(ValueError, match=match) as info:
    fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("g"), kw.pop("beta"), **kw)
  if case == "implementation":  # the message lists the valid names
    for name in kernels.available_implementations():
      assert repr(name) in str(info.value)
