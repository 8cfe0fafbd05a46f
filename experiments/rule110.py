r"""Rule 110 (paper Task 1, Fig. 2): does sleeping (N > 1) recover accuracy as t grows?

`get_config(arg)`: arg is a comma-separated list of presets and key=value overrides.
  presets:   paper (default: 4 layers attn/gdn/attn/gdn, width 256, L = 24, batch 512),
             smoke (CPU, about 2 minutes: the README's main job),
             attn_only (baseline: 4 attention layers; with eviction=none the full-cache one),
             deep (baseline: 16 layers, 4x the paper's, for a depth-matched N = 1),
             large (d = 1024, 16 layers, ~280M parameters, bf16: the scaling benchmark's model)
  overrides: N (passes), t (automaton steps), L (window), steps, batch, seed, seeds, eviction,
             dtype
Any field can also be overridden on the command line: --config.model.d_model=128.

Launch (single run):
  python -m sleep_lm.train --config experiments/rule110.py:smoke --workdir /tmp/rule110_smoke
  python -m sleep_lm.train --config experiments/rule110.py:N=4,t=8 --workdir runs/rule110_N4_t8
  python -m sleep_lm.evaluate --workdir runs/rule110_N4_t8
Sweeps (3 seeds per run, vmapped; one run per GPU with --gpus):
  python -m experiments.sweep --config experiments/rule110.py --sweep fig2a --root runs/fig2a
  python -m experiments.sweep --config experiments/rule110.py --sweep fig2b_t12 \
      --root runs/fig2b_t12 --gpus 0,1,2,3
  python -m experiments.plot_rule110 fig2a --root runs/fig2a --out fig2a.png
  python -m experiments.plot_rule110 fig2b --root runs/fig2b_t12 --out fig2b_t12.png
The large model compiles in ~8 minutes on an H200 (its fastest step, 224 ms); for short runs,
everything scanned and each layer checkpointed compiles in 43 s (377 ms a step;
docs/performance.md, "Compile time on the GPU"):
  python -m sleep_lm.train --config experiments/rule110.py:large,N=4 --workdir runs/large \
      --config.model.scan_layers=True --config.model.unroll=False --config.model.remat=blocks
"""

from experiments import common

# The paper's Fig. 2a budget: <= 40M tokens = 750 steps of 512 x 104 tokens.
PAPER_STEPS = 750

_GPU = "seeds=3,dtype=bfloat16"
# Fig. 2b runs: equal tokens per run (FIG2B_STEPS x 512 x 104 = 133M per seed), and two N = 1
# baselines matched to N = 4's cost: by training FLOPs (3.4x the steps) and by depth (4x layers).
FIG2B_STEPS = 2500
# The aim at t = 16: >= 300M tokens per seed (5,700 x 512 x 104 = 303M) for the sleeping
# models; N = 1's curve to that budget is the FLOPs-matched run's own evaluations.
FIG2B_LONG_STEPS = 5700


def _fig2b(t: int) -> list[str]:
  base = f"t={t},{_GPU},steps={FIG2B_STEPS}"
  return ([f"N=1,t={t},{_GPU},steps={int(FIG2B_STEPS * 3.4)}"]        # FLOPs-matched N = 1
          + [f"N={n},{base}" for n in (4, 3, 1, 2)]
          + [f"attn_only,{base}", f"attn_only,eviction=none,{base}", f"deep,N=1,{base}"])


SWEEPS = {
    "fig2a": [f"N=1,t={t},{_GPU}" for t in (4, 8, 10, 12, 14, 16)],
    "fig2b_t12": _fig2b(12),
    "fig2b_t16": _fig2b(16),
    "fig2b_t32": _fig2b(32),
    "fig2b_t16_long": [f"N={n},t=16,{_GPU},steps={FIG2B_LONG_STEPS}" for n in (4, 2)],
    "smoke": ["smoke,N=1", "smoke,N=2"],
}

_SHORTCUTS = {"N": ("model", "passes"), "L": ("model", "window"), "t": ("task", "t"),
              "steps": ("steps",), "batch": ("batch_size",), "seed": ("seed",),
              "seeds": ("seeds",),
              "eviction": ("model", "eviction"), "dtype": ("model", "dtype")}
_PRESETS = ("paper", "smoke", "attn_only", "deep", "large")


def get_config(arg=None):
  presets, overrides = common.parse_arg("rule110", arg, _SHORTCUTS, _PRESETS)
  c = common.base_config("rule110", task=dict(name="rule110", t=8, seed=0), model=dict(
      d_model=256, layers=("attn", "gdn", "attn", "gdn"), mlp_dim=1024, window=24))
  c.batch_size = 512
  c.steps = PAPER_STEPS
  c.eval_every = 250
  c.eval_size = 4096
  c.eval_batch_size = 1024
  c.checkpoint_every = 500

  if "attn_only" in presets:
    c.model.layers = ("attn",) * 4
  if "deep" in presets:
    c.model.layers = ("attn", "gdn") * 8
  if "large" in presets:
    # The scaling benchmark's model (docs/scaling.md): d = 1024, 16 layers, ~280M parameters.
    c.model.update(d_model=1024, layers=("attn", "gdn") * 8, attn_head_dim=128,
                   gdn_head_dim=128, mlp_dim=4096, dtype="bfloat16")
    c.batch_size = 64
  if "smoke" in presets:
    c.model.update(d_model=64, attn_head_dim=32, gdn_head_dim=32, mlp_dim=128, unroll=False)
    c.task.t = 0
    c.batch_size = 32
    c.steps = 120
    c.log_every = 10
    c.eval_every = 60
    c.eval_size = 256
    c.eval_batch_size = 256
    c.checkpoint_every = 60
    c.optimizer.warmup_steps = 10

  common.apply_shortcuts(c, overrides, _SHORTCUTS)
  return c
