"""The host side of streaming inference: `Stream` feeds prompts and generates, sleeping at every
window boundary, through the jitted functions of `sleep_lm.inference.decoding`.

    stream = Stream(config, params, batch=2)
    logits = stream.feed(prompt)                  # [B,T,V]: prefill, or teacher forcing
    tokens = stream.generate(16, logits[:, -1], temperature=0.8, top_k=2, seed=0)

The host keeps the position (the streams' shared one), so it knows when a window fills without
reading anything back from the device: calls are queued asynchronously, and nothing waits for
the device until the caller reads the tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sleep_lm.inference import decoding
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.layers import Layout, layout_named

Array = jax.Array

# Tokens a call of the generation loop may produce (its output buffer): within a window anyway.
LOOP_STEPS = 4096
# Tokens of whole windows one prefill call takes (at least one window): longer prompts take
# several calls of one compiled shape, and fewer whole windows go one at a time.
PREFILL_TOKENS = 2048
LOOPS = ("dynamic", "fixed")


class Stream:
  """B independent streams of one model, advancing in lockstep.

  config, params: the model and its (training-layout, unboxed, one-model) parameters; they are
    rearranged once on the device into `layout` (`sleep_lm.model.layers.LAYOUTS`: "rows" by
    default).
  capacity: the most tokens a stream holds, for eviction "none" (the full-cache baseline).
  loop: "dynamic", one compiled generation loop for any number of tokens, or "fixed", one per
    distinct number (a loop whose trip count is known when compiled).
  `feed` takes any number of tokens, sleeping and evicting at every window boundary it crosses;
  `generate` samples a token from the last logits, feeds it, and repeats, on the device, coming
  back to the host only to sleep at window boundaries. `state` is the device `DecodeState`.
  """

  def __init__(self, config: ModelConfig, params, batch: int, *, capacity: int | None = None,
               layout: str | Layout = "rows", loop: str = "dynamic"):
    if loop not in LOOPS:
      raise ValueError(f"loop: must be one of {LOOPS}, got {loop!r}")
    self.config, self.batch, self.capacity, self.loop = config, batch, capacity, loop
    self.layout = layout if isinstance(layout, Layout) else layout_named(layout)
    self.cache_layout = decoding.cache_layout(config, capacity)
    self.fns = decoding.functions(config, self.cache_layout, self.layout)
    self.params = decoding.prepare_params(config, params, self.layout)
    self.state = decoding.init_state(config, batch, capacity)
    self.position = 0
    self.sleep_events = 0

  @property
  def loop_steps(self) -> int:
    return min(self.cache_layout.window, LOOP_STEPS)

  def warm_up(self, *, temperature: float = 0.0, top_k: int = 0, sleep: bool = True) -> None:
    """Compiles the generation loop (and the sleep, unless `sleep` is False) by running them on
    a scratch state as large as the stream's (its own is untouched), so that `generate` calls
    that follow run at once."""
    scratch = decoding.init_state(self.config, self.batch, self.capacity)
    logits = jnp.zeros((self.batch, self.config.vocab_size), jnp.float32)
    fn = self.fns.generate if self.loop == "dynamic" else self.fns.generate_fixed
    scratch, _, _ = fn(self.params, scratch, logits, jax.random.key(0), 0, 1,
                       steps=self.loop_steps, temperature=float(temperature), top_k=int(top_k))
    if sleep and self.cache_layout.evicts:
      scratch = self.fns.sleep(self.params, scratch)
    jax.block_until_ready(scratch)

  def _fresh_window(self) -> bool:
    """The next token starts a window whose buffer holds nothing visible (hard eviction at a
    window boundary, or a full-cache stream at position 0)."""
    lay = self.cache_layout
    return not lay.sliding and self.position % lay.window == 0

  def _advance(self, count: int) -> None:
    """The position moved by `count` tokens; a window that has just filled sleeps."""
    self.position += count
    lay = self.cache_layout
    if lay.evicts and self.position % lay.window == 0:
      self.state = self.fns.sleep(self.params, self.state)
      self.sleep_events += 1

  def _check_capacity(self, count: int) -> None:
    lay = self.cache_layout
    if not lay.evicts and self.position + count > lay.window:
      raise ValueError(f"eviction='none': {self.position} + {count} tokens exceed the "
                       f"capacity {lay.window} the stream was made with")

  def feed(self, tokens, *, last_only: bool = False) -> Array:
    """Feeds tokens [B,T] (T >= 1); returns their logits [B,T,V] (the last one's [B,V] if
    last_only), each from the wake pass, as they would be produced token by token."""
    tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] != self.batch or tokens.shape[1] < 1:
      raise ValueError(f"tokens must be [B,T] with B = {self.batch} streams and T >= 1, got "
                       f"shape {tokens.shape}")
    lay, total = self.cache_layout, tokens.shape[1]
    self._check_capacity(total)
    # Slice on the host, then hand the device arrays to the jitted calls (a NumPy argument
    # and a device array of the same shape are separate entries of jit's cache).
    piece = lambda a, b: jnp.asarray(tokens if (a, b) == (0, total) else tokens[:, a:b])
    per_call = max(1, PREFILL_TOKENS // lay.window)
    outs, i = [], 0
    while i < total:
      whole = (total - i) // lay.window
      if lay.evicts and self.position % lay.window == 0 and whole > 0:
        n = per_call if whole >= per_call else 1
        chunk = piece(i, i + n * lay.window)
        self.state, logits = self.fns.prefill(self.params, self.state, chunk,
                                              last_only=last_only)
        self.position += chunk.shape[1]
        self.sleep_events += n
      else:
        chunk = piece(i, i + min(lay.window - self.position % lay.window, total - i))
        n = chunk.shape[1]
        self.state, logits = self.fns.wake(self.params, self.state, chunk,
                                           last_only=last_only and n > 1,   # one decode step
                                           empty=n > 1 and self._fresh_window())
        self._advance(n)
      outs.append(logits)
      i += chunk.shape[1]
    if last_only:
      return outs[-1][:, -1]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

  def generate(self, num_tokens: int, last_logits: Array, *, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0) -> Array:
    """Samples `num_tokens` tokens per stream, feeding each one back: [B,num_tokens] int32.

    last_logits [B,V]: the logits of the last token fed (e.g. `feed(prompt)[:, -1]`). Step i
    samples with `fold_in(key(seed), i)`: the same seed gives the same tokens. The tokens of a
    window are one call of the device loop; the host only sleeps between windows."""
    if num_tokens < 1:
      return jnp.zeros((self.batch, 0), jnp.int32)
    self._check_capacity(num_tokens)
    lay = self.cache_layout
    key = jax.random.key(seed)
    fn = self.fns.generate if self.loop == "dynamic" else self.fns.generate_fixed
    logits, outs, done = last_logits, [], 0
    while done < num_tokens:
      count = min(num_tokens - done, lay.window - self.position % lay.window, self.loop_steps)
      self.state, tokens, logits = fn(self.params, self.state, logits, key, done, count,
                                      steps=self.loop_steps, temperature=float(temperature),
                                      top_k=int(top_k))
      outs.append(tokens[:, :count])
      done += count
      self._advance(count)
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
