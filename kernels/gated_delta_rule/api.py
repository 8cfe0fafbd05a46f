"""Public entry points, argument checks and implementation dispatch for the fast-weight ops.

Contract (that of flash-linear-attention's `chunk_gated_delta_rule`):
  q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H] log decay (<= 0); beta [B,T,H];
  initial_state [B,H,K,V] or None (zeros).
  Returns o [B,T,H,V] in v's dtype and final_state [B,H,K,V] in float32.
  With use_qk_l2norm, q and k are L2-normalised over K first; scale (default K**-0.5) then
  multiplies q.

Implementations are tried in the order of `_DEFAULT_ORDER[backend]` when `implementation` is
None; one that cannot take the inputs raises NotImplementedError (with the reason) and the next is
tried. Asked for by name, an implementation's NotImplementedError reaches the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

from kernels.gated_delta_rule import chunked, reference

MAX_HEAD_DIM = 256
CHUNK_SIZES = (16, 32, 64)
L2NORM_EPS = 1e-6


class ImplementationFn(Protocol):

  def __call__(self, q, k, v, g, beta, initial_state, *, scale: float, use_qk_l2norm: bool,
               chunk_size: int, delta: bool) -> tuple[jax.Array, jax.Array]:
    ...


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute the op. `fn` gets validated inputs and a float32 initial state.

  `passed_over_by_default(q)` returns why dispatch with `implementation=None` should not pick this
  implementation for these inputs although it can run them (measured slower), or None. Asked for
  by name, the implementation runs regardless.
  """
  name: str
  fn: ImplementationFn
  description: str
  passed_over_by_default: Callable[[jax.Array], str | None] | None = None


