r"""Streaming inference: wake with a bounded cache, sleep at eviction (API and CLI).

  python -m sleep_lm.generate --workdir runs/rule110_N4_t12 --prompt 0110...Q \
      --max_new_tokens 8 [--temperature 0 --top_k 0 --seed 0 --seed_index 0 --num_streams 1]

What a stream does (the paper's inference, "Sleep, precisely"):
  - wake: tokens arrive one by one (or a chunk at a time); each goes through one pass of the
    layer stack (`HybridLM.wake_step`): every attention layer writes its key/value into a cache of
    fixed size and attends to it, every GDN layer takes one recurrent step on its state S. The
    logits of a token come from this wake pass (pass 1).
  - sleep: when the window of L tokens is full, N-1 more passes of `HybridLM.run_pass` run over
    it (the wake pass counts as pass 1), each pass feeding its output features into the next and
    updating S, exactly as a consolidation window in training (`sleep_lm.sleep`). The wake pass's
    features are therefore kept in a buffer [B,L,D] while the window fills.
  - evict: hard eviction drops the window's keys/values (nothing to do: the attention mask is
    made from positions, so stale slots are never read); sliding eviction keeps the final pass's
    last L-1 keys/values. The GDN convolution restarts with the next window.
Prefill of a prompt of any length runs whole windows through `run_pass` (N passes each, the
wake pass's features giving the logits) and the rest through the wake step, one chunk.

The equivalence (tests/test_generate.py): the logits of the tokens of window c equal those of
`sleep_forward` over tokens[:, :end of window c] with only window c supervised (earlier windows
sleep, window c gets its one pass), and the GDN states after window c sleeps equal those of
`sleep_forward` over windows 0..c with none supervised.

Cache layout per attention layer: keys and values [B, C, H, K] with C = L (hard), 2L-1 (sliding:
slots [0, L-1) the retained prefix of the previous window, slots [L-1, 2L-1) the window) or the
capacity (eviction "none": the full-cache attention baseline, which never sleeps). The slot j of a
window starting at position s holds key position s - retained + j; masks come from those
positions. No shape depends on the position, so one compiled decode step serves any context
length. The B streams of a batch advance in lockstep (same position).

The CLI restores a `sleep_lm.train` workdir (its params carry a leading seed axis: --seed_index
picks the model), reads the prompt as comma-separated token ids or, for tasks with token
characters (Rule 110: '0', '1', 'Q'), as a string of them, and prints the generated tokens and the
timing. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sleep_lm.config import ModelConfig
from sleep_lm.errors import UserError
from sleep_lm.memory import check_batch_fits
from sleep_lm.model import HybridLM, PassContext, StepContext, zero_states

Array = jax.Array


class DecodeState(NamedTuple):
  """Everything a batch of streams carries from one token to the next (a pytree of arrays).

  position: [] int32, tokens consumed so far (the streams advance in lockstep).
  states: per GDN layer, S [B,H,K,V] float32.
  convs: per GDN layer, the (q, k, v) conv histories [B,kernel-1,H*K] (`GatedDeltaNet.step`).
  caches: per attention layer, (keys, values) [B,C,H,K] in the compute dtype.
  hidden: [B,L,D] float32 wake-pass features of the current window, replayed at sleep (N > 1),
    else None.
  """
  position: Array
  states: tuple
  convs: tuple
  caches: tuple
  hidden: Array | None


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """The fixed shape of a stream's cache.

  window: tokens a window holds before it sleeps and is evicted (L; the capacity for eviction
    "none", which never evicts).
  retained: keys/values kept across an eviction (L-1 for sliding, else 0), in slots [0, retained).
  sliding: queries see keys at positions (p - L, p], else only their own window's.
  """
  window: int
  retained: int
  sliding: bool
  evicts: bool

  @property
  def slots(self) -> int:
    return self.retained + self.window


def cache_layout(config: ModelConfig, capacity: int | None = None) -> CacheLayout:
  """The layout of `config`'s streams; eviction "none" needs the capacity (max tokens)."""
  if config.eviction == "none":
    if capacity is None or capacity < 1:
      raise ValueError(f"eviction='none' keeps every key: give the capacity (max tokens of a "
                       f"stream), got {capacity!r}")
    return CacheLayout(capacity, 0, False, False)
  sliding = config.eviction == "sliding"
  return CacheLayout(config.window, config.window - 1 if sliding else 0, sliding, True)


