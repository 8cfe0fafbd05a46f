"""Tests for the Rule 110 task data: automaton, layout, determinism, grain input, TFDS eval sets."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sleep_lm.tasks import base, eval_sets, make_task, train_dataset
from sleep_lm.tasks.rule110 import QUERY, SEQ_LEN, Rule110Task, evolve, rule110_step

ROOT = Path(__file__).resolve().parents[1]


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
  task = make_task({"name": "rule110", "t": 5, "seed": 2})
  ds = train_dataset(task, 8)
  for step in (0, 1, 37):
    item = ds[step]
    direct = Rule110Task(seed=2, t=5).batch(np.arange(step * 8, step * 8 + 8))
    assert item.keys() == direct.keys()
    for k in direct:
      assert item[k].shape == (8, SEQ_LEN)
      np.testing.assert_array_equal(item[k], direct[k])
  # Resuming at step s is indexing from s.
  resumed = next(iter(ds[37:].to_iter_dataset()))
  np.testing.assert_array_equal(resumed["inputs"], ds[37]["inputs"])
  pickle.loads(pickle.dumps(base._StepBatch(task, 8, (0,), 0, 1, False)))  # for grain workers


def test_seed_streams_are_stacked_and_seed_zero_is_the_plain_stream():
  task = make_task({"name": "rule110", "t": 5, "seed": 2})
  plain = train_dataset(task, 8)[3]
  seeded = train_dataset(task, 8, data_seeds=(0, 1, 5))[3]
  assert seeded["inputs"].shape == (3, 8, SEQ_LEN)
  np.testing.assert_array_equal(seeded["inputs"][0], plain["inputs"])
  np.testing.assert_array_equal(seeded["inputs"][2],
                                Rule110Task(seed=7, t=5).batch(np.arange(24, 32))["inputs"])
  assert not np.array_equal(seeded["inputs"][0], seeded["inputs"][1])


def test_shards_partition_batch():
  task = make_task({"name": "rule110", "t": 5, "seed": 2})
  full = train_dataset(task, 12)[4]
  shards = [train_dataset(task, 12, shard_index=k, shard_count=3)[4] for k in range(3)]
  for k in full:
    assert all(s[k].shape == (4, SEQ_LEN) for s in shards)
    np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), full[k])
  np.testing.assert_array_equal(
      np.concatenate([base.step_indices(4, 12, shard_index=k, shard_count=3) for k in range(3)]),
      np.arange(48, 60))


def test_tfds_eval_round_trip(tmp_path):
  task = make_task({"name": "rule110", "t": 8, "seed": 0})
  source = eval_sets.eval_source(task, "t8", size=4096, data_dir=tmp_path)
  assert len(source) == 4096
  expect = Rule110Task(seed=0, t=8, split="eval").batch(np.arange(4096))
  for i in (0, 1, 2047, 4095):
    rec = source[i]
    assert rec["index"] == i
    for k in base.BATCH_KEYS:
      assert rec[k].dtype == expect[k].dtype
      np.testing.assert_array_equal(rec[k], expect[k][i])
  batches = list(eval_sets.eval_batches(source, 1000))
  assert [b["inputs"].shape[0] for b in batches] == [1000] * 4 + [96]
  for k in base.BATCH_KEYS:
    np.testing.assert_array_equal(np.concatenate([b[k] for b in batches]), expect[k])
  assert len(list(eval_sets.eval_batches(source, 1000, drop_remainder=True))) == 4
  # A second call reuses the prepared files; another (t, size, seed) gets its own config.
  assert len(eval_sets.eval_source(task, "t8", size=4096, data_dir=tmp_path)) == 4096
  other = make_task({"name": "rule110", "t": 3, "seed": 7})
  small = eval_sets.eval_source(other, "t3", size=10, data_dir=tmp_path)
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
  with pytest.raises(ValueError, match="^t: must be an integer >= 0"):
    evolve(np.zeros(24, bool), -1)
  with pytest.raises(ValueError, match="states"):
    rule110_step(np.zeros(24, np.int32))
  iface = make_task({"name": "rule110", "t": 5})
  with pytest.raises(ValueError, match="batch_size"):
    train_dataset(iface, 10, shard_count=3)
  with pytest.raises(ValueError, match="shard_index"):
    train_dataset(iface, 12, shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="must be a sleep_lm Task"):
    train_dataset(task, 12)
  with pytest.raises(ValueError, match="eval_size"):
    eval_sets.make_config(iface, "t5", size=0)
  with pytest.raises(ValueError, match="unknown eval set 't4'"):
    iface.eval_examples("t4", np.arange(2))
  with pytest.raises(ValueError, match="eval_batch_size"):
    next(eval_sets.eval_batches([], 0))
  with pytest.raises(ValueError, match=r"config.task: unknown field\(s\) \['T'\]"):
    make_task({"name": "rule110", "T": 5})
  with pytest.raises(ValueError, match="config.task.name: must be one of"):
    make_task({"name": "rule30"})


def test_eval_sets_built_by_two_processes_at_once(tmp_path):
  """Parallel sweeps build the same eval set concurrently: both get it, whole (the loser of the
  final rename reuses the winner's files)."""
  script = ("import sys, numpy as np\n"
            "from sleep_lm.tasks import eval_sets, make_task\n"
            "task = make_task({'name': 'depo'})\n"
            "src = eval_sets.eval_source(task, 'k2', size=2048, data_dir=sys.argv[1])\n"
            "ok = (src[2047]['inputs'] == task.eval_examples('k2', np.arange(2047, 2048))"
            "['inputs'][0]).all()\n"
            "print(len(src), bool(ok))\n")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(3)]
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1].split() == ["2048", "True"]