def l2_normalize(x: jax.Array, eps: float = L2NORM_EPS) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (fla's `l2norm`)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def prepare_qk(q, k, *, scale: float, use_qk_l2norm: bool):
  """Applies the optional L2 norm and the scale, the way every JAX implementation needs them."""
  if use_qk_l2norm:
    q, k = l2_normalize(q).astype(q.dtype), l2_normalize(k).astype(k.dtype)
  return (q.astype(jnp.float32) * scale).astype(q.dtype), k


def _reference_impl(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm, chunk_size, delta):
  del chunk_size  # token by token
  q, k = prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  fn = reference.recurrent_gated_delta_rule if delta else reference.recurrent_gated_linear_rule
  return fn(q, k, v, g, beta, initial_state)


def _chunked_impl(q, k, v, g, beta, initial_state, *, scale, use_qk_l2norm, chunk_size, delta):
  q, k = prepare_qk(q, k, scale=scale, use_qk_l2norm=use_qk_l2norm)
  fn = chunked.chunked_gated_delta_rule if delta else chunked.chunked_gated_linear_rule
  return fn(q, k, v, g, beta, initial_state, chunk_size=chunk_size)


_REGISTRY: dict[str, Implementation] = {}
# Best first, per backend. Pallas kernels register themselves in front of "chunked".
_DEFAULT_ORDER: dict[str, list[str]] = {"cpu": ["chunked"], "gpu": ["chunked"],
                                        "tpu": ["chunked"]}


def register_implementation(impl: Implementation, *, default_on: tuple[str, ...] = ()) -> None:
  """Adds `impl` to the registry and puts it first in the default order of `default_on`."""
  _REGISTRY[impl.name] = impl
  for backend in default_on:
    order = _DEFAULT_ORDER.setdefault(backend, ["chunked"])
    if impl.name not in order:
      order.insert(0, impl.name)


register_implementation(Implementation(
    "recurrent", _reference_impl, "token-by-token lax.scan with an fp32 state (the oracle)"))
register_implementation(Implementation(
    "chunked", _chunked_impl, "pure-JAX chunked WY form; lax.scan over chunks"))


def available_implementations() -> tuple[str, ...]:
  """Every implementation name that `implementation=` accepts."""
  return tuple(_REGISTRY)


def default_implementations(backend: str | None = None) -> tuple[str, ...]:
  """The order in which `implementation=None` tries implementations on `backend`."""
  return tuple(_DEFAULT_ORDER.get(backend or jax.default_backend(), ["chunked"]))


def default_candidates(q: jax.Array, backend: str | None = None
                       ) -> tuple[tuple[str, ...], list[str]]:
  """The implementations `implementation=None` tries for q, in order, and why others are skipped."""
  names, skipped = [], []
  for name in default_implementations(backend):
    check = _REGISTRY[name].passed_over_by_default
    why = check(q) if check is not None else None
    if why:
      skipped.append(f"{name}: {why}")
    else:
      names.append(name)
  return tuple(names), skipped


def _check_args(q, k, v, g, beta, initial_state, chunk_size, implementation):
  def expect(cond, message):
    if not cond:
      raise ValueError(message)

  for name, x, rank, layout in (("q", q, 4, "[B,T,H,K]"), ("k", k, 4, "[B,T,H,K]"),
                                ("v", v, 4, "[B,T,H,V]"), ("g", g, 3, "[B,T,H]"),
                                ("beta", beta, 3, "[B,T,H]")):
    expect(getattr(x, "ndim", None) == rank,
           f"{name} must have rank {rank} {layout}, got shape {getattr(x, 'shape', None)}")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  expect(k.shape == q.shape, f"k must have q's shape {q.shape} [B,T,H,K], got {k.shape}")
  expect(v.shape[:3] == (b, t, h), f"v must have shape [B,T,H,V] = [{b},{t},{h},V] like q, "
         f"got {v.shape}")
  for name, x in (("g", g), ("beta", beta)):
    expect(x.shape == (b, t, h), f"{name} must have shape [B,T,H] = {(b, t, h)}, got {x.shape}")
  expect(t >= 1, f"q must hold at least one token (T >= 1), got T = {t}")
  expect(1 <= dk <= MAX_HEAD_DIM, f"q/k head dim K must be in [1, {MAX_HEAD_DIM}], got {dk}")
  expect(1 <= dv <= MAX_HEAD_DIM, f"v head dim V must be in [1, {MAX_HEAD_DIM}], got {dv}")
  if initial_state is not None:
    expect(getattr(initial_state, "shape", None) == (b, h, dk, dv),
           f"initial_state must have shape [B,H,K,V] = {(b, h, dk, dv)} or be None, got "
           f"{getattr(initial_state, 'shape', None)}")
  expect(chunk_size in CHUNK_SIZES, f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
  expect(implementation is None or implementation in _REGISTRY,
         f"implementation must be None or one of {available_implementations()}, got "
         f"{implementation!r}")


def _run(q, k, v, g, beta, *, scale, initial_state, use_qk_l2norm, chunk_size, implementation,
         delta: bool):
  _check_args(q, k, v, g, beta, initial_state, chunk_size, implementation)
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else float(scale)
  state = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  kwargs = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, delta=delta)

  if implementation is not None:
    o, final_state = _REGISTRY[implementation].fn(q, k, v, g, beta, state, **kwargs)
  else:
    candidates, reasons = default_candidates(q)
    for name in candidates:
      try:
        o, final_state = _REGISTRY[name].fn(q, k, v, g, beta, state, **kwargs)
        break
      except NotImplementedError as e:  # this one cannot take these inputs: try the next
        reasons.append(f"{name}: {e}")
    else:
      raise NotImplementedError("no implementation takes these inputs: " + "; ".join(reasons))
  return o.astype(v.dtype), final_state.astype(jnp.float32)


def gated_delta_rule(q, k, v, g, beta, *, scale: float | None = None,
                     initial_state: jax.Array | None = None, use_qk_l2norm: bool = False,
                     chunk_size: int = 64, implementation: str | None = None):
  """Gated delta rule: S_t = a_t S + b_t k_t (v_t - (a_t S)^T k_t)^T, o_t = S_t^T q_t.

  a_t = exp(g_t). Shapes and semantics: see the module docstring. Returns (o, final_state).
  """
  return _run(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              implementation=implementation, delta=True)


def gated_linear_rule(q, k, v, g, beta, *, scale: float | None = None,
                      initial_state: jax.Array | None = None, use_qk_l2norm: bool = False,
                      chunk_size: int = 64, implementation: str | None = None):
  """Gated linear (Hebbian) rule, the paper's Eq. 3: S_t = a_t S + b_t k_t v_t^T, o_t = S_t^T q_t.

  Same contract as `gated_delta_rule`.
  """
  return _run(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              implementation=implementation, delta=False)


Rule = Callable[..., tuple[jax.Array, jax.Array]]
RULES: dict[str, Rule] = {"gdn": gated_delta_rule, "gated_linear": gated_linear_rule}


# Pallas kernels register themselves (and become the default on their backend) on import.
from kernels.gated_delta_rule import pallas_mosaic_tpu, pallas_triton  # noqa: E402,F401