def init_state(config: ModelConfig, batch: int, capacity: int | None = None) -> DecodeState:
  """The state of `batch` fresh streams: position 0, S = 0, empty caches."""
  lay = cache_layout(config, capacity)
  dt = config.activation_dtype
  channels = config.num_gdn_heads * config.gdn_head_dim
  # A separate buffer per leaf: the state is donated, and one buffer cannot be donated twice.
  conv = lambda: jnp.zeros((batch, config.conv_kernel - 1, channels), dt)
  kv = lambda: jnp.zeros((batch, lay.slots, config.num_attn_heads, config.attn_head_dim), dt)
  hidden = (jnp.zeros((batch, lay.window, config.d_model), jnp.float32)
            if config.passes > 1 else None)
  return DecodeState(jnp.zeros((), jnp.int32), zero_states(config, batch),
                     tuple((conv(), conv(), conv()) for _ in range(config.num_gdn_layers)),
                     tuple((kv(), kv()) for _ in range(config.num_attn_layers)), hidden)


def state_bytes(state: DecodeState) -> int:
  """Bytes of a decode state: what a stream holds on the device between tokens."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


# ----------------------------------------------------------------------- the jitted functions


def _attention_mask(lay: CacheLayout, start: Array, query_pos: Array) -> Array:
  """[1,1,T,C]: which cache slots the queries at `query_pos` [T] see (window starts at start)."""
  key_pos = start - lay.retained + jnp.arange(lay.slots)
  q, k = query_pos[:, None], key_pos[None, :]
  visible = (k <= q) & (k >= 0)
  visible &= (k > q - lay.window) if lay.sliding else (k >= start)
  return visible[None, None]


def _window_context(config: ModelConfig, lay: CacheLayout, start: Array, prefix) -> PassContext:
  """The `run_pass` context of a whole window starting at `start` (as in `sleep_forward`)."""
  local = jnp.arange(lay.window)
  positions = start + local
  valid = jnp.ones((lay.window,), bool)
  if not lay.sliding:
    return PassContext(positions, local, valid, (local[None, :] <= local[:, None])[None, None])
  key_pos = jnp.concatenate([start - lay.retained + jnp.arange(lay.retained), positions])
  q, k = positions[:, None], key_pos[None, :]
  mask = (k <= q) & (k > q - lay.window) & (k >= 0)
  return PassContext(positions, local, valid, mask[None, None], prefix)


def _replay(config: ModelConfig, params, ctx: PassContext, carry):
  """Passes 2..N of `run_pass` over a window: carry (h, states, kvs) of the pass before."""
  model = HybridLM(config)

  def one(carry, _):
    return model.apply({"params": params}, carry[0], carry[1], ctx, method=HybridLM.run_pass), None

  carry, _ = jax.lax.scan(one, carry, None, length=config.passes - 1)
  return carry


def _retain(lay: CacheLayout, prefix: tuple, kvs: tuple) -> tuple:
  """Sliding eviction: the last L-1 keys/values of [prefix ; the final pass's own]."""
  keep = lay.retained
  last = lambda a, b: (x := jnp.concatenate([a, b.astype(a.dtype)], 1))[:, x.shape[1] - keep:]
  return tuple((last(pk, k), last(pv, v)) for (pk, pv), (k, v) in zip(prefix, kvs, strict=True))


def _with_prefix(lay: CacheLayout, caches: tuple, prefix: tuple) -> tuple:
  return tuple((k.at[:, :lay.retained].set(pk), v.at[:, :lay.retained].set(pv))
               for (k, v), (pk, pv) in zip(caches, prefix, strict=True))


def _logits(config: ModelConfig, params, h: Array, last_only: bool) -> Array:
  h = h[:, -1:] if last_only else h
  return HybridLM(config).apply({"params": params}, h, method=HybridLM.logits)


def _wake(config: ModelConfig, lay: CacheLayout, params, state: DecodeState, tokens: Array,
          last_only: bool = False) -> tuple[DecodeState, Array]:
  """Wake pass over T tokens [B,T] that fit in the current window: (new state, logits)."""
  model, variables = HybridLM(config), {"params": params}
  b, t = tokens.shape
  p = state.position
  offset = p % lay.window
  start = p - offset
  positions = p + jnp.arange(t)
  if config.attention_implementation == "cudnn" and not lay.evicts and t == 1:
    ctx = StepContext(positions, offset + jnp.arange(t), offset, None,
                      jnp.full((b,), p + 1, jnp.int32))        # slots [0, p] are the keys
  else:
    ctx = StepContext(positions, offset + jnp.arange(t), lay.retained + offset,
                      _attention_mask(lay, start, positions))
  h = model.apply(variables, tokens, method=HybridLM.embed)
  h, states, convs, caches = model.apply(variables, h, state.states, state.convs, state.caches,
                                         ctx, method=HybridLM.wake_step)
  hidden = state.hidden
  if hidden is not None:
    hidden = jax.lax.dynamic_update_slice(hidden, h.astype(hidden.dtype), (0, offset, 0))
  new = DecodeState(p + t, states, convs, caches, hidden)
  return new, _logits(config, params, h, last_only)


def _sleep(config: ModelConfig, lay: CacheLayout, params, state: DecodeState) -> DecodeState:
  """The window just filled: N-1 replay passes over its wake features, then eviction."""
  start = state.position - lay.window
  own = tuple((k[:, lay.retained:], v[:, lay.retained:]) for k, v in state.caches)
  prefix = tuple((k[:, :lay.retained], v[:, :lay.retained]) for k, v in state.caches)
  states, kvs = state.states, own
  if config.passes > 1:
    ctx = _window_context(config, lay, start, prefix if lay.sliding else None)
    _, states, kvs = _replay(config, params, ctx, (state.hidden, states, own))
  caches = _with_prefix(lay, state.caches, _retain(lay, prefix, kvs)) if lay.sliding else (
      state.caches)
  convs = jax.tree.map(jnp.zeros_like, state.convs)
  return state._replace(states=states, convs=convs, caches=caches)


def _prefill_windows(config: ModelConfig, lay: CacheLayout, params, state: DecodeState,
                     tokens: Array, last_only: bool = False) -> tuple[DecodeState, Array]:
  """Whole windows [B, n*L] from a window boundary, through `run_pass` as in training: the wake
  pass (its features give the logits), N-1 replays, eviction. Returns (state, logits)."""
  model, variables = HybridLM(config), {"params": params}
  b, t = tokens.shape
  n = t // lay.window
  h = model.apply(variables, tokens, method=HybridLM.embed)
  windows = jnp.swapaxes(h.reshape(b, n, lay.window, -1), 0, 1)          # [n,B,L,D]
  starts = state.position + jnp.arange(n) * lay.window
  prefix = tuple((k[:, :lay.retained], v[:, :lay.retained]) for k, v in state.caches)

  def window(carry, xs):
    states, prefix, _ = carry
    h, start = xs
    ctx = _window_context(config, lay, start, prefix if lay.sliding else None)
    wake = model.apply(variables, h, states, ctx, method=HybridLM.run_pass)
    _, states, kvs = _replay(config, params, ctx, wake) if config.passes > 1 else wake
    prefix = _retain(lay, prefix, kvs) if lay.sliding else prefix
    return (states, prefix, wake[0]), (None if last_only else wake[0])

  carry = (state.states, prefix, jnp.zeros_like(windows[0]))
  (states, prefix, last), wake_h = jax.lax.scan(window, carry, (windows, starts))
  caches = _with_prefix(lay, state.caches, prefix) if lay.sliding else state.caches
  new = DecodeState(state.position + t, states, jax.tree.map(jnp.zeros_like, state.convs),
                    caches, state.hidden)
  h = last if last_only else jnp.swapaxes(wake_h, 0, 1).reshape(b, t, -1)
  return new, _logits(config, params, h, last_only)


class Functions(NamedTuple):
  """The jitted pieces of a stream (the state argument is donated: caches update in place).

  wake(params, state, tokens [B,T], last_only) -> (state, logits [B,T or 1,V]); T = 1 is the
    decode step, compiled once for any context length.
  sleep(params, state) -> state, when the window has just filled.
  prefill(params, state, tokens [B,n*L], last_only) -> (state, logits), whole windows.
  """
  wake: Any
  sleep: Any
  prefill: Any


@functools.cache
def functions(config: ModelConfig, lay: CacheLayout) -> Functions:
  """The jitted functions of `config`'s streams with cache layout `lay` (cached)."""
  jit = functools.partial(jax.jit, donate_argnums=1, static_argnames="last_only")
  return Functions(jit(functools.partial(_wake, config, lay)),
                   jax.jit(functools.partial(_sleep, config, lay), donate_argnums=1),
                   jit(functools.partial(_prefill_windows, config, lay)))


@functools.partial(jax.jit, static_argnames=("temperature", "top_k"))
def sample(logits: Array, key: Array, *, temperature: float = 0.0, top_k: int = 0) -> Array:
  """[B,V] logits -> [B] int32 tokens: greedy (temperature 0), else softmax(logits/temperature)
  sampling, over the top_k logits only when top_k > 0 (ties with the k-th are kept)."""
  if temperature <= 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the stream


@dataclasses.dataclass
class Timings:
  """Wall times (seconds, device work included) of the calls a stream made while timed."""
  steps: list = dataclasses.field(default_factory=list)    # one-token wake steps
  sleeps: list = dataclasses.field(default_factory=list)   # sleep + eviction events
  prefill: list = dataclasses.field(default_factory=list)  # (tokens, seconds) of longer feeds


class Stream:
  """B independent streams of one model, advancing in lockstep.

    stream = Stream(config, params, batch=2)
    logits = stream.feed(prompt)                  # [B,T,V]: prefill, or teacher forcing
    tokens = stream.generate(16, logits[:, -1], temperature=0.8, top_k=2, seed=0)

  `feed` takes any number of tokens, sleeping and evicting at every window boundary it crosses;
  `generate` samples a token from the last logits, feeds it, and repeats. The host keeps the
  position (the streams' shared one) to know when a window fills; the device state is
  `self.state`. `timed=True` blocks after each call and records its wall time in `self.timings`.
  """

  def __init__(self, config: ModelConfig, params, batch: int, *, capacity: int | None = None,
               timed: bool = False):
    self.config, self.params, self.batch, self.capacity = config, params, batch, capacity
    self.layout = cache_layout(config, capacity)
    self.fns = functions(config, self.layout)
    self.state = init_state(config, batch, capacity)
    self.position = 0
    self.sleep_events = 0
    self.timed = timed
    self.timings = Timings()

  def warm_up(self, *, temperature: float = 0.0, top_k: int = 0) -> float:
    """Compiles the one-token step, the sleep and the sampler by running them once on a scratch
    state, so that the timings of the calls that follow exclude compilation; returns seconds."""
    t0 = time.perf_counter()
    scratch = init_state(self.config, self.batch, self.capacity)
    scratch, logits = self.fns.wake(self.params, scratch, jnp.zeros((self.batch, 1), jnp.int32),
                                    last_only=False)
    if self.layout.evicts:
      scratch = self.fns.sleep(self.params, scratch)
    token = sample(logits[:, -1], jax.random.key(0), temperature=float(temperature),
                   top_k=int(top_k))
    jax.block_until_ready((scratch, token))
    return time.perf_counter() - t0

  def _call(self, fn, *args, record=None, **kwargs):
    t0 = time.perf_counter()
    out = fn(self.params, *args, **kwargs)
    if self.timed:
      jax.block_until_ready(out)
      if record is not None:
        record(time.perf_counter() - t0)
    return out

  def _after(self, count: int) -> None:
    self.position += count
    if self.layout.evicts and self.position % self.layout.window == 0:
      self.state = self._call(self.fns.sleep, self.state, record=self.timings.sleeps.append)
      self.sleep_events += 1

  def feed(self, tokens, *, last_only: bool = False) -> Array:
    """Feeds tokens [B,T] (T >= 1); returns their logits [B,T,V] (the last one's [B,V] if
    last_only), each from the wake pass, as they would be produced token by token."""
    tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] != self.batch or tokens.shape[1] < 1:
      raise ValueError(f"tokens must be [B,T] with B = {self.batch} streams and T >= 1, got "
                       f"shape {tokens.shape}")
    lay, total = self.layout, tokens.shape[1]
    if not lay.evicts and self.position + total > lay.window:
      raise ValueError(f"eviction='none': {self.position} + {total} tokens exceed the "
                       f"capacity {lay.window} the stream was made with")
    # Slice on the host, then hand the device arrays to the jitted calls (a NumPy argument
    # and a device array of the same shape are separate entries of jit's cache).
    piece = lambda a, b: jnp.asarray(tokens if (a, b) == (0, total) else tokens[:, a:b])
    outs, i = [], 0
    while i < total:
      offset = self.position % lay.window
      whole = (total - i) // lay.window
      if lay.evicts and offset == 0 and whole > 0:
        chunk = piece(i, i + whole * lay.window)
        record = lambda s, n=chunk.shape[1]: self.timings.prefill.append((n, s))
        self.state, logits = self._call(self.fns.prefill, self.state, chunk, record=record,
                                        last_only=last_only)
        self.position += chunk.shape[1]
        self.sleep_events += whole
      else:
        chunk = piece(i, i + min(lay.window - offset, total - i))
        n = chunk.shape[1]
        record = (self.timings.steps.append if n == 1
                  else lambda s, n=n: self.timings.prefill.append((n, s)))
        self.state, logits = self._call(self.fns.wake, self.state, chunk, record=record,
                                        last_only=last_only and n > 1)   # one compiled step
        self._after(n)
      outs.append(logits)
      i += chunk.shape[1]
    if last_only:
      return outs[-1][:, -1]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

  def generate(self, num_tokens: int, last_logits: Array, *, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0) -> Array:
    """Samples `num_tokens` tokens per stream, feeding each one back: [B,num_tokens] int32.

    last_logits [B,V]: the logits of the last token fed (e.g. `feed(prompt)[:, -1]`). Step i
    samples with `fold_in(key(seed), i)`: the same seed gives the same tokens."""
    if num_tokens < 1:
      return jnp.zeros((self.batch, 0), jnp.int32)
    key = jax.random.key(seed)
    logits, out = last_logits, []
    for i in range(num_tokens):
      token = sample(logits, jax.random.fold_in(key, i), temperature=float(temperature),
                     top_k=int(top_k))
      out.append(token)
      logits = self.feed(token[:, None], last_only=True)
    return jnp.stack(out, axis=1)


