"""What every implementation of the op shares: the implementation record, the limits of the
contract and the preparation of q and k.

Imports nothing of the package. The modules import one way: `api` imports the implementations
(`reference`, `chunked`, `pallas_triton`, `pallas_mosaic_tpu`, `pallas_mosaic_gpu`), which import
this module (the Pallas ones also `_pallas_common`) and never `api`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

MAX_HEAD_DIM = 256  # K and V (fla's limit)
CHUNK_SIZES = (16, 32, 64)
L2NORM_EPS = 1e-6  # x / sqrt(sum(x^2) + eps), fla's `l2norm`


class ImplementationFn(Protocol):
  """Gets validated inputs and a float32 initial state; returns (o, final_state)."""

  def __call__(self, q, k, v, g, beta, initial_state, *, scale: float, use_qk_l2norm: bool,
               chunk_size: int, delta: bool) -> tuple[jax.Array, jax.Array]:
    ...


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute the op. `fn` raises NotImplementedError (with the reason) for inputs it
  cannot take.

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
