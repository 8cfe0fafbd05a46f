r"""Fig. 6a: training throughput of sequential windows against a fully parallel sliding-window
hybrid over the same long sequences.

  python -m experiments.fig6a_throughput --json $OUT/fig6a.json            # GPU: the paper's shape
  python -m experiments.fig6a_throughput --windows 1024,2048 --modes sequential,parallel
  python -m experiments.fig6a_throughput --quick         # CPU smoke: tiny model, forward only

The paper's claim (Fig. 6a, one H200, 12K-token sequences): processing the sequence window by
window, as sleep does (N = 1, hard eviction), costs little against a fully parallel
sliding-window-attention + SSM forward once the window L is large (1K-4K).

Modes, each a forward and backward (`jax.value_and_grad` of the mean next-token cross-entropy
over every token, w.r.t. all parameters; no optimizer update, which is the same for all) of one
batch of `--batch` sequences of `--seq-len` tokens:
  sequential          our sleep schedule at N = 1, hard eviction: `sleep.sleep_forward` over
                      T / L windows in sequence (a `lax.scan`; each window attends to itself, the
                      GDN states carry over, the conv restarts at each window);
  sequential_sliding  the same with sliding eviction (each window also attends to the previous
                      window's last L - 1 keys/values);
  parallel            the fully parallel sliding-window hybrid: one pass of the layer stack over
                      the whole sequence, every attention layer causal with a band of L keys
                      (`jax.nn.dot_product_attention(is_causal=True, local_window_size=(L-1, 0))`,
                      cuDNN's sliding-window kernel on the GPU, which skips the blocks outside
                      the band), every GDN layer one scan over all T tokens, the conv not
                      restarting. With the conv restarting every L tokens it is the same
                      function as `sequential_sliding` (tests/test_fig6a_throughput.py).
Rows report the median ms per step over --iters after --warmup, tokens/s, the compile time and
XLA's planned memory (temporaries + arguments), and per L the ratio sequential / parallel.

The model (default): a ~200M-parameter hybrid, d = 1024, 8 layers alternating attn/gdn (head
dim 128), SwiGLU 4096, vocabulary 32,000, bf16 compute (float32 parameters, states, residual).
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import HybridLM, init_params, pass_caches, zero_states
from sleep_lm.model.layers import Context
from sleep_lm.model.sleep import sleep_forward

MODES = ("sequential", "sequential_sliding", "parallel")


# ---------------------------------------------------------------- the parallel sliding model

def parallel_sliding_forward(config: ModelConfig, params, tokens: jax.Array, *,
                             conv_restart: bool = False) -> jax.Array:
  """Logits [B,T,V] of one parallel pass over tokens [B,T]: attention over a causal band of
  `config.window` keys, GDN over the whole sequence from zero states, the conv restarting every
  window only if `conv_restart` (then this is `sleep_forward` with eviction="sliding", N = 1)."""
  b, t = tokens.shape
  positions = jnp.arange(t)
  segment_pos = positions % config.window if conv_restart else positions
  ctx = Context(positions, segment_pos, causal=True, band=config.window)

  def forward(model, tokens):
    h, _ = model.run_pass(model.embed(tokens), pass_caches(config, zero_states(config, b)), ctx)
    return model.logits(h)

  return HybridLM(config).apply({"params": params}, tokens, method=forward)


# ------------------------------------------------------------------------------- the benchmark

def model_config(args, window: int, mode: str) -> ModelConfig:
  return ModelConfig(
      vocab_size=args.vocab, d_model=args.d_model, layers=("attn", "gdn") * (args.layers // 2),
      attn_head_dim=args.head_dim, gdn_head_dim=args.head_dim, mlp_dim=4 * args.d_model,
      window=window, passes=1, eviction="sliding" if mode == "sequential_sliding" else "hard",
      dtype=args.dtype, attention_implementation=args.attention, unroll=bool(args.unroll),
      remat=args.remat, kernel_implementation=args.kernel)


def loss_fn(config: ModelConfig, mode: str):
  def loss(params, tokens, targets):
    if mode == "parallel":
      logits = parallel_sliding_forward(config, params, tokens)
    else:
      windows = -(-tokens.shape[1] // config.window)
      mask = jnp.ones(tokens.shape, jnp.float32)
      logits = sleep_forward(config, params, tokens, mask, schedule=(False,) * windows).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return loss


def time_mode(args, window: int, mode: str, params) -> dict:
  config = model_config(args, window, mode)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq_len + 1)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  loss = loss_fn(config, mode)
  step = jax.jit(jax.value_and_grad(loss) if args.backward else loss)
  t0 = time.perf_counter()
  compiled = step.lower(params, inputs, targets).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  xla_gb = ((memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 1e9
            if memory is not None else None)
  for _ in range(args.warmup):
    jax.block_until_ready(compiled(params, inputs, targets))
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, inputs, targets))
    times.append(time.perf_counter() - t0)
  ms = 1e3 * float(np.median(times))
  return {"ms_per_step": ms, "p20_ms": 1e3 * float(np.percentile(times, 20)),
          "p80_ms": 1e3 * float(np.percentile(times, 80)),
          "tokens_per_s": args.batch * args.seq_len / (ms / 1e3), "compile_s": compile_s,
          "xla_gb": xla_gb,
          "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq-len", type=int, default=12288)
  parser.add_argument("--windows", default="1024,2048,4096")
  parser.add_argument("--modes", default="sequential,parallel",
                      help=f"comma-separated, of {MODES}")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--d-model", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--attention", default=None,
                      help="attention implementation for every mode: xla or cudnn (default: "
                           "cudnn on a GPU, xla elsewhere)")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--kernel", default=None,
                      help="fast-weight op implementation (default: the backend's best)")
  parser.add_argument("--unroll", type=int, default=0, help="1: unroll the window scan")
  parser.add_argument("--backward", type=int, default=1,
                      help="1: forward and backward (training); 0: forward only")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=8)
  parser.add_argument("--json", default=None)
  parser.add_argument("--quick", action="store_true",
                      help="a tiny model, forward only, on any device (a smoke test of the "
                           "script, seconds on a CPU)")
  args = parser.parse_args(argv)
  if args.quick:
    args.seq_len, args.windows, args.batch, args.d_model, args.layers = 32, "16", 1, 32, 2
    args.head_dim, args.vocab, args.dtype, args.warmup, args.iters = 16, 64, "float32", 1, 1
    args.kernel, args.backward = args.kernel or "recurrent", 0   # the cheapest to compile
  if args.attention is None:
    args.attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
  modes = args.modes.split(",")
  bad = [m for m in modes if m not in MODES]
  if bad:
    parser.error(f"--modes: unknown {bad}; allowed: {MODES}")
  windows = [int(w) for w in args.windows.split(",")]
  if any(args.seq_len % w for w in windows):
    parser.error(f"--windows must divide --seq-len {args.seq_len}, got {windows}")

  # One set of parameters for every row: their shapes depend on neither L nor the mode.
  params = nn.meta.unbox(jax.jit(lambda key: init_params(
      model_config(args, windows[0], modes[0]), key))(jax.random.key(0)))
  rows = []
  for window in windows:
    for mode in modes:
      row = {"window": window, "mode": mode, "seq_len": args.seq_len, "batch": args.batch,
             "attention": args.attention, "dtype": args.dtype}
      try:
        row.update(time_mode(args, window, mode, params))
      except Exception as e:  # noqa: BLE001 - one failing row (OOM, kernel) must not lose the rest
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      rows.append(row)
      print(json.dumps(row), flush=True)

  device = jax.devices()[0].device_kind
  print(f"\ndevice: {device}   {args.batch} x {args.seq_len} tokens   d {args.d_model}, "
        f"{args.layers} layers, {args.dtype}, attention {args.attention}")
  print(f"{'L':>6}{'mode':>20}{'ms/step':>10}{'tok/s':>12}{'compile s':>11}{'XLA GB':>8}"
        f"{'vs parallel':>13}")
  for r in rows:
    par = next((p for p in rows if p["window"] == r["window"] and p["mode"] == "parallel"
                and "error" not in p), None)
    head = f"{r['window']:>6}{r['mode']:>20}"
    if "error" in r:
      print(f"{head}  {r['error'][:80]}")
      continue
    ratio = f"{r['ms_per_step'] / par['ms_per_step']:.2f}x" if par else "-"
    gb = f"{r['xla_gb']:.1f}" if r["xla_gb"] is not None else "-"
    print(f"{head}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12.0f}{r['compile_s']:>11.1f}"
          f"{gb:>8}{ratio:>13}")
  result = {"device": device, "args": vars(args), "rows": rows}
  print("forward and backward" if args.backward else "forward only")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
