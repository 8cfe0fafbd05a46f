r"""Decode latency and memory against context length: the sleeping hybrid vs full-cache attention.

  python3 -m experiments.inference_latency --out $OUT/inference            # GPU, ~5 minutes
  python3 -m experiments.inference_latency --quick --out /tmp/inference     # CPU smoke, < 1 min

For each model size (random weights: latency does not depend on training), at each context
length C (default 1K, 4K, 16K, 32K, 64K, 128K tokens already seen), it times the jitted one-token
decode step (`sleep_lm.generate`: forward of one token per stream, cache/state update, logits):
  - the hybrid at N = 1, 2, 4 (hard eviction by default): a cache of L tokens per attention layer
    and the GDN states, whatever C is. Its decode state is set to position C directly (its shapes
    do not depend on C, which is the claim; the latency is measured at every C, not assumed).
    Sleep events (N-1 passes over the window, then eviction) are timed on their own, and the
    amortised sleep cost per token is sleep time / L.
  - the attention-only model of the same width and depth with a full KV cache: the cache is
    preallocated to C + the steps measured, filled with random keys/values (prefilling C tokens
    would cost far more than the measurement), masked by position; one compiled step per C.
    With --cudnn (default: on GPUs, for bfloat16 models), again with cuDNN's attention
    (`jax.nn.dot_product_attention(implementation="cudnn")`, keys limited by
    key_value_seq_lengths instead of a mask); a failure is recorded, not fatal.
Every timed step is one call of the compiled step followed by `block_until_ready` (host dispatch
included, as in a serving loop), after warm-up; medians and 99th percentiles over --steps calls.
Memory: bytes of the decode state (what a stream holds between tokens), bytes of the weights, the
compiled step's temporary buffers (XLA memory analysis) and, where the device reports them,
`memory_stats()` bytes in use after the measurement and the process's peak so far.

Writes <out>/inference_latency.json and <out>/inference_latency.png and prints a table. Sizes:
  rule110: the paper's Rule 110 model (d 256, attn/gdn/attn/gdn, L = 24), float32 as trained;
  300m:    d 1024, 16 layers alternating attn/gdn, MLP 4096, vocab 32000, L = 2048, bfloat16
           (~0.3B parameters; weights cast to bfloat16 for inference, both models alike).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sleep_lm.config import ModelConfig
from sleep_lm.generate import cache_layout, functions, init_state, state_bytes
from sleep_lm.model import init_params

SIZES = {
    "rule110": dict(vocab_size=3, d_model=256, layers=("attn", "gdn") * 2, attn_head_dim=64,
                    gdn_head_dim=64, mlp_dim=1024, window=24, dtype="float32"),
    "300m": dict(vocab_size=32000, d_model=1024, layers=("attn", "gdn") * 8, attn_head_dim=64,
                 gdn_head_dim=64, mlp_dim=4096, window=2048, dtype="bfloat16"),
    "tiny": dict(vocab_size=11, d_model=32, layers=("attn", "gdn"), attn_head_dim=16,
                 gdn_head_dim=16, mlp_dim=64, window=16, dtype="float32"),
}
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768, 65536, 131072)
QUICK = dict(sizes="tiny", contexts="64,256", passes="1,2", steps=8, warmup=2, sleeps=3)


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


def randomize_caches(state, key):
  """The state with random keys/values in every cache slot (nothing data-dependent is timed)."""
  keys = iter(jax.random.split(key, 2 * max(len(state.caches), 1)))
  fill = jax.jit(lambda k, x: jax.random.normal(k, x.shape, x.dtype), donate_argnums=1)
  caches = tuple((fill(next(keys), k), fill(next(keys), v)) for k, v in state.caches)
  return state._replace(caches=caches)


def describe(e: Exception) -> str:
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def memory_stats() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def summary(times_s) -> dict:
  ms = np.asarray(times_s) * 1e3
  return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
          "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "calls": int(ms.size)}


def compile_step(fn, *args):
  """AOT-compiles fn(*args): (compiled, seconds, temporary bytes of the executable)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t0
  try:
    analysis = compiled.memory_analysis()
    temp = int(analysis.temp_size_in_bytes) if analysis is not None else None
  except Exception:  # noqa: BLE001 - not every backend analyses memory
    temp = None
  return compiled, seconds, temp