# -------------------------------------------------------------------------------- the CLI


def load_run(path: str | Path):
  """The typed run config of a `sleep_lm.train` workdir (a UserError if it is not one)."""
  from sleep_lm import workdir
  from sleep_lm.run_config import RunConfig
  return RunConfig.checked(workdir.load_config(path))


def restore_params(path: str | Path, run, *, step: int | None = None, seed_index: int = 0):
  """(params of model `seed_index` on the first device, checkpoint step) of the workdir `path`
  holding `run` (`load_run`): newest readable checkpoint, or `step`.

  The checkpoint holds every seed's train state stacked on a leading seed axis; it is restored
  into abstract arrays on one device (no initialisation to compile), then the seed is picked.
  """
  from sleep_lm.checkpointing import Checkpointer
  from sleep_lm.training import create_train_states, make_optimizer

  path = Path(path)
  if not 0 <= seed_index < run.seeds:
    raise UserError(f"--seed_index {seed_index}: the workdir holds {run.seeds} model(s) "
                    f"(seeds {list(run.model_seeds)}); give an index in [0, {run.seeds})")
  ckpt = Checkpointer(path / "checkpoints", keep=run.keep_checkpoints, read_only=True)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f"no checkpoint in {path / 'checkpoints'}")
    if step is not None and step not in steps:
      raise UserError(f"--step {step} has no checkpoint; available steps: {steps}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: create_train_states(
        run.model, make_optimizer(run.optimizer), run.model_seeds))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract)
    state, meta = (ckpt.restore_latest(abstract) if step is None
                   else ckpt.restore(abstract, step))
  finally:
    ckpt.close()
  return jax.tree.map(lambda x: x[seed_index], state.params), int(meta["step"])


