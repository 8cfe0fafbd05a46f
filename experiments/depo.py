r"""Depo k-hop retrieval (paper Task 2, Fig. 3): does sleeping (N > 1) let a hybrid answer k-hop
queries about a graph it saw only before eviction?

`get_config(arg)`: arg is a comma-separated list of presets and key=value overrides.
  presets:   paper (default: 10 layers alternating attn/gdn, width 512, L = 75, batch 128),
             small (4 layers at width 256: the Rule 110 model, about 10x cheaper per step),
             smoke (CPU, a few minutes)
  overrides: N (passes), steps, batch, seed, seeds, dtype, nodes (fixed training node count)
Any field can also be overridden on the command line: --config.model.d_model=256.

The paper's Depo model is "Jet-Nemotron architecture" with 10 layers at d = 512; its Jet block
is not built here: the mixers are the same softmax attention and Gated DeltaNet blocks as in
Rule 110, alternating (attn, gdn, ...), which the paper leaves unstated.

Launch (single run; three seeds at once):
  python -m sleep_lm.train --config experiments/depo.py:smoke --workdir /tmp/depo_smoke
  python -m sleep_lm.train --config experiments/depo.py:N=4,seeds=3,dtype=bfloat16 \
      --workdir runs/depo_N4
  python -m sleep_lm.evaluate --workdir runs/depo_N4
Sweep (Fig. 3: N = 1, 2, 4), one process per run:
  python -m experiments.sweep --config experiments/depo.py --sweep fig3 --root runs/depo
  python -m experiments.plot_depo --root runs/depo --out docs/figures/depo_fig3.png
"""

import ml_collections

from experiments import common
from sleep_lm.tasks import depo

SWEEPS = {
    "fig3": [f"N={n},seeds=3,dtype=bfloat16" for n in (1, 2, 4)],
    # What one GPU allowed in a session (docs/results.md): the small model, 5,000 steps (230M
    # tokens per seed, 5% of the paper's 100k steps), N = 4 first.
    "fig3_small": [f"small,N={n},seeds=3,dtype=bfloat16,steps=5000" for n in (4, 1, 2)],
    "smoke": ["smoke,N=1", "smoke,N=2"],
}

_SHORTCUTS = {"N": ("model", "passes"), "steps": ("steps",), "batch": ("batch_size",),
              "seed": ("seed",), "seeds": ("seeds",), "dtype": ("model", "dtype"),
              "nodes": ("task", "train_num_nodes")}
_PRESETS = ("paper", "small", "smoke")


def get_config(arg=None):
  presets, overrides = common.parse_arg("depo", arg, _SHORTCUTS, _PRESETS)
  c = common.base_config("depo", task=dict(name="depo", seed=0, train_num_nodes=None), model=dict(
      d_model=512, layers=("attn", "gdn") * 5, mlp_dim=2048, window=depo.WINDOW))
  c.task.train_num_nodes = ml_collections.config_dict.placeholder(int)
  c.optimizer.warmup_steps = 200
  c.batch_size = 128
  c.steps = 100_000               # the paper's budget; GPU runs here are far shorter
  c.log_every = 20
  c.eval_every = 500
  c.eval_size = 1024
  c.eval_batch_size = 256
  c.checkpoint_every = 500

  if "small" in presets:
    c.model.update(d_model=256, layers=("attn", "gdn") * 2, mlp_dim=1024)
    c.optimizer.warmup_steps = 100
    c.eval_every = 250
    c.eval_size = 512
  if "smoke" in presets:
    c.model.update(d_model=64, layers=("attn", "gdn"), attn_head_dim=32, gdn_head_dim=32,
                   mlp_dim=128, unroll=False)
    c.batch_size = 16
    c.steps = 60
    c.log_every = 10
    c.eval_every = 30
    c.eval_size = 64
    c.eval_batch_size = 64
    c.checkpoint_every = 30
    c.optimizer.warmup_steps = 10

  common.apply_shortcuts(c, overrides, _SHORTCUTS)
  return c
