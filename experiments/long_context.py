r"""Long context (issue 27): past 32K tokens, does the sleeping hybrid keep full attention's
accuracy on GSM-Infinite symbolic problems, and at what latency?

A length curriculum by continuing runs (`config.init_from`: each stage starts from the previous
stage's parameters with a fresh optimizer), per model:
  short   experiments/gsm_symbolic.py's `small` preset as it is (problems of 448-622 tokens in
          seq_len 640, its curriculum, batch 64): **train until recall is learned**, not
          token-matched. docs/results.md: the hybrids learn op 1 in 1,500 steps (61M tokens a
          seed), full-cache attention only with 4x the steps, so it gets 6,000 (246M tokens).
  8k      the `long8k` lengths (problems of 6,144-8,174 tokens, seq_len 8,192), from the short
          run; batch 8 x 1,000 steps = 65.5M tokens a seed for every model.
  32k     the `long32k` lengths (24,576-32,750 tokens, seq_len 32,768), from the 8k run;
          batch 2 x 500 steps = 32.8M tokens a seed for every model.
The 8k and 32k stages give every model the same data (same task seed, same model seeds: the same
problems in the same order) and the same tokens; no curriculum inside them (`steps=`,
`batch=` change both stages' budgets alike when given to the chain with --set).
Then the 32k run of each model is evaluated at 8K, 32K and 64K (`EVAL_LENGTHS`; 64K is never
trained: the hybrid runs 32 windows where it was trained on 16, attention attends over
distances it never saw) with `sleep_lm.evaluate --task min_len=...,max_len=...`.

`get_config(arg)`: arg is a comma-separated list of presets and key=value overrides.
  presets:   hybrid (default: 4 layers attn/gdn/attn/gdn at width 256, hard eviction; L = 160
               in the short stage, 2,048 in the long ones, so a 32K problem spans 16 windows
               and its answer is in the last), attn (the same width and depth, 4 attention
               layers, eviction none: the whole problem in its one window),
             short (default), 8k, 32k (the stage),
             gpu (bfloat16 compute, 3 seeds; in the 8k and 32k stages cuDNN attention
               (jax.nn.dot_product_attention implementation="cudnn": XLA's materialises the
               T x T scores, 103 GB per layer for 3 seeds x 2 x 32K in float32)),
             smoke (CPU, the whole chain in minutes: widths 64, 2 layers; 128 tokens in the short
               stage (L = 32), then 512 and 1,024 tokens (L = 128), evaluated at 512, 1,024 and
               2,048)
  overrides: N (passes, hybrid only), init (the workdir whose parameters start this run: required
             for 8k and 32k, the previous stage's run), steps, batch, seed, seeds, dtype,
             eval_size (problems per op count and eval set; the 32k stage's is the size of
             every final evaluation, at every length)
Remat: the hybrids' long stages "full" (each window-pass recomputed in the backward, as
gsm_symbolic's long presets), attention's "blocks" (each layer on its own: its one window is
the whole sequence). `python -m experiments.long_context_memory` measures what one training
step needs at each length.

Tokens per seed (seq_len x batch x steps): hybrid 61.4M + 65.5M + 32.8M, attention 245.8M +
65.5M + 32.8M. The chain prints them, and experiments/plot_long_context.py with the results.

Everything in order (short -> 8k -> 32k -> evaluations, models in parallel on one GPU; rerun the
same command to continue; --deadline stops every run with its checkpoint). One session's device
time fits the three models with 1 seed, not 3 (docs/tasks.md, "Long context": the plan, the cost
estimate and every GPU command; seeds 1 and 2 in other roots, pooled by the plot):
  python -m experiments.long_context_chain --preset gpu --root runs/long_context \
      --models N1,N4,attn --set all:seeds=1 --deadline 540
  python -m experiments.plot_long_context --root runs/long_context \
      --out docs/figures/long_context.png
CPU smoke of the same (a few minutes):
  python -m experiments.long_context_chain --preset smoke --root /tmp/long_context_smoke
  python -m experiments.plot_long_context --root /tmp/long_context_smoke --out /tmp/lc.png
One stage by hand (what the chain runs):
  C=experiments/long_context.py
  python -m sleep_lm.train --config $C:gpu,hybrid,short,N=4 --workdir runs/lc/N4/short
  python -m sleep_lm.train --config $C:gpu,hybrid,8k,N=4,init=runs/lc/N4/short \
      --workdir runs/lc/N4/8k
  python -m sleep_lm.train --config $C:gpu,hybrid,32k,N=4,init=runs/lc/N4/8k \
      --workdir runs/lc/N4/32k
  python -m sleep_lm.evaluate --workdir runs/lc/N4/32k --task min_len=49152,max_len=65518
Memory of one training step (compiled, nothing allocated; --run also runs and times it):
  python -m experiments.long_context_memory --preset gpu --models attn,N1,N4 \
      --lengths 8k,32k,64k --remat blocks,full --attention cudnn,xla --json mem.json
Decode latency and memory of the same sizes (random weights):
  python -m experiments.inference_latency --sizes gsm_long --contexts 8192,32768,65536 \
      --passes 1,4 --evictions hard --out $OUT/inference_long
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from experiments import common, gsm_symbolic
from sleep_lm.tasks.gsm_symbolic import PRESETS as TASK_PRESETS

MODELS = ("hybrid", "attn")
STAGES = ("short", "8k", "32k")
SIZES = ("full", "smoke")
# Problem lengths (min_len, max_len) per stage and per evaluation length. max_op 8 in "full"
# and 4 in "smoke" (the smoke preset's), so seq_len = max_len + 18 or + 10.
_LEN = lambda preset: (TASK_PRESETS[preset]["min_len"], TASK_PRESETS[preset]["max_len"])
STAGE_LENGTHS = {
    "full": {"short": _LEN("small"), "8k": _LEN("long8k"), "32k": _LEN("long32k")},
    "smoke": {"short": _LEN("smoke"), "8k": (384, 502), "32k": (768, 1014)},
}
EVAL_LENGTHS = {
    "full": {"8k": _LEN("long8k"), "32k": _LEN("long32k"), "64k": _LEN("long64k")},
    "smoke": {"8k": (384, 502), "32k": (768, 1014), "64k": (1536, 2038)},
}
# The hybrids' window per stage (the short stage: gsm_symbolic's own).
WINDOWS = {"full": {"short": 160, "8k": 2048, "32k": 2048},
           "smoke": {"short": 32, "8k": 128, "32k": 128}}
SHORT_STEPS = gsm_symbolic.SMALL_STEPS          # the hybrids' short stage (1,500)
ATTN_SHORT_FACTOR = 4                           # attention's short stage: 4x (fig4_attn_long)
# Per stage: steps, batch, eval_every (None: the end only), eval_size, eval_batch_size,
# checkpoint_every, log_every. The short stage keeps gsm_symbolic's own.
STAGE_RUN = {
    "full": {"8k": dict(steps=1000, batch=8, eval_every=500, eval_size=128, eval_batch_size=8,
                        checkpoint_every=250, log_every=25),
             "32k": dict(steps=500, batch=2, eval_every=None, eval_size=128, eval_batch_size=2,
                         checkpoint_every=100, log_every=10)},
    "smoke": {"short": dict(steps=6, batch=8, eval_every=None, eval_size=4,
                            eval_batch_size=4, checkpoint_every=6, log_every=2),
              "8k": dict(steps=4, batch=2, eval_every=None, eval_size=4, eval_batch_size=4,
                         checkpoint_every=2, log_every=2),
              "32k": dict(steps=2, batch=2, eval_every=None, eval_size=4, eval_batch_size=4,
                          checkpoint_every=2, log_every=1)},
}
GPU_SEEDS = 3

_SHORTCUTS = {"N": ("model", "passes"), "init": ("init_from",), "steps": ("steps",),
              "batch": ("batch_size",), "seed": ("seed",), "seeds": ("seeds",),
              "dtype": ("model", "dtype"), "eval_size": ("eval_size",)}
_PRESETS = (*MODELS, *STAGES, "gpu", "smoke")


def _one(presets: list[str], choices: tuple[str, ...], default: str) -> str:
  chosen = [p for p in presets if p in choices]
  if len(chosen) > 1:
    raise ValueError(f"long_context config: choose one of {choices}, got {chosen}")
  return chosen[0] if chosen else default


def get_config(arg=None) -> ml_collections.ConfigDict:
  presets, overrides = common.parse_arg("long_context", arg, _SHORTCUTS, _PRESETS)
  model = _one(presets, MODELS, "hybrid")
  stage = _one(presets, STAGES, "short")
  size = "smoke" if "smoke" in presets else "full"
  init = overrides.pop("init", "")
  if stage != "short" and not init:
    raise ValueError(f"long_context config: the {stage} stage continues an earlier run: give "
                     f"init=<workdir> (config.init_from), the {STAGES[STAGES.index(stage) - 1]} "
                     f"stage's run of the same model")
  if model == "attn" and int(overrides.get("N", 1)) != 1:
    raise ValueError(f"long_context config: the attn model keeps the whole sequence in its one "
                     f"window (eviction none): nothing to replay, N must be 1, got "
                     f"N={overrides['N']}")
  if "gpu" in presets:
    overrides.setdefault("seeds", str(GPU_SEEDS))
    overrides.setdefault("dtype", "bfloat16")

  # gsm_symbolic builds the task, the model and the recipe (and the short stage's curriculum
  # from its steps and batch, so those go through it); this file sets the stage around it.
  run = STAGE_RUN[size].get(stage, {})
  gsm_presets = ["smoke" if size == "smoke" else
                 {"short": "small", "8k": "long8k", "32k": "long32k"}[stage]]
  if size == "smoke" and stage != "short":
    gsm_presets.append("nocurriculum")
  if model == "attn":
    gsm_presets += ["attn_only", "eviction=none"]
  steps = run.get("steps", SHORT_STEPS)
  if model == "attn" and stage == "short":
    steps *= ATTN_SHORT_FACTOR
  gsm_overrides = {"steps": str(steps), "batch": str(run.get("batch", 64)),
                   "L": str(WINDOWS[size][stage])}
  gsm_overrides.update({k: v for k, v in overrides.items() if k != "eval_size"})
  c = gsm_symbolic.get_config(",".join(gsm_presets + [f"{k}={v}" for k, v in
                                                       gsm_overrides.items()]),
                              experiment="long_context")
  c.init_from = init
  c.task.min_len, c.task.max_len = STAGE_LENGTHS[size][stage]
  for field in ("eval_size", "eval_batch_size", "checkpoint_every", "log_every"):
    if field in run:
      c[field] = run[field]
  if run:
    c.eval_every = run["eval_every"] or c.steps
  if "eval_size" in overrides:
    c.eval_size = int(overrides["eval_size"])
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, c.steps // 2)   # smoke: 6 steps
  if stage != "short":
    # The hybrids recompute each window-pass in the backward; attention's one window is the
    # whole sequence, so each layer is recomputed on its own.
    c.model.update(remat="blocks" if model == "attn" else "full", unroll=False)
    # A fresh optimizer on trained parameters: a warm-up of a tenth of the stage (100 steps at
    # 8k, 50 at 32k), then gsm_symbolic's schedule (stable, decay over the last 20%).
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, c.steps // 10))
    if "gpu" in presets:
      c.model.attention_implementation = "cudnn"
  check(c)
  if init:
    check_source(c, init)
  return c


def seq_len(c: ml_collections.ConfigDict, max_len: int | None = None) -> int:
  """The task's sequence length (gsm_symbolic: max_len + 2 max_op + 2)."""
  return (c.task.max_len if max_len is None else max_len) + 2 * c.task.max_op + 2


