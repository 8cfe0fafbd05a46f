"""Public entry points, argument checks and implementation dispatch for the fast-weight ops.

Contract (that of flash-linear-attention's `chunk_gated_delta_rule`):
  q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H] log decay (<= 0); beta [B,T,H];
  initial_state [B,H,K,V] or None (zeros).
  Returns o [B,T,H,V] in v's dtype and final_state [B,H,K,V] in float32.
  With use_qk_l2norm, q and k are L2-normalised over K first; scale (default K**-0.5) then
  multiplies q.

Implementations are tried in the order of `DEFAULT_ORDER[backend]` when `implementation` is None;
one that cannot take the inputs raises NotImplementedError (with the reason) and the next is
tried. Asked for by name (or given as a `base.Implementation` record, e.g. a Triton build with
other tuning, `pallas_triton.make_implementation(Tuning(...))`), an implementation's
NotImplementedError reaches the caller.

Imports go one way: this module imports the implementations; they import `base` (the record, the
limits, q/k preparation) and never this module. The registry and the default orders are
immutable.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels.array_types import Arr, Float, typed
from kernels.gated_delta_rule import (
  chunked,
  pallas_mosaic_gpu_grads,
  pallas_mosaic_tpu,
  pallas_triton,
  reference,
  single_token,
)
from kernels.gated_delta_rule.base import (  # noqa: F401  (re-exported)
  CHUNK_SIZES,
  L2NORM_EPS,
  MAX_HEAD_DIM,
  Implementation,
  ImplementationFn,
  l2_normalize,
  prepare_qk,
)
from kernels.platform import target_platform

REGISTRY: types.MappingProxyType[str, Implementation] = types.MappingProxyType({
    impl.name: impl for impl in (reference.IMPLEMENTATION, chunked.IMPLEMENTATION,
                                 single_token.IMPLEMENTATION, pallas_triton.IMPLEMENTATION,
                                 pallas_mosaic_tpu.IMPLEMENTATION,
                                 pallas_mosaic_gpu_grads.IMPLEMENTATION)})
# Best first, per backend. pallas_triton passes float32 inputs over to chunked (measured slower;
# docs/kernels.md). pallas_mosaic_tpu has never run on a TPU, and pallas_mosaic_gpu (exact on an
# H200) is 1.2x slower than pallas_triton there: available by name only.
# single_token (T = 1 only) is asked for by name: the model's decode step does.
DEFAULT_ORDER: types.MappingProxyType[str, tuple[str, ...]] = types.MappingProxyType({
    "cpu": ("chunked",), "gpu": ("pallas_triton", "chunked"), "tpu": ("chunked",)})
_FALLBACK_ORDER = ("chunked",)


def available_implementations() -> tuple[str, ...]:
  """Every implementation name that `implementation=` accepts."""
  return tuple(REGISTRY)


def default_implementations(backend: str | None = None) -> tuple[str, ...]:
  """The order in which `implementation=None` tries implementations on `backend`."""
  return DEFAULT_ORDER.get(backend or target_platform(), _FALLBACK_ORDER)


def default_candidates(q: jax.Array, backend: str | None = None
                       ) -> tuple[tuple[str, ...], list[str]]:
  """The implementations `implementation=None` tries for q, in order, and why others are skipped."""
  names, skipped = [], []
  for name in default_implementations(backend):
    check = REGISTRY[name].passed_over_by_default
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
  expect(implementation is None or isinstance(implementation, Implementation)
         or implementation in REGISTRY,
         f"implementation must be None, an Implementation or one of "
         f"{available_implementations()}, got {implementation!r}")


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
    impl = (implementation if isinstance(implementation, Implementation)
            else REGISTRY[implementation])
    o, final_state = _call(impl.fn, q, k, v, g, beta, state, **kwargs)
  else:
    candidates, reasons = default_candidates(q)
    for name in candidates:
      try:
        o, final_state = _call(REGISTRY[name].fn, q, k, v, g, beta, state, **kwargs)
        break
      except NotImplementedError as e:  # this one cannot take these inputs: try the next
        reasons.append(f"{name}: {e}")
    else:
      raise NotImplementedError("no implementation takes these inputs: " + "; ".join(reasons))
  return o.astype(v.dtype), final_state.astype(jnp.float32)


@typed
def _call(fn: Callable, q: Float[Arr, "b t h k"], k: Float[Arr, "b t h k"],
          v: Float[Arr, "b t h v"], g: Float[Arr, "b t h"], beta: Float[Arr, "b t h"],
          state: Float[Arr, "b h k v"], **kwargs
          ) -> tuple[Float[Arr, "b t h v"], Float[Arr, "b h k v"]]:
  """One implementation's call, after `_check_args`: the contract every implementation keeps
  (shapes in and out), checked in tests (kernels.array_types)."""
  return fn(q, k, v, g, beta, state, **kwargs)


def gated_delta_rule(q, k, v, g, beta, *, scale: float | None = None,
                     initial_state: jax.Array | None = None, use_qk_l2norm: bool = False,
                     chunk_size: int = 64, implementation: str | Implementation | None = None):
  """Gated delta rule: S_t = a_t S + b_t k_t (v_t - (a_t S)^T k_t)^T, o_t = S_t^T q_t.

  a_t = exp(g_t). Shapes and semantics: see the module docstring. Returns (o, final_state).
  """
  return _run(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              implementation=implementation, delta=True)


def gated_linear_rule(q, k, v, g, beta, *, scale: float | None = None,
                      initial_state: jax.Array | None = None, use_qk_l2norm: bool = False,
                      chunk_size: int = 64, implementation: str | Implementation | None = None):
  """Gated linear (Hebbian) rule, the paper's Eq. 3: S_t = a_t S + b_t k_t v_t^T, o_t = S_t^T q_t.

  Same contract as `gated_delta_rule`.
  """
  return _run(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
              implementation=implementation, delta=False)


Rule = Callable[..., tuple[jax.Array, jax.Array]]
RULES: types.MappingProxyType[str, Rule] = types.MappingProxyType(
    {"gdn": gated_delta_rule, "gated_linear": gated_linear_rule})

