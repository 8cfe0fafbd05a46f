"""Tests for the Rule 110 task data: automaton, layout, determinism, grain input, TFDS eval sets."""

import pickle
import sys

import numpy as np
import pytest

from sleep_lm.data import rule110
from sleep_lm.data.rule110 import QUERY, SEQ_LEN, Rule110Task, evolve, rule110_step


# Independent reference: a state is a Python int (bit j = cell j); the new cell is the bit of the
# rule number selected by the neighbourhood (left, centre, right) read as a 3-bit number.
def _ref_step(x: int, n: int) -> int:
  out = 0
  for j in range(n):
    left, c, r = (x >> ((j - 1) % n)) & 1, (x >> j) & 1, (x >> ((j + 1) % n)) & 1
    out |= ((110 >> (left << 2 | c << 1 | r)) & 1) << j
  return out


def _ref_evolve(x: int, n: int, t: int) -> int:
  for _ in range(t):
    x = _ref_step(x, n)
  return x


def _to_int(bits) -> int:
  return sum(int(b) << j for j, b in enumerate(bits))


def _from_int(x: int, n: int) -> np.ndarray:
  return np.array([(x >> j) & 1 for j in range(n)], bool)


def test_step_matches_reference():
  rng = np.random.default_rng(0)
  for n in (3, 5, 24, 31):
    states = rng.integers(0, 2, (50, n)).astype(bool)
    for t in (1, 2, 7):
      got = evolve(states, t)
      for s, g in zip(states, got, strict=True):
        assert _to_int(g) == _ref_evolve(_to_int(s), n, t)


def test_single_cell_triangle():
  # Rule 110 from one live cell grows leftwards; rows read left to right, ending at the seed.
  rows = ["1", "11", "111", "1101", "11111", "110001", "1110011", "11010111"]
  n, seed = 24, 20
  state = np.zeros(n, bool)
  state[seed] = True
  for row in rows:
    expect = np.zeros(n, bool)
    expect[seed - len(row) + 1:seed + 1] = [c == "1" for c in row]
    np.testing.assert_array_equal(state, expect)
    state = rule110_step(state)


def test_periodic_wrap():
  state = np.zeros(24, bool)
  state[0] = True
  nxt = rule110_step(state)
  assert set(np.flatnonzero(nxt)) == {0, 23}  # the left neighbour of cell 0 is cell 23


def test_zeros_and_ones():
  zeros, ones = np.zeros((2, 24), bool), np.ones((2, 24), bool)
  assert not evolve(zeros, 5).any()
  assert not rule110_step(ones).any()  # 111 -> 0 everywhere


def test_example_layout():
  task = Rule110Task(seed=3, t=6)
  for i in (0, 1, 12345):
    ex = task.example(i)
    assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32
    assert ex["loss_mask"].dtype == np.float32
    assert all(v.shape == (SEQ_LEN,) for v in ex.values())
    qpos = [96, 98, 100, 102]
    np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]), qpos)
    np.testing.assert_array_equal(ex["loss_mask"][qpos], 1.0)
    np.testing.assert_array_equal(ex["inputs"][qpos], QUERY)
    assert set(np.unique(ex["inputs"][:96])) <= {0, 1}
    answers = [_ref_evolve(_to_int(ex["inputs"][24 * k:24 * (k + 1)]), 24, 6) & 1 for k in range(4)]
    np.testing.assert_array_equal(ex["targets"][qpos], answers)
    np.testing.assert_array_equal(ex["inputs"][[97, 99, 101, 103]], answers)  # fed back in
    np.testing.assert_array_equal(np.delete(ex["targets"], qpos), 0)


def test_t0_is_recall():
  ex = Rule110Task(seed=1, t=0).example(7)
  np.testing.assert_array_equal(ex["targets"][96::2], ex["inputs"][0:96:24])


def test_deterministic_and_distinct():
  a, b = Rule110Task(seed=5, t=4), Rule110Task(seed=5, t=4)
  for i in (0, 9, 2**40):
    for k, v in a.example(i).items():
      np.testing.assert_array_equal(v, b.example(i)[k])
  idx = np.array([3, 0, 77, 2**33])
  batch = a.batch(idx)
  for j, i in enumerate(idx):
    for k, v in a.example(int(i)).items():
      np.testing.assert_array_equal(batch[k][j], v)
  ctx = a.batch(np.arange(1000))["inputs"][:, :96]
  assert len({row.tobytes() for row in ctx}) == 1000
  other_seed = Rule110Task(seed=6, t=4).batch(np.arange(1000))["inputs"][:, :96]
  assert not (ctx == other_seed).all(axis=1).any()
  assert abs(ctx.mean() - 0.5) < 0.01  # hash bits are balanced
  # t changes only the answers, not the context.
  np.testing.assert_array_equal(Rule110Task(seed=5, t=9).example(9)["inputs"][:96],
                                a.example(9)["inputs"][:96])