def time_decode(step, params, state, tokens, *, warmup: int, steps: int, window: int | None,
                sleep=None):
  """Times `steps` one-token decode calls from `state` (after `warmup` untimed ones); a stream
  that evicts sleeps when its window fills (untimed here: sleep events are timed apart).
  Returns (per-call seconds, final state, sleep events)."""
  position = int(state.position)
  times, sleeps = [], 0
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, logits = step(params, state, tokens)
    logits.block_until_ready()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    position += 1
    if window is not None and position % window == 0:
      state = sleep(params, state)
      sleeps += 1
  jax.block_until_ready(state)
  return times, state, sleeps


def time_sleep(sleep, params, state, *, warmup: int, calls: int):
  times = []
  for i in range(warmup + calls):
    t0 = time.perf_counter()
    state = sleep(params, state)
    jax.block_until_ready(state)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times, state


def bench_hybrid(size, passes, eviction, params, contexts, args, log) -> dict:
  cfg = hybrid_config(size, passes, eviction)
  lay = cache_layout(cfg)
  fns = functions(cfg, lay)
  tokens = jnp.zeros((args.batch, 1), jnp.int32)
  state = randomize_caches(init_state(cfg, args.batch), jax.random.key(1))
  step, compile_s, temp = compile_step(fns.wake, params, state, tokens)
  sleep, sleep_compile_s, sleep_temp = compile_step(fns.sleep, params, state)
  out = {"passes": passes, "eviction": eviction, "window": cfg.window,
         "state_bytes": state_bytes(state), "step_compile_s": compile_s,
         "step_temp_bytes": temp, "sleep_compile_s": sleep_compile_s,
         "sleep_temp_bytes": sleep_temp, "points": []}
  for context in contexts:
    state = state._replace(position=jnp.asarray(context, jnp.int32))
    times, state, sleeps = time_decode(step, params, state, tokens, warmup=args.warmup,
                                       steps=args.steps, window=cfg.window, sleep=sleep)
    point = {"context": context, **summary(times), "sleep_events": sleeps, **memory_stats()}
    out["points"].append(point)
    log(f"  {size} hybrid N={passes} C={context:>6}: median {point['median_ms']:.4f} ms, "
        f"p99 {point['p99_ms']:.4f} ms")
  state = state._replace(position=jnp.asarray(cfg.window, jnp.int32))
  times, state = time_sleep(sleep, params, state, warmup=2, calls=args.sleeps)
  out["sleep"] = summary(times)
  out["amortized_sleep_ms_per_token"] = out["sleep"]["median_ms"] / cfg.window
  medians = [p["median_ms"] for p in out["points"]]
  out["flat_ratio"] = medians[-1] / medians[0]     # latency at the longest / shortest context
  log(f"  {size} hybrid N={passes}: sleep {out['sleep']['median_ms']:.3f} ms per event, "
      f"{out['amortized_sleep_ms_per_token'] * 1e3:.3f} us per token amortised over L = "
      f"{cfg.window}; flat ratio {out['flat_ratio']:.3f}")
  del state
  return out


