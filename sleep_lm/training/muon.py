"""Muon with its Newton-Schulz orthogonalization batched over matrices of one shape.

`optax.contrib.muon` orthogonalizes each weight matrix on its own: a program that updates the
16-layer model holds 136 copies of the Newton-Schulz chain (compile time; on a GPU, hundreds of
small kernels per step). `muon` here computes the same function, as `make_optimizer` configures
it (optax's defaults but for the learning rate, `beta`, `nesterov` and `weight_decay`), with one
chain per group of matrices: the matrices whose shape, up to a transpose, and dtype are the same
are stacked ([n, m, k], each tall matrix transposed first, as optax transposes it), orthogonalized
by batched matmuls, and unstacked. Per matrix the math is optax's (the transpose when rows >
cols, the Frobenius normalization, the 5 quintic steps with the coefficients in the matrix's
dtype, the width scaling sqrt(max(1, cols / rows))); momentum and Nesterov are optax's lines,
weight decay, the learning rate and the AdamW branch for non-2-D leaves optax's own transforms
(a copy of the partition `optax.contrib.muon` builds). The optimizer state
is optax's, leaf for leaf and type for type (a checkpoint written with `optax.contrib.muon`
restores): the orthogonalization is stateless. Oracle: `tests/test_muon.py`.

On a mesh, XLA reshards the matrices it stacks to one sharding per stack (matrices of one shape
may be split differently, e.g. [in, out] q and out projections): fewer all-gathers than one
chain per matrix, a few all-to-alls more (docs/scaling.md); not timed on GPUs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonState

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)   # optax's 'standard' quintic


def orthogonalize(updates: Any, ns_coeffs: jax.Array, ns_steps: int = 5,
                  eps: float = 1e-8) -> Any:
  """Every 2-D leaf of `updates` orthogonalized as optax's `orthogonalize_via_newton_schulz`
  (optax/contrib/_muon.py; Frobenius preconditioning, coefficients of shape (3,)) orthogonalizes
  it alone, one chain per group of leaves of the same (short side, long side, dtype). Each group
  is stacked: one more copy of its matrices while the chain runs."""
  leaves, treedef = jax.tree.flatten(updates)
  groups = defaultdict(list)
  for i, x in enumerate(leaves):
    if x.ndim != 2:
      raise ValueError(f"Muon orthogonalizes 2-D matrices, got shape {x.shape}")
    groups[min(x.shape), max(x.shape), jnp.dtype(x.dtype)].append(i)
  out = list(leaves)
  for members in groups.values():
    # optax: "if x.shape[0] > x.shape[1]: x = x.T" (f(X) = f(X^T)^T), then the same chain.
    tall = [leaves[i].shape[0] > leaves[i].shape[1] for i in members]
    x = jnp.stack([leaves[i].T if t else leaves[i] for i, t in zip(members, tall, strict=True)])
    x = _newton_schulz(x, ns_coeffs, ns_steps, eps)
    for j, (i, t) in enumerate(zip(members, tall, strict=True)):
      out[i] = x[j].T if t else x[j]
  return jax.tree.unflatten(treedef, out)


def _newton_schulz(x: jax.Array, ns_coeffs: jax.Array, ns_steps: int, eps: float) -> jax.Array:
  """optax's `_orthogonalize` for 'frobenius' on a stack [n, m, k] of wide (m <= k) matrices."""
  x = x / (jnp.linalg.norm(x, ord="fro", axis=(-2, -1), keepdims=True) + eps)
  c = ns_coeffs.astype(x.dtype)
  for _ in range(ns_steps):
    a = x @ jnp.swapaxes(x, -1, -2).conj()
    b = c[1] * a + c[2] * a @ a
    x = c[0] * x + b @ x
  return x


def scale_by_muon(beta: float = 0.95, *, nesterov: bool = True, ns_steps: int = 5,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """`optax.contrib.scale_by_muon` (default coefficients, Frobenius preconditioning, not
  adaptive, momentum in the parameters' dtype) with `orthogonalize` for the per-leaf chain."""
  reference = optax.contrib.scale_by_muon(DEFAULT_NS_COEFFS, ns_steps, beta, eps,
                                          nesterov=nesterov)

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count_inc = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: beta * m + (1 - beta) * g,
          optax.tree.bias_correction(mu, beta, optax.safe_increment(count_inc)),
          optax.tree.bias_correction(updates, beta, count_inc))
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count_inc)
    updates = orthogonalize(mu_hat, state.ns_coeffs, ns_steps, eps)
    return updates, MuonState(count=count_inc, mu=mu, ns_coeffs=state.ns_coeffs)
  return optax.GradientTransformation(reference.init, update_fn)


def scale_by_width() -> optax.GradientTransformation:
  """optax's `scale_by_shape` without `consistent_rms`: [rows, cols] x sqrt(max(1, cols / rows))."""
  def scale(x):
    fan_in, fan_out = x.shape
    return jnp.sqrt(jnp.maximum(1, fan_out / fan_in)) * x
  return optax.stateless(lambda updates, params: jax.tree.map(scale, updates))


def muon(learning_rate: optax.ScalarOrSchedule, beta: float = 0.95, *, nesterov: bool = True,
         weight_decay: float = 0.0, ns_steps: int = 5,
         eps: float = 1e-8) -> optax.GradientTransformation:
  """`optax.contrib.muon(learning_rate, beta=beta, nesterov=nesterov,
  weight_decay=weight_decay)`, its other arguments at their defaults, with the
  orthogonalization batched (`orthogonalize`). Same transforms, same state tree: 2-D leaves get
  Muon, the rest optax's AdamW branch (b1 0.9, b2 0.999, at `learning_rate`)."""
  return optax.partition(
      {"muon": optax.chain(scale_by_muon(beta, nesterov=nesterov, ns_steps=ns_steps, eps=eps),
                           scale_by_width(),
                           optax.add_decayed_weights(weight_decay),
                           optax.scale_by_learning_rate(learning_rate)),
       "adam": optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=eps, eps_root=0.0,
                           weight_decay=0.0, nesterov=nesterov)},
      lambda params: jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", params))
