r"""The Fig. 4 analogue on a pretrained model: SmolLM2-135M with inserted GDN layers, fine-tuned on
GSM-Infinite symbolic problems rendered as text (`sleep_lm.tasks.gsm_text`: question first, no
chain of thought, the answer after the context), hard eviction, N = 1, 2, 4; the reference is the
unmodified SmolLM2 with the whole problem in its context (eviction none), fine-tuned the same way.

`get_config(arg)`: arg is a comma-separated list of presets and key=value overrides.
  presets:   small (default; one H200: prompts of 1,024-1,984 SmolLM2 tokens + a 64-token answer
               region, seq_len 2,048 = 4 windows of L = 512, so a problem spans 3-4 windows;
               batch 16, 32,768 tokens a step; stage 1 200 steps (6.6M tokens), stage 2 400
               steps (13.1M tokens); bfloat16, remat "full", scan_layers (each pass scans its
               repeated layer groups, (A*7 G) x 4 + A A and the reference's 30 A: one body
               each, for the compile time; docs/performance.md)),
             smoke (CPU: about a minute a stage on a tiny converted checkpoint, measured; not
               timed on SmolLM2 itself: prompts of 160-240 tokens, max_op 2, L = 96, batch 2,
               2 steps),
             reference (eviction none, no inserted layers: init must be the plain conversion;
               only stage 2 exists for it; remat "blocks" in small: its one window is the whole
               problem, and "full" would hold all 30 layers' activations, 214 GB)
  overrides: init (required: the workdir to start from; stage 1 and the reference: the
               converted checkpoint, stage 2: the stage-1 run), stage (1: only the inserted GDN
               layers train, `optimizer.train_layers`; 2: everything), N (passes), L (window),
             steps, batch, seed, seeds, dtype
The model is the one the converted workdir holds (its config.json: architecture and inserted
layers); this file sets the sleep (eviction, L, N), the task, the recipe and `init_from`. The
tokenizer is the converted workdir's (through a stage-1 run, the one its task names).

Seeds: 1 per run (the budget: ~8 GPU-minutes a run); `seeds=3` trains three at once, all
starting from the same converted parameters (they differ by their data order).

Launch, as a script (here: convert; GPU: the rest, see docs/pretrained.md for the transfers):
  G=$(python -c 'from sleep_lm.pretrained import smollm2_gguf; print(smollm2_gguf())')
  python -m sleep_lm.pretrained.convert --source "$G" --workdir runs/pgsm/smollm2
  python -m sleep_lm.pretrained.convert --source "$G" --workdir runs/pgsm/smollm2_gdn \
      --gdn_layers 7,15,23,31
  C=experiments/pretrained_gsm.py
  for N in 4 2 1; do
    python -m sleep_lm.train --config $C:small,N=$N,stage=1,init=runs/pgsm/smollm2_gdn \
        --workdir runs/pgsm/N${N}_stage1
    python -m sleep_lm.train --config $C:small,N=$N,stage=2,init=runs/pgsm/N${N}_stage1 \
        --workdir runs/pgsm/N${N}_stage2
    python -m sleep_lm.evaluate --workdir runs/pgsm/N${N}_stage2
  done
  python -m sleep_lm.train --config $C:small,reference,init=runs/pgsm/smollm2 \
      --workdir runs/pgsm/reference
  python -m sleep_lm.evaluate --workdir runs/pgsm/reference
Smoke (CPU): the same commands with `smoke` for `small` (and --gdn_layers 1 on a tiny model).
Accuracy is exact set match (the answer tokens, docs/tasks.md), per op count (op1, op2, op4,
op6, op8), printed with the floors root-only, all-derivable, empty set and chance 1/(2^op - 1).
"""

from __future__ import annotations

import ml_collections

from experiments import common
from sleep_lm.tasks.gsm_symbolic import EVAL_OPS
from sleep_lm.tasks.gsm_text import GsmText
from sleep_lm.training import workdir

GDN_LAYERS = (7, 15, 23, 31)          # SmolLM2's 30 blocks + 4 GDN layers (convert --gdn_layers)
SIZES = {
    "small": dict(task=dict(min_len=1024, max_len=1984, max_op=8, eval_ops=EVAL_OPS), window=512,
                  batch=16, steps={1: 200, 2: 400}, eval_size=256, eval_batch_size=16,
                  dtype="bfloat16", remat="full", scan_layers=True),
    "smoke": dict(task=dict(min_len=160, max_len=240, max_op=2, eval_ops=(1, 2)), window=96,
                  batch=2, steps={1: 2, 2: 2}, eval_size=4, eval_batch_size=4,
                  dtype="float32", remat="none"),
}
_SHORTCUTS = {"init": ("init_from",), "stage": ("stage",), "N": ("model", "passes"),
              "L": ("model", "window"), "steps": ("steps",), "batch": ("batch_size",),
              "seed": ("seed",), "seeds": ("seeds",), "dtype": ("model", "dtype")}
