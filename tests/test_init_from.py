"""`config.init_from`: a run starts from a converted checkpoint's (or an earlier stage's)
parameters with a fresh optimizer, through `experiments/pretrained_gsm.py` on a tiny GGUF written
by tests/test_pretrained.py's helpers. Default suite: a checkpoint whose parameter tree does not
fit the config is refused by name before the workdir is claimed. `slow`: the reference run's
step-0 loss equals the NumPy oracle's on the same batch; stage 1 moves only the inserted layers;
stage 2, started from stage 1, starts at stage 1's final loss and moves everything.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from experiments.pretrained_gsm import get_config  # noqa: E402
from sleep_lm.common.errors import UserError  # noqa: E402
from sleep_lm.pretrained import Reference, load  # noqa: E402
from sleep_lm.pretrained.convert import convert  # noqa: E402
from sleep_lm.training import trainer  # noqa: E402
from sleep_lm.training.run_config import RunConfig  # noqa: E402
from sleep_lm.training.step import loss_fn  # noqa: E402
from tests.test_pretrained import hf_weights, write_gguf  # noqa: E402
from tests.workdirs import latest_params  # noqa: E402

quiet = lambda *_: None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("conv")
  source = write_gguf(root / "tiny.gguf", hf_weights("llama", seed=5))
  return source, convert(source, root / "gdn", gdn_layers=(1,), log=quiet)


def first_loss(path) -> float:
  records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
  return next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 1)


def train(config, path):
  run = RunConfig.checked(config)
  trainer.train(run, path, log=quiet)
  return run


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(converted, tmp_path):
  _, gdn = converted
  c = get_config(f"smoke,stage=1,init={gdn}")
  c.model.layers = ("attn", "attn")              # the model without the inserted layer
  c.model.mlp_layers = None
  c.optimizer.train_layers = (1,)
  with pytest.raises(UserError, match=r"config.init_from = .*not in config.model: "
                                      r"\['layer_1_gdn/"):
    trainer.train(RunConfig.checked(c), tmp_path / "run", log=quiet)
  assert not (tmp_path / "run").exists()         # refused before the workdir was claimed
  c = get_config(f"smoke,stage=1,init={gdn}")
  c.init_from = str(tmp_path / "nowhere")
  with pytest.raises(UserError, match=r"config.init_from = .*nowhere.*config.json not found"):
    trainer.train(RunConfig.checked(c), tmp_path / "run2", log=quiet)
  with pytest.raises(ValueError, match="give init=<workdir>"):
    get_config("smoke")


def test_small_preset_scans_the_layer_groups(converted):
  """The small preset sets `model.scan_layers` (the converted model's layers, A G A here, and
  the same parameters: init_from's check passes); smoke keeps the default (off)."""
  _, gdn = converted
  # L = 1100: the tiny tokenizer's answer region (positions 1983..2054) in one window.
  small = RunConfig.checked(get_config(f"small,stage=1,L=1100,init={gdn}"))
  assert small.model.scan_layers and small.model.layers == ("attn", "gdn", "attn")
  from sleep_lm.training import init_from
  mesh, boxed = trainer.setup(small)
  init_from.check(small, boxed)
  assert not RunConfig.checked(get_config(f"smoke,stage=1,init={gdn}")).model.scan_layers


@pytest.mark.slow
def test_reference_step0_loss_equals_the_numpy_oracle(converted, tmp_path):
  source, _ = converted
  plain = convert(source, tmp_path / "plain", log=quiet)
  run = train(get_config(f"smoke,reference,init={plain}"), tmp_path / "ref")
  batch = run.task.train_examples(0, np.arange(run.batch_size, dtype=np.uint64))
  ref = Reference(load(source)[0], np.float64)
  ce, n = 0.0, 0.0
  for ids, tgt, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"], strict=True):
    logits = ref.logits(ids.tolist())
    top = logits.max(-1, keepdims=True)
    lse = (top[:, 0] + np.log(np.exp(logits - top).sum(-1)))
    ce += ((lse - logits[np.arange(len(tgt)), tgt]) * mask).sum()
    n += mask.sum()
  assert first_loss(tmp_path / "ref") == pytest.approx(ce / n, rel=1e-5)


@pytest.mark.slow
def test_two_stages_move_the_new_layers_then_everything(converted, tmp_path):
  import jax
  _, gdn = converted
  start = latest_params(gdn)
  s1 = tmp_path / "s1"
  run1 = train(get_config(f"smoke,stage=1,N=2,init={gdn}"), s1)
  # Step 0 of stage 1: the converted model's loss on the first batch (hard eviction, N = 2).
  batch = run1.task.train_examples(0, np.arange(run1.batch_size, dtype=np.uint64))
  one = jax.tree.map(lambda x: x[0], start)
  want = float(loss_fn(one, run1.model, batch)[0])
  assert first_loss(s1) == pytest.approx(want, rel=1e-5)
  after1 = latest_params(s1)
  flat = lambda p: dict(jax.tree_util.tree_flatten_with_path(p)[0])
  for path, value in flat(after1).items():
    moved = not np.array_equal(value, flat(start)[path])
    assert moved == ("layer_1_" in jax.tree_util.keystr(path)), path
  s2 = tmp_path / "s2"
  run2 = train(get_config(f"smoke,stage=2,N=2,init={s1}"), s2)
  assert run2.optimizer.train_layers is None
  one = jax.tree.map(lambda x: x[0], after1)
  assert first_loss(s2) == pytest.approx(float(loss_fn(one, run2.model, batch)[0]), rel=1e-5)
  after2 = latest_params(s2)
  for path, value in flat(after2).items():
    assert not np.array_equal(value, flat(after1)[path]), path
