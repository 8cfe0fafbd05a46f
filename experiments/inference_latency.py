r"""Decode latency, throughput, prefill and memory against context length: the sleeping hybrid
vs a full-cache attention model of the same width and depth, both through `Stream.generate`.

  # one H200 (bf16, the 300m size), ~5 minutes, most of it compilation:
  python3 -m experiments.inference_latency --out $OUT/inference
  # CPU smoke (< 1 minute):
  python3 -m experiments.inference_latency --quick --out /tmp/inference
  # decode formulations compared (hybrid N = 1 and attention at one context), with profiles
  # (no preallocation: the XLA flag sets run in child processes that need memory too):
  XLA_PYTHON_CLIENT_PREALLOCATE=false \
  python3 -m experiments.inference_latency --out $OUT/variants --variants_only \
      --layouts rows,cols,gemm,train --loops dynamic,fixed --profile \
      --xla_flag_sets="--xla_gpu_enable_command_buffer=;\
--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"

Random weights (decode cost does not depend on training), matrices in the compute dtype; caches
and states filled with random values (never timed on zeros). Per size, at each context C (tokens
already seen; default 1K, 4K, 16K, 32K, 64K, 128K):
  - hybrid, N in --passes, eviction in --evictions: a cache of L keys per attention layer and
    the GDN states whatever C is (its position is set to C: its shapes do not depend on C, which
    is the claim; the latency is measured at every C, not assumed).
  - attention: every layer attention, eviction "none" (the whole cache), through --attention
    (cuDNN by default on a GPU: it reads only the filled part of the cache, key_value_seq_lengths;
    one compiled loop serves every C. XLA attends over the whole buffer under a mask, so its
    buffer is sized to each C.)
Measured, for each model and C:
  - latency: `Stream.generate(--tokens)` calls, wall time per token (host dispatch, the device
    loop and any sleep at a window boundary included), median / p99 over --repeats calls; and
    single-token `generate(1)` calls (the cost of one interactive token), median / p99.
  - throughput at --batch streams (tokens/s); for attention the batch is the largest that fits
    the device's free memory when --batch does not (computed from the cache size, then run).
  - prefill: a prompt of C tokens into a fresh stream (`Stream.feed`, the hybrid's sleeps
    included; attention: one causal pass), tokens/s, the second of two runs (the first compiles).
  - sleep: --sleeps sleep events timed apart; amortised per token = sleep time / L.
  - memory: decode-state bytes per stream, weights, `memory_stats()` in use and peak so far.
Derived: per hybrid N and eviction, the crossover (shortest measured C from which the hybrid's
batch-1 latency beats attention's at every longer C), the speed-ups at 32K and 128K (attention /
hybrid latency), the throughput ratio at 32K and the prefill ratio at 128K.
--profile prints the device-time table (`sleep_lm.common.profiling`) of `generate(--tokens)` per
token for the hybrid (N = 1) and attention (at 32K or the longest C below it).

Writes <out>/inference_latency.json (after each model: a run cut short keeps what it measured),
<out>/inference_latency.png and prints a table. Sizes:
  rule110: the paper's Rule 110 model (d 256, attn/gdn/attn/gdn, L = 24), float32 as trained;
  300m:    d 1024, 16 layers alternating attn/gdn, MLP 4096, vocab 32000, L = 2048, bfloat16;
  gsm_long: the long-context GSM models of experiments/long_context.py (d 256, attn/gdn/attn/
           gdn, MLP 1024, vocab 2098, L = 2048, bfloat16), at their evaluation lengths:
    python3 -m experiments.inference_latency --sizes gsm_long --contexts 8192,32768,65536 \
        --passes 1,4 --evictions hard --out $OUT/inference_long
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sleep_lm.inference.decoding import init_state, state_bytes
from sleep_lm.inference.stream import Stream
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import init_params

SIZES = {
    "rule110": dict(vocab_size=3, d_model=256, layers=("attn", "gdn") * 2, attn_head_dim=64,
                    gdn_head_dim=64, mlp_dim=1024, window=24, dtype="float32"),
    "300m": dict(vocab_size=32000, d_model=1024, layers=("attn", "gdn") * 8, attn_head_dim=64,
                 gdn_head_dim=64, mlp_dim=4096, window=2048, dtype="bfloat16"),
    # The long-context GSM models (experiments/long_context.py, issue 27) as trained on a GPU:
    # the word-level GSM vocabulary, L = 2,048, bf16.
    "gsm_long": dict(vocab_size=2098, d_model=256, layers=("attn", "gdn") * 2, attn_head_dim=64,
                     gdn_head_dim=64, mlp_dim=1024, window=2048, dtype="bfloat16"),
    "tiny": dict(vocab_size=11, d_model=32, layers=("attn", "gdn"), attn_head_dim=16,
                 gdn_head_dim=16, mlp_dim=64, window=16, dtype="float32"),
}
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768, 65536, 131072)
# Every measurement once, few compilations: batch 1 for the throughput too (the latency's
# compiled loop), one attention buffer for both contexts.
QUICK = dict(sizes="tiny", contexts="64,256", passes="1", evictions="hard", tokens=4,
             repeats=3, singles=3, batch=1, sleeps=2, attention_buffer="shared", prefill="hard")


def hybrid_config(size: str, passes: int, eviction: str) -> ModelConfig:
  return ModelConfig(**SIZES[size], passes=passes, eviction=eviction)


def attention_config(size: str, implementation: str | None) -> ModelConfig:
  """The attention-only model of the same width and depth, full cache (eviction "none")."""
  fields = dict(SIZES[size], layers=("attn",) * len(SIZES[size]["layers"]))
  return ModelConfig(**fields, eviction="none", attention_implementation=implementation)


def random_params(config: ModelConfig, seed: int = 0):
  """Random weights; matrices (and the embedding) in the compute dtype, as served."""
  params = nn.meta.unbox(jax.jit(lambda k: init_params(config, k))(jax.random.key(seed)))
  dt = config.activation_dtype
  return jax.tree.map(lambda x: x.astype(dt) if x.ndim >= 2 else x, params)


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


# In place: a batch's full cache does not fit twice. x's values are unused, so without
# keep_unused jit drops x and with it the donation: every leaf's old buffer stayed alive beside
# the new one, and attention's batch-53 cache at 32K (115 GB) never fitted (two H200 leases).
@functools.partial(jax.jit, donate_argnums=0, keep_unused=True)
def _random_leaf(x, key):
  """Random values of x's last two axes, the same at every leading index (the temporaries stay
  that small; no kernel here skips work on repeated values, only zeros could flatter one)."""
  noise = jax.random.normal(key, x.shape[-2:], jnp.float32) * 0.1
  return jnp.broadcast_to(noise.astype(x.dtype), x.shape)


def _randomized(state, key):
  """Random values in every floating leaf, one leaf per call, each written over its own
  buffer (`_random_leaf`)."""
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [_random_leaf(x, k) if jnp.issubdtype(x.dtype, jnp.floating)
                                   else x for x, k in zip(leaves, keys, strict=True)])


def place(stream: Stream, position: int, seed: int = 1) -> None:
  """The stream at `position` with random caches, states and wake features (shapes fixed)."""
  state = _randomized(stream.state, jax.random.key(seed))
  stream.state = state._replace(position=jnp.asarray(position, jnp.int32))
  stream.position = position
  jax.block_until_ready(stream.state)


def cache_bytes(config: ModelConfig, capacity: int) -> int:
  """Bytes of one full-cache stream's decode state (from shapes: nothing is allocated)."""
  shapes = jax.eval_shape(lambda: init_state(config, 1, capacity))
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def describe(e: Exception) -> str:
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def memory_stats() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
          if k in stats}


