"""Retrofit (sleep_lm.model.retrofit): fresh GDN layers inserted into an imported attention
stack leave its function unchanged, and the two-stage recipe's stage 1 trains only them.

The attention stack is a random canonical checkpoint imported through `sleep_lm.pretrained`
(GQA, tied head). Checks: the logits after insertion equal those before (they are computed
separately, by the attention-only config and by the hybrid one); the old layers' parameters are
the imported ones under their new indices; one train step of stage 1 (`train_layers` = the new
layers) leaves every other parameter bit-identical and moves the new layers' output projection
(the only new parameter with a gradient at step 0), with Muon on the new layers' projection
matrices; stage 2 (`train_layers` None) moves the old layers too (under `slow`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.common.errors import UserError
from sleep_lm.model.hybrid import HybridLM
from sleep_lm.model.retrofit import insert_gdn_layers, inserted_config
from sleep_lm.pretrained.importer import import_params, model_config
from sleep_lm.training.step import (
  OptimizerConfig,
  TrainState,
  make_optimizer,
  param_labels,
  param_path,
  train_step,
)
from tests.test_importer import random_checkpoint

POSITIONS = (1, 3)        # 2 attention layers -> [attn, GDN, attn, GDN]


@pytest.fixture(scope="module")
def imported():
  ckpt = random_checkpoint(11, tied_embeddings=True)
  cfg = model_config(ckpt.arch, eviction="hard", window=8, gdn_head_dim=16)
  return cfg, import_params(ckpt, cfg)


@pytest.fixture(scope="module")
def retrofitted(imported):
  cfg, params = imported
  return insert_gdn_layers(cfg, params, POSITIONS, jax.random.key(1))


def flat(params) -> dict[str, np.ndarray]:
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_insertion_keeps_the_function(imported, retrofitted):
  cfg, params = imported
  new_cfg, new_params = retrofitted
  assert new_cfg.layers == ("attn", "gdn", "attn", "gdn")
  assert new_cfg.mlp_layers == (True, False, True, False)
  assert "layer_1_mlp" not in new_params and "layer_3_mlp" not in new_params
  old, new = flat(params), flat(new_params)
  for path, value in old.items():          # old layer 1 is new layer 2
    moved = path.replace("layer_1_", "layer_2_")
    np.testing.assert_array_equal(new[moved], value, err_msg=path)
  assert not new["layer_1_gdn/out_proj/kernel"].any()
  assert new["layer_3_gdn/q_proj/kernel"].std() > 0          # the rest freshly initialised
  tokens = np.random.default_rng(2).integers(0, 50, (2, 8)).astype(np.int32)
  before = jax.jit(HybridLM(cfg).apply)({"params": params}, tokens)
  after = jax.jit(HybridLM(new_cfg).apply)({"params": new_params}, tokens)
  np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  # Control: a non-zero output projection changes the logits.
  poked = dict(new_params, layer_1_gdn=dict(new_params["layer_1_gdn"], out_proj={
      "kernel": jnp.full_like(new_params["layer_1_gdn"]["out_proj"]["kernel"], 0.1)}))
  changed = jax.jit(HybridLM(new_cfg).apply)({"params": poked}, tokens)
  assert float(jnp.abs(changed - before).max()) > 1e-3


def _one_step(cfg, params, train_layers):
  opt_cfg = OptimizerConfig(total_steps=10, warmup_steps=0, muon_lr=0.02, adamw_lr=1e-2,
                            train_layers=train_layers)
  optimizer = make_optimizer(opt_cfg)
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 50, (2, 9)).astype(np.int32)        # one window of 8
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": np.ones((2, 8), np.float32)}
  step = jax.jit(lambda s, b: train_step(s, b, model_cfg=cfg, optimizer=optimizer))
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  return flat(params), flat(new.params)


def test_stage_one_trains_only_the_new_layers(retrofitted):
  cfg, params = retrofitted
  labels = {param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(
      param_labels(params, POSITIONS))}
  assert labels["layer_1_gdn/q_proj/kernel"] == "muon"
  assert labels["layer_3_gdn/out_proj/kernel"] == "muon"
  assert labels["layer_1_gdn/A_log"] == "gates"
  assert labels["layer_1_mixer_norm/scale"] == "adamw"
  assert labels["layer_0_attn/q/kernel"] == labels["embedding/embedding"] == "frozen"
  before, after = _one_step(cfg, params, POSITIONS)
  moved = {p for p in before if not np.array_equal(before[p], after[p])}
  assert moved, "stage 1 changed nothing"
  assert all(p.startswith(("layer_1_", "layer_3_")) for p in moved), sorted(moved)
  assert {"layer_1_gdn/out_proj/kernel", "layer_3_gdn/out_proj/kernel"} <= moved


@pytest.mark.slow
def test_stage_two_trains_everything(retrofitted):
  cfg, params = retrofitted
  before, after = _one_step(cfg, params, None)
  moved = {p for p in before if not np.array_equal(before[p], after[p])}
  assert {"layer_0_attn/q/kernel", "layer_2_mlp/down/kernel", "embedding/embedding"} <= moved


def test_positions_and_train_layers_are_checked(imported):
  cfg, _ = imported
  for bad in ((), (3, 1), (1, 1), (4,), (-1,)):
    with pytest.raises(UserError, match="positions: must be distinct increasing"):
      inserted_config(cfg, bad)
  assert inserted_config(cfg, (0,)).layers == ("gdn", "attn", "attn")
  assert inserted_config(dataclasses.replace(cfg, mlp_layers=(False, True)), (2,)).mlp_layers == (
      False, True, False)
  with pytest.raises(ValueError, match="OptimizerConfig.train_layers"):
    OptimizerConfig(total_steps=1, warmup_steps=0, train_layers=())
  opt = OptimizerConfig.from_mapping({"total_steps": 1, "warmup_steps": 0, "train_layers": [1, 3]})
  assert opt.train_layers == (1, 3)