_PRESETS = ("small", "smoke", "reference")


def source_task(init: str) -> tuple[str, int]:
  """(tokenizer, vocab_size) of the workdir a run starts from: a converted checkpoint's own
  tokenizer, or the tokenizer a gsm_text run (an earlier stage) names."""
  task = workdir.load_config(init).task
  if task.name == "gsm_text":
    return task.tokenizer, task.vocab_size
  return init, task.vocab_size


def get_config(arg=None):
  presets, overrides = common.parse_arg("pretrained_gsm", arg, _SHORTCUTS, _PRESETS)
  init = overrides.pop("init", None)
  if not init:
    raise ValueError("pretrained_gsm config: give init=<workdir> (a converted checkpoint, or "
                     "the stage-1 run for stage 2)")
  stage = int(overrides.pop("stage", "2" if "reference" in presets else "1"))
  if stage not in (1, 2):
    raise ValueError(f"pretrained_gsm config: stage must be 1 or 2, got {stage}")
  size = "smoke" if "smoke" in presets else "small"
  s = SIZES[size]
  model = workdir.load_config(init).model.to_dict()
  tokenizer, vocab = source_task(init)
  task = dict(name="gsm_text", tokenizer=tokenizer, vocab_size=vocab, seed=0, min_op=1,
              **s["task"])
  gdn = tuple(i for i, kind in enumerate(model["layers"]) if kind == "gdn")
  if "reference" in presets:
    if gdn or stage != 2:
      raise ValueError(f"pretrained_gsm config: the reference is the unmodified model, fine-"
                       f"tuned whole (stage 2); {init} has GDN layers at {gdn} or stage={stage}")
    model.update(eviction="none", passes=1)
  else:
    if not gdn:
      raise ValueError(f"pretrained_gsm config: {init} has no GDN layers; convert with "
                       f"--gdn_layers {','.join(map(str, GDN_LAYERS))}")
    model.update(eviction="hard", window=s["window"], passes=1)
  model.update(dtype=s["dtype"], remat=s["remat"], unroll=False)
  if s.get("scan_layers"):          # smoke: as the workdir it starts from says (default off)
    model["scan_layers"] = True
  if "reference" in presets and s["remat"] != "none":
    # Its one window is the whole problem: "full" would hold all 30 layers' activations in the
    # backward (XLA's memory analysis: 214 GB at batch 16 x 2,048), per layer ~a tenth.
    model["remat"] = "blocks"
  c = common.base_config("pretrained_gsm", task=task, model={})
  # The workdir's model over the base fields, so that fields its (older) config lacks are there
  # with their defaults and settable from the command line (merge_projections, scan_layers).
  c.model = {**c.model.to_dict(), **model}
  for field in common.OPTIONAL_MODEL_STRINGS:
    c.model[field] = ml_collections.config_dict.placeholder(str)
  c.init_from = init
  c.optimizer.update(muon_lr=1e-3 if stage == 1 else 2e-4, adamw_lr=3e-4 if stage == 1 else 2e-5,
                     warmup_steps=min(20, s["steps"][stage] // 10))
  if stage == 1:
    c.optimizer.train_layers = gdn
  c.batch_size = s["batch"]
  c.steps = s["steps"][stage]
  c.log_every = 10 if size == "small" else 1
  c.eval_every = c.steps
  c.eval_size = s["eval_size"]
  c.eval_batch_size = s["eval_batch_size"]
  c.checkpoint_every = c.steps
  c.tensorboard = size == "small"
  common.apply_shortcuts(c, overrides, _SHORTCUTS)
  check_answer_window(c)
  return c


def check_answer_window(c: ml_collections.ConfigDict) -> None:
  """The supervised positions (max_len-1 .. seq_len-2) must lie in one window, so that every
  batch supervises the same windows (the static schedule)."""
  if c.model.eviction == "none":
    return
  task = GsmText(**{k: v for k, v in c.task.to_dict().items() if k != "name"})
  first, last, window = task.max_len - 1, task.seq_len - 2, c.model.window
  if first // window != last // window:
    raise ValueError(f"config.model.window = {window} cuts the answer region (positions "
                     f"{first}..{last}) in two; choose another window")