def test_train_eval_disjoint():
  train = Rule110Task(seed=0, t=8).batch(np.arange(100_000))["inputs"][:, :96]
  ev = Rule110Task(seed=0, t=8, split="eval").batch(np.arange(4096))["inputs"][:, :96]
  train_set = {row.tobytes() for row in train}
  assert not any(row.tobytes() in train_set for row in ev)


def test_grain_dataset_matches_batches():
  task = Rule110Task(seed=2, t=5)
  ds = rule110.train_dataset(task, 8)
  for step in (0, 1, 37):
    item = ds[step]
    direct = task.batch(np.arange(step * 8, step * 8 + 8))
    assert item.keys() == direct.keys()
    for k in direct:
      assert item[k].shape == (8, SEQ_LEN)
      np.testing.assert_array_equal(item[k], direct[k])
  # Resuming at step s is indexing from s.
  resumed = next(iter(ds[37:].to_iter_dataset()))
  np.testing.assert_array_equal(resumed["inputs"], ds[37]["inputs"])
  pickle.loads(pickle.dumps(rule110._StepBatch(task, 8, 0, 1)))  # for grain worker processes


def test_shards_partition_batch():
  task = Rule110Task(seed=2, t=5)
  full = rule110.train_dataset(task, 12)[4]
  shards = [rule110.train_dataset(task, 12, shard_index=k, shard_count=3)[4] for k in range(3)]
  for k in full:
    assert all(s[k].shape == (4, SEQ_LEN) for s in shards)
    np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), full[k])
  np.testing.assert_array_equal(
      np.concatenate([rule110.step_indices(4, 12, shard_index=k, shard_count=3) for k in range(3)]),
      np.arange(48, 60))


def test_tfds_eval_round_trip(tmp_path):
  from sleep_lm.data import tfds_rule110

  source = tfds_rule110.eval_source(8, data_dir=tmp_path)
  assert len(source) == 4096
  task = Rule110Task(seed=tfds_rule110.EVAL_SEED, t=8, split="eval")
  expect = task.batch(np.arange(4096))
  for i in (0, 1, 2047, 4095):
    rec = source[i]
    assert rec["index"] == i
    for k in tfds_rule110.BATCH_KEYS:
      assert rec[k].dtype == expect[k].dtype
      np.testing.assert_array_equal(rec[k], expect[k][i])
  batches = list(tfds_rule110.eval_batches(source, 1000))
  assert [b["inputs"].shape[0] for b in batches] == [1000] * 4 + [96]
  for k in tfds_rule110.BATCH_KEYS:
    np.testing.assert_array_equal(np.concatenate([b[k] for b in batches]), expect[k])
  assert len(list(tfds_rule110.eval_batches(source, 1000, drop_remainder=True))) == 4
  # A second call reuses the prepared files; a custom (t, size, seed) gets its own config.
  assert len(tfds_rule110.eval_source(8, data_dir=tmp_path)) == 4096
  small = tfds_rule110.eval_source(3, data_dir=tmp_path, size=10, seed=7)
  np.testing.assert_array_equal(
      small[9]["inputs"], Rule110Task(seed=7, t=3, split="eval").example(9)["inputs"])
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("kwargs, field", [
    (dict(t=-1), "t"),
    (dict(t=1.5), "t"),
    (dict(seed=-3), "seed"),
    (dict(split="test"), "split"),
    (dict(num_states=0), "num_states"),
    (dict(state_bits=2), "state_bits"),
    (dict(state_bits=65), "state_bits"),
])
def test_bad_task_args(kwargs, field):
  with pytest.raises(ValueError, match=field):
    Rule110Task(**kwargs)


def test_bad_call_args():
  task = Rule110Task()
  with pytest.raises(ValueError, match="index"):
    task.example(-1)
  with pytest.raises(ValueError, match="indices"):
    task.batch(np.array([1, -2]))
  with pytest.raises(ValueError, match="^t must"):
    evolve(np.zeros(24, bool), -1)
  with pytest.raises(ValueError, match="states"):
    rule110_step(np.zeros(24, np.int32))
  with pytest.raises(ValueError, match="batch_size"):
    rule110.train_dataset(task, 10, shard_count=3)
  with pytest.raises(ValueError, match="shard_index"):
    rule110.train_dataset(task, 12, shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="split"):
    rule110.train_dataset(task.replace(split="eval"), 12)
  from sleep_lm.data import tfds_rule110
  with pytest.raises(ValueError, match="size"):
    tfds_rule110.make_config(8, size=0)
  with pytest.raises(ValueError, match="batch_size"):
    next(tfds_rule110.eval_batches([], 0))
