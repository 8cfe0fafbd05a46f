"""What the experiment configs share: the run fields of the recipe, and the `arg` syntax.

An experiment file's `get_config(arg)` takes a comma-separated list of presets and KEY=VALUE
shortcuts (e.g. "paper,N=4,t=12"); `parse_arg` splits it, rejecting unknown names with the
allowed ones, and `apply_shortcuts` writes the values into the config after the presets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections

from sleep_lm.model import sharding


def parse_arg(name: str, arg: str | None, shortcuts: Mapping[str, tuple[str, ...]],
              presets: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  chosen, overrides = [], {}
  for item in filter(None, (arg or "").split(",")):
    if "=" in item:
      key, value = item.split("=", 1)
      if key not in shortcuts:
        raise ValueError(f"{name} config: unknown override {key!r}; allowed: "
                         f"{sorted(shortcuts)} (or use --config.<field>=...)")
      overrides[key] = value
    elif item in presets:
      chosen.append(item)
    else:
      raise ValueError(f"{name} config: unknown preset {item!r}; allowed: {tuple(presets)}")
  return chosen, overrides


def apply_shortcuts(c: ml_collections.ConfigDict, overrides: Mapping[str, str],
                    shortcuts: Mapping[str, tuple[str, ...]]) -> None:
  """Writes each override at its path, converted to the field's type (an unset optional field,
  None, takes an integer); a value that does not convert is refused with the key's name."""
  for key, value in overrides.items():
    *parents, leaf = shortcuts[key]
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = _converted(c.name, key, value, node[leaf])


def _converted(name: str, key: str, value: str, current):
  if isinstance(current, str):
    return value
  if isinstance(current, bool):              # bool("False") is True: spell it out
    if value.lower() not in ("true", "false"):
      raise ValueError(f"{name} config: {key}={value!r}: must be true or false")
    return value.lower() == "true"
  kind = int if current is None else type(current)
  try:
    return kind(value)
  except ValueError:
    noun = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
    raise ValueError(f"{name} config: {key}={value!r}: must be {noun}") from None


# ModelConfig's optional string fields (None by default): kernel choices.
OPTIONAL_MODEL_STRINGS = ("kernel_implementation", "attention_implementation",
                          "mlp_implementation")


def base_config(name: str, task: dict, model: dict) -> ml_collections.ConfigDict:
  """The paper's recipe (Muon for the projections, AdamW for the rest, warmup-stable-decay,
  clipping at 1.0) and the run fields every experiment has; `model` holds the task's model."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0                      # first model seed (init and data order)
  c.seeds = 1                     # models trained at once, vmapped: seeds seed .. seed+seeds-1
  c.task = task
  c.model = dict(
      attn_head_dim=64, gdn_head_dim=64, conv_kernel=4, rule="gdn", passes=1, eviction="hard",
      remat="none", dtype="float32", kernel_implementation=None, chunk_size=64,
      attention_implementation=None, mlp_implementation=None, merge_projections=False,
      unroll=True, scan_layers=False, **model)
  # Optional strings need a typed placeholder so that --config.model.X=... can set them.
  for field in OPTIONAL_MODEL_STRINGS:
    c.model[field] = ml_collections.config_dict.placeholder(str)
  c.optimizer = dict(muon_lr=2e-3, adamw_lr=5e-5, warmup_steps=50, decay_fraction=0.2,
                     weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.95, muon_momentum=0.95,
                     muon_nesterov=True)
  c.log_every = 10
  c.keep_checkpoints = 2
  c.data_dir = ""                 # TFDS eval sets; "" means <workdir>/eval_data
  c.init_from = ""                # a workdir whose parameters start this run (fresh optimizer)
  # Devices: data x fsdp x tensor = all devices; -1 takes the rest (sleep_lm/model/sharding.py).
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # Logical axis (sleep_lm/model/layers.py) -> mesh axis, a tuple of them, or None (replicated).
  # The default: batch over (data, fsdp), weights' d_model over fsdp (ZeRO-3), MLP width and
  # heads over tensor; override it here or with --config.sharding_rules="((...), ...)".
  c.sharding_rules = sharding.DEFAULT_RULES
  c.skip_nonfinite = False        # True: skip steps with a non-finite loss instead of stopping
  c.tensorboard = True            # event files in <workdir>/tensorboard/seed_<s>
  return c


def steps_label(last_eval_step: int, planned_steps: int) -> str:
  """A run's length for plot legends: the planned steps, or how far a stopped run got."""
  if last_eval_step >= planned_steps:
    return f"{planned_steps} steps"
  return f"stopped at {last_eval_step} of {planned_steps} steps"


def save_figure(fig, out: str) -> None:
  """Writes a plot command's figure (making its folder) and says where."""
  fig.tight_layout()
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  print(f"wrote {out}")
