"""A plain NumPy forward of a `Checkpoint`: the oracle the imported sleep_lm model is compared with.

Written from the architecture's definition, independently of sleep_lm's model code, for being
obviously right rather than fast: no cache (every call recomputes the whole sequence), one
sequence at a time, float64 by default.

  h = embed[tokens]
  per block:  h += o_proj(attention(rope(q), rope(k), v))   on rms_norm(h) * attn_norm
              h += down(silu(x @ gate) * (x @ up))          on x = rms_norm(h) * mlp_norm
  logits = (rms_norm(h) * final_norm) @ (embed.T if tied else lm_head)

Attention is causal softmax(q k^T / sqrt(Dh)) v, query head h reading key/value head
h // (heads / kv_heads) (grouped-query attention). RoPE is rotate-half: within a head, feature j
and feature j + Dh/2 rotate together by angle position * base^(-2j/Dh).
"""

from __future__ import annotations

import numpy as np

from sleep_lm.pretrained.checkpoint import Checkpoint


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
  """x [T, heads, Dh] rotated at `positions` [T] (rotate-half pairing)."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / base ** (np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
  angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]       # [T, Dh/2]
  cos = np.cos(angles).astype(x.dtype)[:, None, :]
  sin = np.sin(angles).astype(x.dtype)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """q [T, H, Dh], k/v [T, G, Dh] -> [T, H, Dh]; query head h reads key/value head h // (H/G)."""
  t, heads, dh = q.shape
  group = heads // k.shape[1]
  k = np.repeat(k, group, axis=1)                       # [T, H, Dh]: head h uses kv head h//group
  v = np.repeat(v, group, axis=1)
  scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
  future = np.triu(np.ones((t, t), bool), k=1)
  scores = np.where(future[None], -np.inf, scores)
  scores = scores - scores.max(axis=-1, keepdims=True)
  p = np.exp(scores)
  p = p / p.sum(axis=-1, keepdims=True)
  return np.einsum("hqk,khd->qhd", p, v)


class Reference:
  """The forward of one checkpoint at one precision (the weights are cast once, at construction).

  `logits(tokens)` -> [T, vocab] for a 1-D sequence of ids; `greedy(prompt, steps)` -> the
  `steps` ids that greedy decoding appends.
  """

  def __init__(self, checkpoint: Checkpoint, dtype=np.float64):
    self.arch = checkpoint.arch
    self.dtype = np.dtype(dtype)
    self.w = {name: t.astype(self.dtype, copy=False) for name, t in checkpoint.tensors.items()}
    # The head as [vocab, d_model] rows (contiguous: a matrix-vector product streams them).
    self.head_rows = (self.w["embed"] if self.arch.tied_embeddings
                      else np.ascontiguousarray(self.w["lm_head"].T))

  def hidden(self, tokens, start: int = 0) -> np.ndarray:
    """The final-normed hidden states [T, d_model] of `tokens` at positions start, start+1, ..."""
    a, w = self.arch, self.w
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
      raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= a.vocab_size:
      raise ValueError(f"token ids must be in [0, {a.vocab_size})")
    t = tokens.shape[0]
    positions = np.arange(start, start + t)
    h = w["embed"][tokens]
    for i in range(a.layers):
      b = f"blocks.{i}."
      x = rms_norm(h, w[b + "attn_norm"], a.norm_eps)
      q, k, v = (x @ w[b + f"attn.{n}_proj"] for n in "qkv")
      if a.qkv_bias:
        q, k, v = (y + w[b + f"attn.{n}_bias"] for y, n in zip((q, k, v), "qkv", strict=True))
      q = rope(q.reshape(t, a.heads, a.head_dim), positions, a.rope_base)
      k = rope(k.reshape(t, a.kv_heads, a.head_dim), positions, a.rope_base)
      v = v.reshape(t, a.kv_heads, a.head_dim)
      h = h + causal_attention(q, k, v).reshape(t, a.q_dim) @ w[b + "attn.o_proj"]
      x = rms_norm(h, w[b + "mlp_norm"], a.norm_eps)
      gated = silu(x @ w[b + "mlp.gate_proj"]) * (x @ w[b + "mlp.up_proj"])
      h = h + gated @ w[b + "mlp.down_proj"]
    return rms_norm(h, w["final_norm"], a.norm_eps)

  def head(self, h: np.ndarray) -> np.ndarray:
    """Logits [..., vocab] of final-normed hidden states [..., d_model]."""
    return (self.head_rows @ h.T).T

  def logits(self, tokens) -> np.ndarray:
    return self.head(self.hidden(tokens))

  def greedy(self, prompt, steps: int, stop_ids=()) -> list[int]:
    """Greedy continuation of `prompt` (recomputing the sequence at every step), stopping early
    after emitting an id in `stop_ids`."""
    seq, out = list(prompt), []
    for _ in range(steps):
      nxt = int(np.argmax(self.head(self.hidden(seq)[-1])))
      out.append(nxt)
      seq.append(nxt)
      if nxt in stop_ids:
        break
    return out