def bench_attention(size, implementation, params, contexts, args, log) -> dict:
  out = {"implementation": implementation or "xla", "points": []}
  tokens = jnp.zeros((args.batch, 1), jnp.int32)
  for context in contexts:
    cfg = attention_config(size, implementation)
    # Room for the measured steps, rounded up to a multiple of 128 (kinder to cuDNN's tiling).
    capacity = -(-(context + args.warmup + args.steps + 1) // 128) * 128
    fns = functions(cfg, cache_layout(cfg, capacity))
    try:
      state = randomize_caches(init_state(cfg, args.batch, capacity), jax.random.key(2))
      state = state._replace(position=jnp.asarray(context, jnp.int32))
      step, compile_s, temp = compile_step(fns.wake, params, state, tokens)
      times, state, _ = time_decode(step, params, state, tokens, warmup=args.warmup,
                                    steps=args.steps, window=None)
    except Exception as e:  # noqa: BLE001 - out of memory or unsupported: record, go on
      message = describe(e)
      out["points"].append({"context": context, "error": message})
      log(f"  {size} attention ({out['implementation']}) C={context:>6}: {message}")
      state = None
      gc.collect()
      continue
    point = {"context": context, "capacity": capacity, **summary(times),
             "state_bytes": state_bytes(state), "step_compile_s": compile_s,
             "step_temp_bytes": temp, **memory_stats()}
    out["points"].append(point)
    log(f"  {size} attention ({out['implementation']}) C={context:>6}: median "
        f"{point['median_ms']:.4f} ms, p99 {point['p99_ms']:.4f} ms, cache "
        f"{point['state_bytes'] / 2**20:.1f} MiB")
    del state, step
    gc.collect()
  return out


def crossover(hybrid: dict, attention: dict, *, amortized: bool) -> int | None:
  """The shortest measured context from which on the hybrid decodes faster per token than the
  attention model (at every longer measured context too); None if it never does."""
  extra = hybrid["amortized_sleep_ms_per_token"] if amortized else 0.0
  base = {p["context"]: p["median_ms"] for p in attention["points"] if "median_ms" in p}
  faster = [(p["context"], p["median_ms"] + extra < base[p["context"]])
            for p in hybrid["points"] if p["context"] in base]
  found = None
  for context, wins in reversed(faster):
    if not wins:
      break
    found = context
  return found


def run(args, log=print, checkpoint=None) -> dict:
  contexts = [int(c) for c in args.contexts.split(",")]
  passes = [int(n) for n in args.passes.split(",")]
  device = jax.devices()[0]
  result = {"device": device.device_kind, "platform": device.platform,
            "jax": jax.__version__, "command": " ".join(sys.argv), "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup, "sleep_calls": args.sleeps,
            "eviction": args.eviction, "contexts": contexts, "sizes": {}}
  for size in args.sizes.split(","):
    log(f"{size}: {SIZES[size]}")
    base = hybrid_config(size, 1, args.eviction)
    hybrid_params = random_params(base)
    entry = {"model": {**SIZES[size], "layers": list(SIZES[size]["layers"])},
             "hybrid_params": count_params(hybrid_params),
             "hybrid_params_bytes": tree_bytes(hybrid_params), "hybrid": {}, "attention": {}}
    for n in passes:
      try:
        entry["hybrid"][f"N{n}"] = bench_hybrid(size, n, args.eviction, hybrid_params,
                                                contexts, args, log)
      except Exception as e:  # noqa: BLE001 - record it, measure the rest
        entry["hybrid"][f"N{n}"] = {"error": describe(e)}
        log(f"  {size} hybrid N={n}: {describe(e)}")
        gc.collect()
    del hybrid_params
    gc.collect()
    attn_params = random_params(attention_config(size, None))
    entry["attention_params"] = count_params(attn_params)
    entry["attention_params_bytes"] = tree_bytes(attn_params)
    entry["attention"]["xla"] = bench_attention(size, None, attn_params, contexts, args, log)
    use_cudnn = {"auto": device.platform == "gpu" and base.dtype == "bfloat16",
                 "on": True, "off": False}[args.cudnn]
    if use_cudnn:
      entry["attention"]["cudnn"] = bench_attention(size, "cudnn", attn_params, contexts, args,
                                                    log)
    else:
      entry["attention"]["cudnn"] = {"skipped": f"--cudnn {args.cudnn} on {device.platform}, "
                                                f"dtype {base.dtype} (cuDNN needs a GPU and "
                                                f"bfloat16/float16)"}
    del attn_params
    gc.collect()
    entry["crossover"] = {
        name: {impl: {"decode": crossover(h, a, amortized=False),
                      "decode_plus_amortized_sleep": crossover(h, a, amortized=True)}
               for impl, a in entry["attention"].items() if "points" in a}
        for name, h in entry["hybrid"].items() if "points" in h}
    result["sizes"][size] = entry
    if checkpoint is not None:
      checkpoint(result)          # a run cut short keeps the sizes it finished
  return result


def table(result: dict) -> str:
  lines = [f"device {result['device']} ({result['platform']}), batch {result['batch']}, "
           f"eviction {result['eviction']}; decode median / p99 ms per token"]
  for size, entry in result["sizes"].items():
    columns = [(f"hybrid {k}", v["points"]) for k, v in entry["hybrid"].items() if "points" in v]
    columns += [(f"attn {k}", v["points"]) for k, v in entry["attention"].items() if "points" in v]
    lines.append(f"\n{size}: hybrid {entry['hybrid_params'] / 1e6:.3g}M params, attention-only "
                 f"{entry['attention_params'] / 1e6:.3g}M")
    lines.append("context  " + "".join(f"{name:>22}" for name, _ in columns))
    for i, context in enumerate(result["contexts"]):
      cells = []
      for _, points in columns:
        p = points[i]
        cells.append(f"{p['median_ms']:9.4f} / {p['p99_ms']:9.4f}" if "median_ms" in p
                     else f"{'error':>21}")
      lines.append(f"{context:>7}  " + "".join(f"{c:>22}" for c in cells))
    for name, h in entry["hybrid"].items():
      if "error" in h:
        lines.append(f"hybrid {name}: {h['error']}")
        continue
      lines.append(f"hybrid {name}: sleep {h['sleep']['median_ms']:.3f} ms per event (L = "
                   f"{h['window']}), amortised {h['amortized_sleep_ms_per_token'] * 1e3:.3f} "
                   f"us/token; state {h['state_bytes'] / 2**20:.2f} MiB; latency at the "
                   f"longest / shortest context {h['flat_ratio']:.3f}; crossover "
                   f"{entry['crossover'][name]}")
  return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sizes = list(result["sizes"])
  fig, axes = plt.subplots(2, len(sizes), figsize=(6.5 * len(sizes), 8), squeeze=False)
  for col, size in enumerate(sizes):
    entry = result["sizes"][size]
    lat, mem = axes[0][col], axes[1][col]
    series = [(f"hybrid {k} (L={v['window']})", "-", v) for k, v in entry["hybrid"].items()
              if "points" in v]
    series += [(f"attention, full cache ({k})", "--", v) for k, v in entry["attention"].items()
               if "points" in v]
    for label, style, s in series:
      pts = [p for p in s["points"] if "median_ms" in p]
      if not pts:
        continue
      x = [p["context"] for p in pts]
      line, = lat.plot(x, [p["median_ms"] for p in pts], style, marker="o", label=label)
      lat.plot(x, [p["p99_ms"] for p in pts], style, color=line.get_color(), alpha=0.35)
      state = [s["state_bytes"]] * len(pts) if "state_bytes" in s else [p["state_bytes"]
                                                                        for p in pts]
      mem.plot(x, np.asarray(state) / 2**20, style, marker="o", label=label)
    for ax, ylabel in ((lat, "decode ms / token (median; faint: p99)"),
                       (mem, "decode state MiB (caches + GDN states)")):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("context length (tokens)")
      ax.set_ylabel(ylabel)
      ax.grid(True, which="both", alpha=0.3)
    lat.set_title(f"{size}: {entry['hybrid_params'] / 1e6:.3g}M params, {result['device']}")
    lat.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for the JSON and the PNG")
  parser.add_argument("--quick", action="store_true",
                      help=f"tiny CPU smoke run: {QUICK} (flags given explicitly still win)")
  parser.add_argument("--sizes", default="rule110,300m", help=f"comma-separated {list(SIZES)}")
  parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
  parser.add_argument("--passes", default="1,2,4", help="hybrid N values")
  parser.add_argument("--eviction", default="hard", choices=("hard", "sliding"))
  parser.add_argument("--batch", type=int, default=1, help="streams decoded in lockstep")
  parser.add_argument("--steps", type=int, default=200, help="timed decode calls per point")
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--sleeps", type=int, default=10, help="timed sleep events per N")
  parser.add_argument("--cudnn", default="auto", choices=("auto", "on", "off"))
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
        setattr(args, key, value)
  write = lambda result: (out / "inference_latency.json").write_text(
      json.dumps({**result, "quick": args.quick}, indent=2))
  result = run(args, log=lambda line: print(line, flush=True), checkpoint=write)
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
