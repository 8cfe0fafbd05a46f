"""Retrofitting fast weights into a trained stack: fresh Gated DeltaNet layers inserted into a model
(e.g. an imported pretrained attention stack), the function unchanged at step 0.

  cfg2, params2 = insert_gdn_layers(cfg, params, positions=(2, 5), rng=jax.random.key(0))

`positions` are the indices the new layers take in the new stack (sorted, distinct): with 4
layers and positions (1, 3) the stack is [layer 0, GDN, layer 1, GDN, layer 2, layer 3]. Each new
layer is a GDN mixer without an MLP (`ModelConfig.mlp_layers`: the paper's inserted Jet layers,
norm + mixer + residual), freshly initialised except its output projection, which is zero: the
layer adds exactly 0 to the residual stream, so the logits equal the original model's (bit for
bit: h + 0 = h). At step 0 only that output projection gets a gradient (every other parameter of
the new layer is behind it); after the first update the rest follow.

The old layers keep their parameters, renamed to their new indices (`layer_{i}_...` ->
`layer_{j}_...`). The two-stage recipe trains the new layers first, then everything:
`OptimizerConfig.train_layers` (stage 1: the new layers' indices, i.e. `positions`; stage 2:
None) freezes every other parameter (`sleep_lm.training.step.param_labels`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleep_lm.common.errors import UserError
from sleep_lm.model.config import ModelConfig

_LAYER = re.compile(r"layer_(\d+)_(.+)")


def inserted_config(config: ModelConfig, positions: Sequence[int]) -> ModelConfig:
  """`config` with GDN layers without an MLP at `positions` of the new stack."""
  positions = tuple(positions)
  total = len(config.layers) + len(positions)
  if (not positions or list(positions) != sorted(set(positions))
          or positions[0] < 0 or positions[-1] >= total):
    raise UserError(f"positions: must be distinct increasing layer indices of the new stack "
                    f"in [0, {total}), got {positions}")
  old = iter(zip(config.layers, [config.has_mlp(i) for i in range(len(config.layers))],
                 strict=True))
  layers, mlps = [], []
  for j in range(total):
    kind, mlp = ("gdn", False) if j in positions else next(old)
    layers.append(kind)
    mlps.append(mlp)
  if config.partial_loop:    # where an inserted layer at a boundary goes is the user's choice
    raise UserError(f"config.model.loop_layers: inserting layers into a model that loops part "
                    f"of its stack ({config.loop_layers}) is not supported; insert first, then "
                    f"set the range of the new stack")
  loop = None if config.loop_layers is None else (0, total)
  return dataclasses.replace(config, layers=tuple(layers), loop_layers=loop,
                             mlp_layers=None if all(mlps) else tuple(mlps))


def old_layer_indices(config: ModelConfig, positions: Sequence[int]) -> list[int]:
  """The new index of each old layer, in order."""
  total = len(config.layers) + len(positions)
  return [j for j in range(total) if j not in set(positions)]


def insert_gdn_layers(config: ModelConfig, params, positions: Sequence[int], rng
                      ) -> tuple[ModelConfig, dict]:
  """(new config, new parameters): `params` (training layout, one model, unboxed) with fresh
  GDN layers at `positions` whose output projections are zero."""
  from sleep_lm.model.hybrid import init_params
  new_cfg = inserted_config(config, positions)
  fresh = jax.jit(lambda key: nn.meta.unbox(init_params(new_cfg, key)))(rng)
  where = dict(enumerate(old_layer_indices(config, positions)))
  out = {}
  for name, value in params.items():
    m = _LAYER.fullmatch(name)
    out[f"layer_{where[int(m.group(1))]}_{m.group(2)}" if m else name] = value
  for j in positions:
    gdn = dict(fresh[f"layer_{j}_gdn"])
    gdn["out_proj"] = {"kernel": jnp.zeros_like(gdn["out_proj"]["kernel"])}
    out[f"layer_{j}_gdn"] = gdn
    out[f"layer_{j}_mixer_norm"] = fresh[f"layer_{j}_mixer_norm"]
  want = jax.tree.structure(jax.eval_shape(lambda: fresh))
  if jax.tree.structure(out) != want:
    raise ValueError(f"retrofit: the parameters do not fit {new_cfg.layers}: got "
                     f"{sorted(out)}, want {sorted(fresh)}")
  return new_cfg, out