def parse_prompt(text: str, vocab_size: int, token_chars: str | None) -> list[int]:
  """Comma-separated token ids ("0,1,2"; a single id: "2,") or, when the task has token
  characters and the text has no comma, one token per character ("011Q")."""
  text = text.strip()
  if not text:
    raise UserError("--prompt is empty: give at least one token")
  if "," in text or token_chars is None:
    try:
      ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
      raise UserError(f"--prompt {text!r}: expected comma-separated token ids") from e
  else:
    unknown = sorted(set(text) - set(token_chars))
    if unknown:
      raise UserError(f"--prompt: characters {unknown} are not tokens of this task "
                      f"({dict(enumerate(token_chars))}); or give comma-separated ids")
    ids = [token_chars.index(c) for c in text]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad or not ids:
    raise UserError(f"--prompt: token ids must be in [0, {vocab_size}), got {bad or ids}")
  return ids


def format_tokens(ids: Sequence[int], token_chars: str | None) -> str:
  if token_chars is None:
    return ",".join(str(i) for i in ids)
  return "".join(token_chars[i] for i in ids)


def _ms(values: Sequence[float]) -> str:
  if not values:
    return "none"
  v = np.asarray(values) * 1e3
  return f"median {np.median(v):.3f} ms, p99 {np.percentile(v, 99):.3f} ms ({len(v)} calls)"


