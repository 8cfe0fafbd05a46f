"""Optimizer labels, schedules and the evaluator's floors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_lm.common.validation import FieldError
from sleep_lm.model.config import ModelConfig
from sleep_lm.model.hybrid import init_params
from sleep_lm.tasks import make_task
from sleep_lm.training.evaluation import answer_accuracy, floors
from sleep_lm.training.step import OptimizerConfig, make_optimizer, param_labels, param_path


def test_muon_gets_exactly_the_projection_matrices():
  cfg = ModelConfig(vocab_size=5, d_model=32, layers=("attn", "gdn"), attn_head_dim=16,
                    gdn_head_dim=16, mlp_dim=48)
  params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
  labels = {param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(param_labels(params))}
  muon = sorted(k for k, v in labels.items() if v == "muon")
  assert muon == sorted(
      [f"layer_0_attn/{n}/kernel" for n in ("q", "k", "v", "out")]
      + [f"layer_1_gdn/{n}_proj/kernel" for n in ("q", "k", "v", "a", "b", "gate", "out")]
      + [f"layer_{i}_mlp/{n}/kernel" for i in (0, 1) for n in ("gate", "up", "down")])
  adamw = sorted(k for k, v in labels.items() if v == "adamw")
  assert adamw == sorted(
      ["embedding/embedding", "head/kernel", "final_norm/scale", "layer_1_gdn/out_norm/scale"]
      + [f"layer_1_gdn/{n}_conv/kernel" for n in ("q", "k", "v")]
      + [f"layer_{i}_{n}/scale" for i in (0, 1) for n in ("mixer_norm", "mlp_norm")])
  assert sorted(k for k, v in labels.items() if v == "gates") == [
      "layer_1_gdn/A_log", "layer_1_gdn/dt_bias"]
  assert set(labels.values()) == {"muon", "adamw", "gates"}


def _one_update(cfg, params, grads):
  optimizer = make_optimizer(cfg)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return {param_path(p): np.asarray(u) for p, u in jax.tree_util.tree_leaves_with_path(updates)}


def test_gate_lr_moves_only_the_gates():
  # One parameter of each label, named as in the model (the labels read only the paths).
  shapes = {"layer_1_gdn": {"A_log": (4,), "dt_bias": (4,), "q_proj": {"kernel": (8, 8)},
                            "out_norm": {"scale": (8,)}},
            "head": {"kernel": (8, 5)}}
  params = jax.tree.map(lambda s: jnp.ones(s), shapes, is_leaf=lambda x: isinstance(x, tuple))
  labels = {param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(param_labels(params))}
  assert labels == {"layer_1_gdn/A_log": "gates", "layer_1_gdn/dt_bias": "gates",
                    "layer_1_gdn/q_proj/kernel": "muon", "layer_1_gdn/out_norm/scale": "adamw",
                    "head/kernel": "adamw"}
  grads = jax.tree.map(lambda x: 1e-3 * jnp.cos(jnp.arange(x.size) + 1.0).reshape(x.shape),
                       params)
  base = OptimizerConfig(total_steps=10, warmup_steps=0, adamw_lr=5e-5)
  default = _one_update(base, params, grads)
  same = _one_update(dataclasses.replace(base, gate_lr=5e-5), params, grads)
  fast = _one_update(dataclasses.replace(base, gate_lr=1e-3), params, grads)
  for path in default:
    np.testing.assert_allclose(same[path], default[path], rtol=1e-6, atol=0)
    if path.endswith(("A_log", "dt_bias")):
      np.testing.assert_allclose(fast[path], 20 * default[path], rtol=1e-4)  # Adam: step ~ lr
    else:
      np.testing.assert_array_equal(fast[path], default[path])
  # Without GDN layers there is no gate parameter; the optimizer still works.
  no_gates = {"head": params["head"]}
  assert jax.tree.leaves(param_labels(no_gates)) == ["adamw"]
  _one_update(dataclasses.replace(base, gate_lr=1e-3), no_gates, {"head": grads["head"]})


def test_optimizer_config_defaults_and_errors():
  cfg = OptimizerConfig(total_steps=10, warmup_steps=2)
  assert (cfg.muon_momentum, cfg.muon_nesterov) == (0.95, True)
  assert cfg.gate_lr is None
  for field, value in (("muon_momentum", 1.0), ("weight_decay", -1.0), ("b2", float("nan")),
                       ("clip_norm", 0.0), ("muon_nesterov", 1), ("gate_lr", 0.0),
                       ("gate_lr", "1e-3")):
    with pytest.raises(ValueError, match=f"OptimizerConfig.{field}"):
      OptimizerConfig(total_steps=10, warmup_steps=2, **{field: value})
  # From a config section: unknown keys refused by name, errors named at the section's path.
  with pytest.raises(FieldError, match=r"^OptimizerConfig: unknown field\(s\) \['b3'\]; allowed"):
    OptimizerConfig.from_mapping({"total_steps": 10, "b3": 0.9})
  with pytest.raises(FieldError, match=r"^config\.optimizer\.b1: must be in \[0, 1\), got 1\.0$"):
    OptimizerConfig.from_mapping({"total_steps": 200, "b1": 1.0}, path="config.optimizer")


def test_floors_of_a_hand_made_set():
  # 4 examples, answers at positions 1 and 3 (groups 0 and 1).
  targets = np.array([[0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 0, 1]])
  mask = np.zeros((4, 4), np.float32)
  mask[:, [1, 3]] = 1
  group = np.tile([-1, 0, -1, 1], (4, 1))
  f = floors(targets, mask, group)
  assert f["floor_exact"] == 0.5                      # majority (1, 1): examples 0 and 3
  assert f["floor_answer"] == 0.75                    # each position right 3 times of 4
  hit = targets == np.array([0, 1, 0, 0])
  np.testing.assert_allclose(answer_accuracy(hit, mask > 0, group), [0.75, 0.25])


def test_rule110_majority_floor_is_above_chance():
  """paper.md: always answering the majority bit scores ~9.4% exact at t = 12, not 1/16."""
  task = make_task({"name": "rule110", "t": 12})
  batch = task.eval_examples("t12", np.arange(4096))
  f = floors(batch["targets"], batch["loss_mask"], batch["answer_group"])
  assert 0.085 < f["floor_exact"] < 0.105 and f["floor_exact"] > task.chance("t12")[
      "exact_accuracy"]
  assert 0.54 < f["floor_answer"] < 0.57


def test_a_shortcut_takes_its_fields_type():
  import ml_collections

  from experiments.common import apply_shortcuts
  c = ml_collections.ConfigDict({"name": "x", "flag": True, "rate": 0.5, "tag": "a"})
  shortcuts = {"f": ("flag",), "r": ("rate",), "t": ("tag",)}
  apply_shortcuts(c, {"f": "False", "r": "2e-3", "t": "7"}, shortcuts)
  assert (c.flag, c.rate, c.tag) == (False, 2e-3, "7")
  with pytest.raises(ValueError, match=r"^x config: f='0': must be true or false$"):
    apply_shortcuts(c, {"f": "0"}, shortcuts)


def test_experiment_config_args():
  from experiments import depo, long_context, rule110
  with pytest.raises(ValueError, match="rule110 config: unknown preset 'tiny'"):
    rule110.get_config("tiny")
  with pytest.raises(ValueError, match="depo config: unknown override 'M'"):
    depo.get_config("M=2")
  with pytest.raises(ValueError, match=r"^rule110 config: steps='2k': must be an integer$"):
    rule110.get_config("steps=2k")
  with pytest.raises(ValueError, match=r"^depo config: full_share='half': must be a number$"):
    depo.get_config("full_share=half")
  with pytest.raises(ValueError, match=r"^long_context config: steps='2k': must be an integer$"):
    long_context.get_config("steps=2k")
  assert long_context.get_config("smoke").name == "long_context"
  c = rule110.get_config("paper,N=4,t=32,seeds=3,dtype=bfloat16")
  assert (c.model.passes, c.task.t, c.seeds, c.model.dtype, c.model.window) == (
      4, 32, 3, "bfloat16", 24)
  c = depo.get_config("small,N=2,recipe=full_harmonic_gates,full_share=0.25")
  assert (c.model.passes, c.task.full_share, c.task.hop_law, c.optimizer.gate_lr,
          c.model.d_model) == (2, 0.25, "harmonic", 1e-3, 256)
  c = depo.get_config("recipe=original")
  assert (c.task.wrap, c.optimizer.gate_lr, c.model.d_model) == (True, 5e-5, 512)
  with pytest.raises(ValueError, match="depo config: unknown recipe 'best'; allowed: "):
    depo.get_config("recipe=best")
  for module in (rule110, depo):     # every sweep entry is a valid config
    for runs in module.SWEEPS.values():
      for arg in runs:
        module.get_config(arg)
