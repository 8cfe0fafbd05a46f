"""Causal flash attention: JAX's own Pallas kernel (Triton back end), forward and backward.

`causal_attention(q, k, v)` computes what `jax.nn.dot_product_attention(q, k, v,
is_causal=True)` does (softmax(q k^T / sqrt(D)) v over the keys at or before each query),
without the [T, T] scores: `jax.experimental.pallas.ops.gpu.attention.mha`, a flash-attention
kernel with its own backward (custom VJP), ships with the pinned jax. It is the second
memory-efficient attention beside cuDNN's (`ModelConfig.attention_implementation`
"pallas_triton"), for training one window of 32K+ tokens when cuDNN's path is not wanted, and a
third opinion where cuDNN and XLA disagree (issue 27, docs/results.md "Past 32K tokens").

Upstream marks the module deprecated (in favour of tokamax, a heavier dependency); it is present
and working in jax 0.11.2, which the project pins. The wrapper adds what the kernel lacks:
grouped-query heads (k and v repeated to the query heads), any T (padded at the end to a whole
number of blocks: causal queries never see the padded keys, which come after them) and any head
dim (zero-padded to a power of two >= 16, Triton's tile rule; zeros change no product, and the
scale stays 1/sqrt(D) of the true D). Off a GPU it runs in Pallas' interpreter (how CI tests it).
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from kernels.platform import target_platform

MAX_BLOCK = 128        # the kernel's default forward tile along T
BACKWARD_BLOCK = 32    # and its default backward tiles
MIN_BLOCK = 16         # the smallest tile Triton's dot takes


@functools.cache
def _mha():
  with warnings.catch_warnings():     # upstream's deprecation notice: see the module docstring
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention
  return attention


def _pow2_at_least(n: int, floor: int) -> int:
  return max(floor, 1 << max(0, n - 1).bit_length())


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     interpret: bool | None = None) -> jax.Array:
  """q [B,T,H,D], k and v [B,T,G,D] (G divides H; query head n reads key/value head
  n // (H/G)), one dtype -> [B,T,H,D] in q's dtype.

  interpret: run in Pallas' interpreter; None: unless the computation
    targets a GPU (`kernels.platform.target_platform`)."""
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"causal_attention: q must be [B,T,H,D] and k, v [B,T,G,D] of one shape, "
                     f"got q {q.shape}, k {k.shape}, v {v.shape}")
  b, t, h, d = q.shape
  g = k.shape[2]
  if k.shape[:2] != (b, t) or k.shape[3] != d or h % g:
    raise ValueError(f"causal_attention: k and v must be [B={b}, T={t}, G, D={d}] with G "
                     f"dividing H={h}, got {k.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"causal_attention: q, k and v must share a dtype, got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}")
  if interpret is None:
    interpret = target_platform() != "gpu"
  if g != h:
    k, v = (jnp.repeat(x, h // g, axis=2) for x in (k, v))
  block = min(MAX_BLOCK, _pow2_at_least(t, MIN_BLOCK))
  t_pad, d_pad = -t % block, _pow2_at_least(d, MIN_BLOCK) - d
  if t_pad or d_pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, t_pad), (0, 0), (0, d_pad))) for x in (q, k, v))
  back = min(BACKWARD_BLOCK, block)
  mha = _mha()
  blocks = mha.BlockSizes(block_q=block, block_k=block, block_q_dkv=back, block_kv_dkv=back,
                          block_q_dq=back, block_kv_dq=back)
  out = mha.mha(q, k, v, None, sm_scale=1.0 / math.sqrt(d), causal=True, block_sizes=blocks,
                interpret=bool(interpret))
  return out[:, :t, :, :d]