def generate_from_workdir(path: str | Path, prompt: str, *, max_new_tokens: int,
                          temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                          seed_index: int = 0, num_streams: int = 1, step: int | None = None,
                          log=print) -> dict:
  """The CLI's work: restores the workdir, feeds the prompt, generates; returns what it printed
  as a dict (tokens per stream, timings)."""
  if max_new_tokens < 0 or num_streams < 1 or temperature < 0 or top_k < 0:
    raise UserError(f"need --max_new_tokens >= 0, --num_streams >= 1, --temperature >= 0 and "
                    f"--top_k >= 0; got {max_new_tokens}, {num_streams}, {temperature}, {top_k}")
  run = load_run(path)
  cfg, chars = run.model, run.task.token_chars
  ids = parse_prompt(prompt, cfg.vocab_size, chars)       # user errors before the restore
  params, ckpt_step = restore_params(path, run, step=step, seed_index=seed_index)
  capacity = len(ids) + max_new_tokens if cfg.eviction == "none" else None
  check_batch_fits(lambda b: init_state(cfg, b, capacity), num_streams, what="--num_streams")
  stream = Stream(cfg, params, num_streams, capacity=capacity, timed=True)
  warm_s = stream.warm_up(temperature=temperature, top_k=top_k)
  t0 = time.perf_counter()
  logits = stream.feed(np.tile(np.asarray(ids, np.int32), (num_streams, 1)), last_only=True)
  jax.block_until_ready(logits)
  prefill_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = np.asarray(stream.generate(max_new_tokens, logits, temperature=temperature,
                                   top_k=top_k, seed=seed))
  decode_s = time.perf_counter() - t0
  log(f"workdir {path}  step {ckpt_step}  model seed {run.model_seeds[seed_index]} (index "
      f"{seed_index})  N={cfg.passes} L={cfg.window} eviction={cfg.eviction}  device "
      f"{jax.devices()[0].device_kind}")
  log(f"prompt ({len(ids)} tokens): {format_tokens(ids, chars)}")
  for b in range(num_streams):
    log(f"stream {b}: {format_tokens(out[b].tolist(), chars)}")
  log(f"compilation of the decode step, sleep and sampler: {warm_s * 1e3:.1f} ms")
  log(f"prefill: {len(ids)} tokens in {prefill_s * 1e3:.1f} ms (compilation of whole-window and "
      f"partial-window prefill included)")
  log(f"decode: {max_new_tokens} tokens in {decode_s * 1e3:.1f} ms; one-token steps "
      f"{_ms(stream.timings.steps)}; sleep events {_ms(stream.timings.sleeps)}")
  return {"step": ckpt_step, "prompt": ids, "tokens": out.tolist(), "compile_s": warm_s,
          "prefill_s": prefill_s, "decode_s": decode_s, "step_s": stream.timings.steps,
          "sleep_s": stream.timings.sleeps, "sleep_events": stream.sleep_events}


def main(argv):
  from absl import flags, logging
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)   # orbax warns about read-only checkpoint options
  f = flags.FLAGS
  generate_from_workdir(
      f.workdir, f.prompt, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
      top_k=f.top_k, seed=f.seed, seed_index=f.seed_index, num_streams=f.num_streams,
      step=f.step)
  return 0


if __name__ == "__main__":
  from absl import flags

  from sleep_lm import cli

  flags.DEFINE_string("workdir", None, "A sleep_lm.train workdir.")
  flags.DEFINE_string("prompt", None, "Comma-separated token ids, or the task's token "
                      "characters (Rule 110: 0, 1, Q).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per stream.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample from softmax(logits / T).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only (0: all).")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the sampling.")
  flags.DEFINE_integer("seed_index", 0, "Which of the workdir's models (seed axis) to use.")
  flags.DEFINE_integer("num_streams", 1, "Independent streams of the same prompt (a batch).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
  cli.define_debug_flag()
  flags.mark_flags_as_required(["workdir", "prompt"])
  cli.run(main)