def check(c: ml_collections.ConfigDict, lengths=None) -> None:
  """Hard eviction: at the run's lengths and at every (min_len, max_len) of `lengths`, the
  answer region lies in one window and the sequence is a whole number of windows (the static
  schedule's windows are then all full); eviction none: nothing to check."""
  if c.model.eviction == "none":
    return
  for min_len, max_len in [(c.task.min_len, c.task.max_len), *(lengths or ())]:
    probe = ml_collections.ConfigDict(c.to_dict())
    probe.task.min_len, probe.task.max_len = min_len, max_len
    gsm_symbolic.check_answer_window(probe)
    if seq_len(probe) % c.model.window:
      raise ValueError(f"long_context config: seq_len {seq_len(probe)} (max_len {max_len}) is "
                       f"not a multiple of the window L = {c.model.window}")


def check_source(c: ml_collections.ConfigDict, init: str) -> None:
  """An init workdir that already holds a run must be the same model (layers, passes): the
  parameter check of `sleep_lm.training.init_from` cannot tell N = 1 from N = 4. A workdir not made
  yet is left to that check at launch."""
  path = Path(init) / "config.json"
  if not path.exists():
    return
  from sleep_lm.training import workdir
  source = workdir.load_config(init).model
  same = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  for field in ("layers", "passes", "eviction"):
    if same(source[field]) != same(c.model[field]):
      raise ValueError(f"long_context config: init={init} (config.init_from) holds a run with "
                       f"model.{field} = {source[field]!r}, this one has {c.model[field]!r}")


def tokens_per_seed(c: ml_collections.ConfigDict) -> int:
  return c.steps * c.batch_size * seq_len(c)