def summary(seconds) -> dict:
  ms = np.asarray(seconds) * 1e3
  return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
          "min_ms": float(ms.min()), "calls": int(ms.size)}


def wall(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def latency(stream: Stream, logits, args) -> dict:
  """Per-token wall time of `generate(--tokens)` calls and of single-token calls (after one
  untimed call of each, which compiles)."""
  wall(lambda: stream.generate(args.tokens, logits))
  per_token = [wall(lambda: stream.generate(args.tokens, logits)) / args.tokens
               for _ in range(args.repeats)]
  wall(lambda: stream.generate(1, logits))
  single = [wall(lambda: stream.generate(1, logits)) for _ in range(args.singles)]
  return {**summary(per_token), "single_token": summary(single)}


THROUGHPUT_CALLS = 3


def throughput(stream: Stream, logits, args) -> dict:
  """Tokens per second of `batch` streams generating --tokens each (median of 3 calls, after
  one untimed)."""
  wall(lambda: stream.generate(args.tokens, logits))
  times = [wall(lambda: stream.generate(args.tokens, logits)) for _ in range(THROUGHPUT_CALLS)]
  return {"batch": stream.batch, "tokens_per_s": stream.batch * args.tokens / float(
      np.median(times)), **summary(times)}


def prefill(make_stream, context: int, vocab: int) -> dict:
  """Tokens per second of feeding a C-token prompt to a fresh stream (second of two runs)."""
  prompt = jnp.asarray(np.random.default_rng(context).integers(0, vocab, (1, context)),
                       jnp.int32)
  seconds = []
  for _ in range(2):
    stream = make_stream()
    seconds.append(wall(lambda s=stream: s.feed(prompt, last_only=True)))
    del stream
  return {"seconds": seconds[-1], "compile_and_run_s": seconds[0],
          "tokens_per_s": context / seconds[-1]}


def profile(stream: Stream, logits, args, log) -> dict:
  from sleep_lm.common.profiling import device_time_table, format_table
  with tempfile.TemporaryDirectory() as log_dir:
    table = device_time_table(lambda: stream.generate(args.tokens, logits), calls=3,
                              log_dir=log_dir)
  log(format_table(table))
  log(f"  = {table['total_ms_per_call'] / args.tokens:.4f} ms of device time per token "
      f"(generate({args.tokens}) per call above)")
  return {"tokens_per_call": args.tokens, **table}


def wants_throughput(context: int, args) -> bool:
  """Whether throughput and prefill are measured at this context (--throughput_contexts)."""
  return not args.throughput_contexts or context in args.throughput_contexts


def max_batch(per_stream_bytes: int, want: int, margin: float = 0.85) -> int:
  """The most streams whose decode state fits the device's free memory (want, when the device
  does not report its memory)."""
  stats = memory_stats()
  if "bytes_limit" not in stats:
    return want
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return max(0, min(want, int(free * margin // per_stream_bytes)))


def bench_hybrid(size, passes, eviction, params, contexts, args, log, layout=None,
                 loop=None, only=None) -> dict:
  """One hybrid configuration: latency, throughput, prefill, sleep and memory per context."""
  cfg = hybrid_config(size, passes, eviction)
  layout, loop = layout or args.layouts[0], loop or args.loops[0]
  key = jax.random.key(3)
  out = {"passes": passes, "eviction": eviction, "window": cfg.window, "layout": layout,
         "loop": loop, "points": []}
  stream = Stream(cfg, params, 1, layout=layout, loop=loop)
  stream.warm_up()
  logits = jax.random.normal(key, (1, cfg.vocab_size))
  out["state_bytes"] = state_bytes(stream.state)
  for context in contexts:
    place(stream, context)
    point = {"context": context, **latency(stream, logits, args)}
    out["points"].append(point)
    log(f"  hybrid N={passes} {eviction} C={context:>6}: {point['median_ms']:.4f} / "
        f"{point['p99_ms']:.4f} ms per token (generate({args.tokens})); one token "
        f"{point['single_token']['median_ms']:.3f} ms")
  if args.profile and (only or (passes, eviction) == (1, args.evictions[0])):
    place(stream, contexts[-1])
    log(f"  profile: hybrid N={passes} {eviction} at C={stream.position}")
    out["profile"] = profile(stream, logits, args, log)
  if only == "latency":
    return out
  place(stream, cfg.window)         # a full window: sleep from here (once untimed: compiles)
  seconds = []
  for _ in range(args.sleeps + 1):
    t0 = time.perf_counter()
    stream.state = jax.block_until_ready(stream.fns.sleep(stream.params, stream.state))
    seconds.append(time.perf_counter() - t0)
  out["sleep"] = summary(seconds[1:])
  out["amortized_sleep_ms_per_token"] = out["sleep"]["median_ms"] / cfg.window
  out["memory"] = memory_stats()
  del stream
  gc.collect()

  many = Stream(cfg, params, args.batch, layout=layout, loop=loop)
  # The sleep is compiled only if a window fills during the measurement.
  batch_points = [p for p in out["points"] if wants_throughput(p["context"], args)]
  many.warm_up(sleep=any(p["context"] % cfg.window + args.tokens * (THROUGHPUT_CALLS + 1)
                         >= cfg.window for p in batch_points))
  logits = jax.random.normal(key, (args.batch, cfg.vocab_size))
  for point in batch_points:
    place(many, point["context"])
    point["throughput"] = throughput(many, logits, args)
  out["memory_batch"] = memory_stats()
  del many
  gc.collect()
  if eviction in args.prefill_evictions:
    for point in batch_points:
      point["prefill"] = prefill(lambda: Stream(cfg, params, 1, layout=layout, loop=loop),
                                 point["context"], cfg.vocab_size)
  medians = [p["median_ms"] for p in out["points"]]
  out["flat_ratio"] = medians[-1] / medians[0]     # latency at the longest / shortest context
  log(f"  hybrid N={passes} {eviction}: sleep {out['sleep']['median_ms']:.3f} ms per event, "
      f"{out['amortized_sleep_ms_per_token'] * 1e3:.3f} us per token over L = {cfg.window}; "
      f"flat ratio {out['flat_ratio']:.3f}; batch {args.batch}: "
      + ", ".join(f"{p['throughput']['tokens_per_s']:.0f}" for p in batch_points) + " tok/s")
  return out


def bench_attention(size, implementation, params, contexts, args, log, layout=None,
                    loop=None, only=None, progress=lambda out: None) -> dict:
  """The full-cache attention model: latency, throughput (largest batch that fits), prefill.
  `progress(out)` after each measurement, so that a run cut short keeps what it measured."""
  layout, loop = layout or args.layouts[0], loop or args.loops[0]
  cfg = attention_config(size, None if implementation == "xla" else implementation)
  key = jax.random.key(4)
  room = args.tokens * (args.repeats + 1) + args.singles + 1
  capacity = lambda c: -(-(c + room) // 128) * 128      # kinder to cuDNN's tiling
  out = {"implementation": implementation, "layout": layout, "loop": loop,
         "points": []}
  logits = jax.random.normal(key, (1, cfg.vocab_size))
  # cuDNN reads only the filled slots: one buffer (and one compiled loop) serves every context;
  # XLA attends over the whole buffer, so by default it gets one sized to each context.
  shared = (args.attention_buffer or ("shared" if implementation == "cudnn" else "per_context")
            ) == "shared"
  stream = None
  for context in contexts:
    try:
      if stream is None or not shared:
        stream = Stream(cfg, params, 1, capacity=capacity(max(contexts) if shared else context),
                        layout=layout, loop=loop)
      place(stream, context)
      point = {"context": context, **latency(stream, logits, args),
               "state_bytes": cache_bytes(cfg, capacity(context))}
    except Exception as e:  # noqa: BLE001 - out of memory or unsupported: record, go on
      point = {"context": context, "error": describe(e)}
      stream = None
      gc.collect()
    out["points"].append(point)
    progress(out)
    log(f"  attention ({out['implementation']}) C={context:>6}: "
        + (f"{point['median_ms']:.4f} / {point['p99_ms']:.4f} ms per token; one token "
           f"{point['single_token']['median_ms']:.3f} ms" if "error" not in point
           else point["error"]))
  if args.profile and stream is not None and (only or implementation == args.attention[0]):
    probe = max([c for c in contexts if c <= 32768] or contexts[:1]) if shared else (
        contexts[-1])
    place(stream, probe)
    log(f"  profile: attention ({out['implementation']}) at C={probe}")
    out["profile"] = profile(stream, logits, args, log)
  if only == "latency":
    return out
  out["memory"] = memory_stats()
  if not (shared and args.batch == 1):      # else the batch-1 stream serves the throughput too
    del stream
    stream = None
  gc.collect()

  for point in out["points"]:
    if "error" in point or not wants_throughput(point["context"], args):
      continue
    context = point["context"]
    per_stream = cache_bytes(cfg, capacity(context))
    batch = max_batch(per_stream, args.batch)
    point["max_batch"] = batch
    point["throughput"] = {"batch": batch, "error": "no stream's cache fits the free memory"}
    # The estimate leaves room for the loop's temporaries; where it is still too many, halve.
    while batch:
      point["max_batch"] = batch
      try:
        many = stream or Stream(cfg, params, batch, capacity=capacity(context), layout=layout,
                                loop=loop)
        place(many, context)
        point["throughput"] = throughput(many, jax.random.normal(key, (batch, cfg.vocab_size)),
                                         args)
        point["memory_batch"] = memory_stats()
        break
      except Exception as e:  # noqa: BLE001
        point["throughput"] = {"batch": batch, "error": describe(e)}
        if "RESOURCE_EXHAUSTED" not in str(e) or stream is not None:
          break
        point.setdefault("out_of_memory_at", []).append(batch)
        batch //= 2
      finally:
        many = None
        gc.collect()
    gc.collect()
    if "attention" in args.prefill_evictions:
      try:
        point["prefill"] = prefill(lambda c=context: Stream(cfg, params, 1, capacity=c,
                                                            layout=layout, loop=loop),
                                   context, cfg.vocab_size)
      except Exception as e:  # noqa: BLE001
        point["prefill"] = {"error": describe(e)}
      gc.collect()
    log(f"  attention ({out['implementation']}) C={context:>6}: batch {batch}: "
        f"{point['throughput'].get('tokens_per_s', float('nan')):.0f} tok/s; prefill "
        f"{point.get('prefill', {}).get('tokens_per_s', float('nan')):.0f} tok/s")
    progress(out)
  return out


def _at(points, context, *keys):
  for p in points:
    if p["context"] == context:
      value = p
      for k in keys:
        value = value.get(k, {}) if isinstance(value, dict) else {}
      return value if isinstance(value, (int, float)) else None
  return None


def comparison(hybrid: dict, attention: dict) -> dict:
  """Crossover and speed-ups of one hybrid configuration against one attention baseline."""
  base = {p["context"]: p["median_ms"] for p in attention["points"] if "median_ms" in p}
  faster = [(p["context"], p["median_ms"] < base[p["context"]])
            for p in hybrid["points"] if p["context"] in base]
  crossover = None
  for context, wins in reversed(faster):
    if not wins:
      break
    crossover = context
  out = {"crossover": crossover}
  for c in (32768, 131072):
    h, a = _at(hybrid["points"], c, "median_ms"), _at(attention["points"], c, "median_ms")
    out[f"latency_speedup_{c // 1024}k"] = a / h if h and a else None
    h = _at(hybrid["points"], c, "throughput", "tokens_per_s")
    a = _at(attention["points"], c, "throughput", "tokens_per_s")
    out[f"throughput_ratio_{c // 1024}k"] = h / a if h and a else None
    h = _at(hybrid["points"], c, "prefill", "tokens_per_s")
    a = _at(attention["points"], c, "prefill", "tokens_per_s")
    out[f"prefill_ratio_{c // 1024}k"] = h / a if h and a else None
  return out


def bench_size(size, args, log, checkpoint) -> dict:
  base = hybrid_config(size, 1, "hard")
  hybrid_params = random_params(base)
  attention_params = random_params(attention_config(size, None))
  entry = {"model": {**SIZES[size], "layers": list(SIZES[size]["layers"])},
           "hybrid_params": count_params(hybrid_params),
           "hybrid_params_bytes": tree_bytes(hybrid_params),
           "attention_params": count_params(attention_params),
           "attention_params_bytes": tree_bytes(attention_params),
           "hybrid": {}, "attention": {}, "variants": []}
  contexts = args.contexts

  if len(args.layouts) > 1 or len(args.loops) > 1 or args.variants_only:
    probe = [c for c in contexts if c <= 32768][-1:] or contexts[:1]
    for layout in args.layouts:
      for loop in args.loops:
        log(f"{size} variant layout={layout} loop={loop}")
        row = {"layout": layout, "loop": loop}
        models = [("hybrid", bench_hybrid, hybrid_params, (1, "hard"))]
        if args.attention:
          models.append(("attention", bench_attention, attention_params, (args.attention[0],)))
        for name, fn, params, spec in models:
          try:
            row[name] = fn(size, *spec, params, probe, args, log, layout=layout, loop=loop,
                           only="latency")
          except Exception as e:  # noqa: BLE001 - one formulation failing is a result
            row[name] = {"error": describe(e)}
            log(f"  {name}: {describe(e)}")
          gc.collect()
        entry["variants"].append(row)
        checkpoint(size, entry)
    if args.variants_only:
      return entry

  for eviction in args.evictions:
    for n in args.passes:
      name = f"N{n}_{eviction}"
      try:
        entry["hybrid"][name] = bench_hybrid(size, n, eviction, hybrid_params, contexts, args,
                                             log)
      except Exception as e:  # noqa: BLE001 - record it, measure the rest
        entry["hybrid"][name] = {"error": describe(e)}
        log(f"  hybrid {name}: {describe(e)}")
      gc.collect()
      checkpoint(size, entry)
  implementations = list(args.attention)
  for impl in implementations:
    def progress(out, impl=impl):
      entry["attention"][impl] = out
      checkpoint(size, entry)
    try:
      entry["attention"][impl] = bench_attention(size, impl, attention_params, contexts, args,
                                                 log, progress=progress)
    except Exception as e:  # noqa: BLE001
      entry["attention"][impl] = {"error": describe(e)}
      log(f"  attention {impl}: {describe(e)}")
    gc.collect()
    checkpoint(size, entry)
    measured = any("median_ms" in p for p in entry["attention"][impl].get("points", []))
    if impl == "cudnn" and not measured and "xla" not in implementations:
      log("  cuDNN attention measured nothing: the XLA baseline instead")
      implementations.append("xla")
  entry["comparison"] = {h: {a: comparison(hv, av) for a, av in entry["attention"].items()
                             if "points" in av}
                         for h, hv in entry["hybrid"].items() if "points" in hv}
  return entry


def run(args, log=print, checkpoint=None) -> dict:
  device = jax.devices()[0]
  result = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "command": " ".join(sys.argv), "args": {k: v for k, v in vars(args).items()},
            "contexts": args.contexts, "sizes": {}}

  def save(size, entry):
    result["sizes"][size] = entry
    if checkpoint is not None:
      checkpoint(result)

  for size in args.sizes:
    log(f"{size}: {SIZES[size]}")
    save(size, bench_size(size, args, log, save))
  if args.xla_flag_sets:
    result["xla_flag_sets"] = []
    for flags in args.xla_flag_sets:
      log(f"XLA_FLAGS={flags!r}: the variant table in a process of its own")
      result["xla_flag_sets"].append({"xla_flags": flags, **variants_with_flags(flags, args)})
      if checkpoint is not None:
        checkpoint(result)
  return result


def variants_with_flags(flags: str, args) -> dict:
  """The variant table (--variants_only) of the first layout and every loop, run by a child
  process with XLA_FLAGS = flags (XLA reads its flags once per process)."""
  out = Path(args.out) / f"xla_flags_{zlib.crc32(flags.encode()):08x}"
  probe = [c for c in args.contexts if c <= 32768][-1:] or args.contexts[:1]
  cmd = [sys.executable, "-m", "experiments.inference_latency", "--variants_only",
         "--out", str(out), "--sizes", ",".join(args.sizes),
         "--contexts", ",".join(map(str, probe)), "--layouts", args.layouts[0],
         "--loops", ",".join(args.loops), "--attention", ",".join(args.attention),
         "--tokens", str(args.tokens), "--repeats", str(args.repeats),
         "--singles", str(args.singles)] + (["--profile"] if args.profile else [])
  # The parent still holds its device memory: the child allocates as it goes.
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  try:
    subprocess.run(cmd, env=env, check=True, timeout=args.xla_flag_timeout)
    sub = json.loads((out / "inference_latency.json").read_text())
  except (subprocess.SubprocessError, OSError, ValueError) as e:
    return {"error": describe(e)}
  return {"variants": {size: entry.get("variants", []) for size, entry in sub["sizes"].items()}}


def _cell(value, fmt):
  return format(value, fmt) if isinstance(value, (int, float)) else "-"


def table(result: dict) -> str:
  a = result["args"]
  lines = [f"device {result['device']} ({result['platform']}); per-token latency of "
           f"generate({a['tokens']}) median / p99 ms (batch 1), throughput tok/s at batch "
           f"{a['batch']}, prefill tok/s"]
  for size, entry in result["sizes"].items():
    lines.append(f"\n{size}: hybrid {entry['hybrid_params'] / 1e6:.3g}M params, attention-only "
                 f"{entry['attention_params'] / 1e6:.3g}M")
    rows = [(row, "") for row in entry.get("variants", [])]
    rows += [(row, f" XLA_FLAGS={f['xla_flags']!r}") for f in result.get("xla_flag_sets", [])
             for row in f.get("variants", {}).get(size, [])]
    for row, flags in rows:
      cells = []
      for name in [n for n in ("hybrid", "attention") if n in row]:
        points = row[name].get("points", [])
        cells.append(f"{name} " + (", ".join(f"C={p['context']}: {p['median_ms']:.4f}" for p in
                                             points if "median_ms" in p) or "error"))
      lines.append(f"variant layout={row['layout']} loop={row['loop']}{flags}: "
                   + "; ".join(cells))
    columns = [(f"hybrid {k}", v) for k, v in entry["hybrid"].items() if "points" in v]
    columns += [(f"attn {k}", v) for k, v in entry["attention"].items() if "points" in v]
    if not columns:
      continue
    lines.append("context  " + "".join(f"{name:>34}" for name, _ in columns))
    for context in result["contexts"]:
      cells = []
      for _, v in columns:
        p = next((p for p in v["points"] if p["context"] == context), {})
        if "median_ms" not in p:
          cells.append(f"{'-':>33}")
          continue
        tput = p.get("throughput", {}).get("tokens_per_s")
        pre = p.get("prefill", {}).get("tokens_per_s")
        cells.append(f"{p['median_ms']:7.4f}/{p['p99_ms']:7.4f} {_cell(tput, '8.0f')} "
                     f"{_cell(pre, '8.0f')}")
      lines.append(f"{context:>7}  " + "".join(f"{c:>34}" for c in cells))
    for name, h in entry["hybrid"].items():
      if "points" not in h:
        lines.append(f"hybrid {name}: {h.get('error')}")
        continue
      lines.append(f"hybrid {name}: sleep {h['sleep']['median_ms']:.3f} ms per event (L = "
                   f"{h['window']}), {h['amortized_sleep_ms_per_token'] * 1e3:.3f} us/token "
                   f"amortised; state {h['state_bytes'] / 2**20:.2f} MiB per stream; flat "
                   f"ratio {h['flat_ratio']:.3f}")
      for impl, c in entry.get("comparison", {}).get(name, {}).items():
        lines.append(f"  vs attention {impl}: crossover {c['crossover']}; " + ", ".join(
            f"{k} {_cell(v, '.2f')}" for k, v in c.items() if k != "crossover"))
    for name, v in entry["attention"].items():
      batches = [p.get("max_batch") for p in v.get("points", [])]
      lines.append(f"attention {name}: largest batch that fits (<= {a['batch']}) per context: "
                   f"{batches}")
  return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sizes = [s for s, e in result["sizes"].items() if e["hybrid"] or e["attention"]]
  if not sizes:
    return
  fig, axes = plt.subplots(3, len(sizes), figsize=(6.5 * len(sizes), 11), squeeze=False)
  for col, size in enumerate(sizes):
    entry = result["sizes"][size]
    series = [(f"hybrid {k} (L={v['window']})", "-", v) for k, v in entry["hybrid"].items()
              if "points" in v]
    series += [(f"attention, full cache ({k})", "--", v) for k, v in entry["attention"].items()
               if "points" in v]
    lat, tput, pre = axes[0][col], axes[1][col], axes[2][col]
    for label, style, s in series:
      pts = [p for p in s["points"] if "median_ms" in p]
      if not pts:
        continue
      x = [p["context"] for p in pts]
      line, = lat.plot(x, [p["median_ms"] for p in pts], style, marker="o", label=label)
      lat.plot(x, [p["p99_ms"] for p in pts], style, color=line.get_color(), alpha=0.35)
      t = [(p["context"], p["throughput"]["tokens_per_s"]) for p in pts
           if "tokens_per_s" in p.get("throughput", {})]
      if t:
        tput.plot(*zip(*t, strict=True), style, marker="o", color=line.get_color(),
                  label=label)
      f = [(p["context"], p["prefill"]["tokens_per_s"]) for p in pts
           if "tokens_per_s" in p.get("prefill", {})]
      if f:
        pre.plot(*zip(*f, strict=True), style, marker="o", color=line.get_color(), label=label)
    for ax, ylabel in ((lat, "ms / token, batch 1 (median; faint: p99)"),
                       (tput, f"tokens / s, batch <= {result['args']['batch']}"),
                       (pre, "prefill tokens / s")):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("context length (tokens)")
      ax.set_ylabel(ylabel)
      ax.grid(True, which="both", alpha=0.3)
    lat.set_title(f"{size}: {entry['hybrid_params'] / 1e6:.3g}M params, {result['device']}")
    lat.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _list(kind):
  return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for the JSON and the PNG")
  parser.add_argument("--quick", action="store_true",
                      help=f"tiny CPU smoke run: {QUICK} (flags given explicitly still win)")
  parser.add_argument("--sizes", default="300m", help=f"comma-separated {list(SIZES)}")
  parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
  parser.add_argument("--throughput_contexts", default="",
                      help="contexts at which throughput and prefill are measured (default: "
                           "every context; latency is always measured at every context)")
  parser.add_argument("--passes", default="1,2,4", help="hybrid N values")
  parser.add_argument("--evictions", default="hard,sliding", help="hybrid eviction variants")
  parser.add_argument("--prefill", default="hard,attention", dest="prefill_evictions",
                      help="which models' prefill to time: hybrid evictions and/or 'attention'")
  parser.add_argument("--attention", default=None,
                      help="attention implementations, comma-separated from xla, cudnn, or "
                           "none (default: cudnn on a GPU for bfloat16 models, else xla)")
  parser.add_argument("--attention_buffer", default=None, choices=("shared", "per_context"),
                      help="attention's batch-1 cache: one for every context, or one sized to "
                           "each (default: shared for cudnn, which reads only the filled part)")
  parser.add_argument("--layouts", default="rows",
                      help="decode parameter layouts (sleep_lm.model.layers.LAYOUTS); several: the "
                           "first is measured in full, all of them in the variant table")
  parser.add_argument("--loops", default="dynamic", help="generation loops: dynamic, fixed")
  parser.add_argument("--variants_only", action="store_true",
                      help="only the variant table (and --profile of each variant)")
  parser.add_argument("--xla_flag_sets", default=None,
                      help="';'-separated XLA_FLAGS values: the variant table again in a child "
                           "process under each (give it as --xla_flag_sets='--xla_...=...;...')")
  parser.add_argument("--xla_flag_timeout", type=int, default=300,
                      help="seconds each --xla_flag_sets child may take")
  parser.add_argument("--batch", type=int, default=64, help="streams for the throughput")
  parser.add_argument("--tokens", type=int, default=32, help="tokens per generate call")
  parser.add_argument("--repeats", type=int, default=10, help="timed generate calls per point")
  parser.add_argument("--singles", type=int, default=10, help="timed generate(1) calls")
  parser.add_argument("--sleeps", type=int, default=5, help="timed sleep events per model")
  parser.add_argument("--profile", action="store_true",
                      help="print the device-time table of the decode loop")
  parser.add_argument("--plot_from", default=None,
                      help="only redraw the plot (and table) of this JSON into --out")
  args = parser.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.plot_from:
    result = json.loads(Path(args.plot_from).read_text())
    plot(result, out / "inference_latency.png")
    print(table(result))
    return result
  if args.quick:
    given = {a.split("=")[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:])}
    for key, value in QUICK.items():
      if key not in given:
        setattr(args, "prefill_evictions" if key == "prefill" else key, value)
  for name, kind in (("sizes", str), ("contexts", int), ("throughput_contexts", int),
                     ("passes", int), ("evictions", str),
                     ("prefill_evictions", str), ("layouts", str), ("loops", str)):
    setattr(args, name, _list(kind)(getattr(args, name)))
  args.xla_flag_sets = [f for f in (args.xla_flag_sets or "").split(";") if f.strip()]
  stray = sorted(set(args.throughput_contexts) - set(args.contexts))
  if stray:
    parser.error(f"--throughput_contexts: {stray} not in --contexts {args.contexts}")
  unknown = sorted(set(args.sizes) - set(SIZES))
  if unknown:
    parser.error(f"--sizes: unknown {unknown}; allowed: {sorted(SIZES)}")
  if args.attention is None:
    gpu = jax.devices()[0].platform == "gpu"
    args.attention = "cudnn" if gpu and all(SIZES[s]["dtype"] == "bfloat16"
                                            for s in args.sizes) else "xla"
  args.attention = [a for a in _list(str)(args.attention) if a != "none"]
  bad = sorted(set(args.attention) - {"xla", "cudnn"})
  if bad:
    parser.error(f"--attention: unknown {bad}; allowed: xla, cudnn, or none")
  write = lambda result: (out / "inference_latency.json").write_text(
      json.dumps({**result, "quick": args.quick}, indent=2, default=str))
  start = time.perf_counter()
  log = lambda line: print(f"[{time.perf_counter() - start:6.1f} s] {line}", flush=True)
  result = run(args, log=log, checkpoint=write)
  result["quick"] = args.quick
  write(result)
  print(table(result))
  try:
    plot(result, out / "inference_latency.png")
  except ImportError as e:     # the GPU machine may lack matplotlib: plot later, elsewhere
    print(f"no plot ({e}); redraw with --plot_from {out / 'inference_latency.json'}")
  print(f"wrote {out / 'inference_latency.json'} (and the PNG beside it)")
  return result


if __name__ == "__main__":
  main()
