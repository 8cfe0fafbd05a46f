"""Tests for the Depo task: an independent parser and solver (edge direction included), layout,
purity, the three-way split disjointness, and the sampling laws."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest

from sleep_lm.tasks import depo, make_task
from sleep_lm.tasks.depo import DepoTask

# The format, spelled out here rather than imported, so the parser below is independent.
PAD, ARROW, COMMA, COLON, HOP0 = 0, 101, 102, 119, 102
NAMES = range(1, 101)
SPLITS = ("train", "eval", "valid")


def parse_graph(tokens):
  """Edges (u, v) in listed order from the graph region: PAD* then `u -> v ,` repeated."""
  tok = [int(t) for t in tokens[:300]]
  start = next((p for p, t in enumerate(tok) if t != PAD), 300)
  assert all(t != PAD for t in tok[start:]), "padding inside the graph"
  edges, chunk = [], []
  for t in tok[start:]:
    if t == COMMA:
      assert len(chunk) == 3 and chunk[1] == ARROW, f"malformed edge {chunk}"
      assert chunk[0] in NAMES and chunk[2] in NAMES
      edges.append((chunk[0], chunk[2]))
      chunk = []
    else:
      chunk.append(t)
  assert chunk == [], "the graph does not end with a comma"
  return edges


def walk(succ, x, k):
  for _ in range(k):
    x = succ[x]
  return x


def solve(ex):
  """Parses one example from its tokens alone, walks the directed cycle, checks every array.

  Returns (edges, queries as (k, X, Y), answers walking the reversed edges)."""
  tok = [int(t) for t in ex["inputs"]]
  assert len(tok) == 360
  n = int(ex["num_nodes"])
  edges = parse_graph(tok)
  assert len(edges) == n and 4 * n <= 300
  succ = dict(edges)
  pred = {v: u for u, v in edges}
  assert len(succ) == n and len(pred) == n and set(succ) == set(pred), "not a permutation"
  x, seen = edges[0][0], set()
  for _ in range(n):
    seen.add(x)
    x = succ[x]
  assert x == edges[0][0] and len(seen) == n, "not one cycle through all nodes"

  expect_mask = np.zeros(360, np.float32)
  expect_targets = np.zeros(360, np.int32)
  expect_group = np.full(360, -1, np.int32)
  queries, reversed_answers, p = [], [], 300
  while p < 360 and tok[p] != PAD:
    k, x, colon, y = tok[p:p + 4]
    k -= HOP0
    assert 1 <= k <= 16 and colon == COLON and x in succ, f"malformed query at {p}"
    assert y == walk(succ, x, k), f"wrong answer at {p + 3}"
    reversed_answers.append(walk(pred, x, k))
    expect_mask[p + 2], expect_targets[p + 2], expect_group[p + 2] = 1.0, y, len(queries)
    queries.append((k, x, y))
    p += 4
  assert all(t == PAD for t in tok[p:]), "query region not right-padded"
  assert len(queries) == 10 and p - 300 <= 60
  np.testing.assert_array_equal(ex["hops"], [q[0] for q in queries])
  np.testing.assert_array_equal(ex["loss_mask"], expect_mask)
  np.testing.assert_array_equal(ex["targets"], expect_targets)
  np.testing.assert_array_equal(ex["answer_group"], expect_group)
  sources = [q[1] for q in queries]
  counts = {s: sources.count(s) for s in set(sources)}
  if n >= 10:
    assert len(counts) == 10
  else:
    assert len(counts) == n and set(counts.values()) <= {10 // n, -(-10 // n)}
  return edges, queries, reversed_answers


def _rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["inputs"]))]


@pytest.mark.parametrize("task, count", [
    (DepoTask(seed=0), 150),
    (DepoTask(seed=1, split="valid", node_law="uniform", full_share=0.3, hop_law="harmonic"), 60),
    (DepoTask(seed=2, wrap=True, hops=16, num_nodes=4), 30),
    (DepoTask(seed=3, wrap=True, node_law="uniform"), 60),
    (DepoTask(seed=5, split="eval", num_nodes=9), 30),
] + [(DepoTask(seed=6, split="eval", hops=k, num_nodes=75), 20) for k in depo.EVAL_HOPS])
def test_independent_solver(task, count):
  batch = task.batch(np.arange(count) * 7919)
  for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("answer_group", np.int32)]:
    assert batch[key].shape == (count, 360) and batch[key].dtype == dtype
  assert batch["hops"].shape == (count, 10) and batch["num_nodes"].shape == (count,)
  if task.hops is not None:
    assert (batch["hops"] == task.hops).all()
  if task.num_nodes is not None:
    assert (batch["num_nodes"] == task.num_nodes).all()
  in_order = distinguishing = 0
  for ex in _rows(batch):
    edges, queries, reversed_answers = solve(ex)
    in_order += all(a[1] == b[0] for a, b in zip(edges, edges[1:], strict=False))
    assert 0 <= ex["inputs"].min() and ex["inputs"].max() < depo.VOCAB_SIZE
    assert not ex["loss_mask"][:300].any()  # graph windows hold no supervised token
    # Direction matters: walking the reversed edges gives another answer unless 2k = 0 mod n.
    n = int(ex["num_nodes"])
    for (k, _, y), y_rev in zip(queries, reversed_answers, strict=True):
      assert (y_rev == y) == ((2 * k) % n == 0)
      distinguishing += y_rev != y
  if task.num_nodes != 4:                 # at n = 4, k = 16: 2k = 0 mod n, both walks agree
    assert distinguishing > 5 * count
  # Shuffled edge lists: listing in cycle order has probability ~1/(n-1)! for one example.
  assert in_order <= count // 5 if task.num_nodes in (None, 4) else in_order == 0


def test_direction_is_read_from_the_arrows():
  """Swap each edge's two names: the solver walks the reversed cycle and every stored answer
  (k < n, 2k != n) disagrees with it, so the arrow, not the position, carries the direction."""
  ex = DepoTask(seed=4, split="eval", hops=2, num_nodes=75).example(3)
  flipped = ex["inputs"].copy()
  flipped[0:300:4], flipped[2:300:4] = ex["inputs"][2:300:4], ex["inputs"][0:300:4]
  succ_flipped = dict(parse_graph(flipped))
  succ = dict(parse_graph(ex["inputs"]))
  for k, x, y in solve(ex)[1]:
    assert walk(succ, x, k) == y != walk(succ_flipped, x, k)


def test_lengths_and_padding():
  batch = DepoTask(seed=8, node_law="uniform").batch(np.arange(400))
  n = batch["num_nodes"]
  graph = batch["inputs"][:, :300]
  assert ((graph != PAD).sum(1) == 4 * n).all()                   # left-padded, no pad inside
  assert ((graph[:, :-1] != PAD) <= (graph[:, 1:] != PAD)).all()
  queries = batch["inputs"][:, 300:]
  assert ((queries != PAD).sum(1) == 40).all() and (queries[:, 40:] == PAD).all()
  full = DepoTask(split="eval", hops=1, num_nodes=75).batch(np.arange(8))["inputs"]
  assert (full[:, :300] != PAD).all()                              # 75 edges fill 300 tokens


def test_render_and_constants():
  assert depo.SEQ_LEN == depo.GRAPH_LEN + depo.QUERY_LEN == 360
  assert depo.VOCAB_SIZE == 120 and depo.WINDOW == 75 and depo.GRAPH_LEN == 4 * depo.WINDOW
  assert (depo.PAD, depo.ARROW, depo.COMMA, depo.COLON, depo.HOP_BASE) == (
      PAD, ARROW, COMMA, COLON, HOP0)
  assert depo.NUM_NAMES >= depo.MAX_NODES
  text = depo.render(DepoTask(seed=0, num_nodes=5, hops=2).example(0))
  graph, *queries, pads = text.split("\n")
  assert graph.startswith("[280 x PAD] ") and graph.count("->") == 5 and graph.count(",") == 5
  assert len(queries) == 10 and all(q.startswith("<2> n") and " : n" in q for q in queries)
  assert pads == "[20 x PAD]"


def test_deterministic_and_distinct():
  a = DepoTask(seed=5, node_law="uniform", full_share=0.5, hop_law="harmonic")
  b = pickle.loads(pickle.dumps(a))
  assert a == b and hash(a) == hash(b)
  idx = np.array([3, 0, 77, 2**40, 2**64 - 1], np.uint64)
  batch = a.batch(idx)
  for j, i in enumerate(idx):
    ex, ex2 = a.example(int(i)), b.example(int(i))
    for k, v in ex.items():
      np.testing.assert_array_equal(batch[k][j], v)
      np.testing.assert_array_equal(ex2[k], v)
  np.testing.assert_array_equal(a.batch(idx[::-1])["inputs"], batch["inputs"][::-1])
  graphs = a.batch(np.arange(500))["inputs"]
  assert len({row.tobytes() for row in graphs}) == 500
  for other in (a.replace(seed=6), a.replace(split="eval"), a.replace(split="valid")):
    assert not (graphs == other.batch(np.arange(500))["inputs"]).all(axis=1).any()


def test_eval_sets_are_paired_across_k():
  sets = [DepoTask(seed=9, split="eval", hops=k, num_nodes=75).batch(np.arange(50))
          for k in depo.EVAL_HOPS]
  for s, k in zip(sets, depo.EVAL_HOPS, strict=True):
    np.testing.assert_array_equal(s["inputs"][:, :300], sets[0]["inputs"][:, :300])
    np.testing.assert_array_equal(s["inputs"][:, 301:340:4], sets[0]["inputs"][:, 301:340:4])
    assert (s["hops"] == k).all()


# Independent fingerprint, from the documented definition: edge hash = mix(((u << 16) | v) ^ KEY)
# of the two name tokens; fingerprint = mix((sum of edge hashes mod 2^64) ^ KEY).
_M = (1 << 64) - 1
_KEY = 0x6470_F19E_4E00_0002


def _mix(z):
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
  return z ^ (z >> 31)


def _py_fingerprint(edges):
  return _mix((sum(_mix(((u << 16) | v) ^ _KEY) for u, v in edges) & _M) ^ _KEY)


def _with_edges(row, edges):
  graph = [t for u, v in edges for t in (u, ARROW, v, COMMA)]
  out = np.array(row)
  out[:300] = [PAD] * (300 - len(graph)) + graph
  return out


def test_three_splits_are_disjoint_by_fingerprint_class():
  law = dict(node_law="uniform", full_share=0.5)
  rows = {"train": DepoTask(seed=0, **law).batch(np.arange(2000))["inputs"],
          "eval": np.concatenate([DepoTask(seed=0, split="eval", hops=1, num_nodes=75).batch(
              np.arange(300))["inputs"], DepoTask(seed=0, split="eval", **law).batch(
              np.arange(300))["inputs"]]),
          "valid": DepoTask(seed=0, split="valid", hops=2, num_nodes=75).batch(
              np.arange(300))["inputs"]}
  for split, r in rows.items():
    fp = depo.graph_fingerprint(r)
    assert (depo.split_of_fingerprint(fp) == split).all()
    for row in r[:15]:
      edges = parse_graph(row)
      assert int(depo.graph_fingerprint(row)) == _py_fingerprint(edges)
      random.Random(0).shuffle(edges)    # any listing order of the same edges: same fingerprint
      assert int(depo.graph_fingerprint(_with_edges(row, edges))) == _py_fingerprint(edges)
  edge_sets = {s: {frozenset(parse_graph(row)) for row in r} for s, r in rows.items()}
  assert not edge_sets["train"] & edge_sets["eval"]
  assert not edge_sets["train"] & edge_sets["valid"]
  assert not edge_sets["eval"] & edge_sets["valid"]
  # Without the rule the classes would be mixed: random cycles hit each with its share.
  rng = random.Random(1)
  fps = []
  for _ in range(400):
    names = rng.sample(NAMES, 20)
    fps.append(_py_fingerprint([(names[i], names[(i + 1) % 20]) for i in range(20)]))
  shares = [np.mean(depo.split_of_fingerprint(np.array(fps, np.uint64)) == s) for s in SPLITS]
  assert 0.42 < shares[0] < 0.58 and 0.17 < shares[1] < 0.33 and 0.17 < shares[2] < 0.33


def _assert_counts(counts, probs, total, bins):
  for lo, hi in bins:
    p = sum(probs.get(v, 0.0) for v in range(lo, hi + 1))
    sigma = math.sqrt(total * p * (1 - p)) + 1e-9
    assert abs(counts[lo:hi + 1].sum() - total * p) < 4.5 * sigma + 1e-6, (lo, hi)


@pytest.mark.parametrize("node_law, full_share", [("original", 0.0), ("uniform", 0.0),
                                                  ("uniform", 0.5), ("original", 0.25)])
def test_node_count_laws(node_law, full_share):
  probs = depo.node_count_probs(node_law, full_share)
  assert sorted(probs) == list(range(3, 76)) and sum(probs.values()) == pytest.approx(1.0)
  base = {"original": lambda n: 1 / (n + math.sqrt(75)), "uniform": lambda n: 1.0}[node_law]
  z = sum(base(n) for n in range(3, 76))
  for n, p in probs.items():
    assert p == pytest.approx((1 - full_share) * base(n) / z + full_share * (n == 75), rel=1e-12)
  total = 3000
  counts = np.bincount(DepoTask(seed=11, node_law=node_law, full_share=full_share).batch(
      np.arange(total))["num_nodes"], minlength=76)
  assert counts[:3].sum() == 0
  _assert_counts(counts, probs, total, [(3, 5), (6, 9), (10, 19), (20, 39), (40, 74), (75, 75)])


@pytest.mark.parametrize("hop_law", ["uniform", "harmonic"])
def test_hop_laws_and_no_wrap(hop_law):
  # At n = 75 the law is the whole law over 1..16.
  hops = DepoTask(seed=3, hop_law=hop_law, full_share=1.0).batch(np.arange(600))["hops"].ravel()
  probs = depo.hop_probs(hop_law)
  expect = {"uniform": lambda k: 1 / 16, "harmonic": lambda k: (1 / k) / sum(
      1 / j for j in range(1, 17))}[hop_law]
  assert sorted(probs) == list(range(1, 17))
  for k, p in probs.items():
    assert p == pytest.approx(expect(k), rel=1e-12)
  _assert_counts(np.bincount(hops, minlength=17), probs, len(hops),
                 [(k, k) for k in range(1, 17)])
  # Small graphs: no walk goes round the cycle, and k follows the law restricted to 1..n-1.
  batch = DepoTask(seed=4, hop_law=hop_law, node_law="uniform").batch(np.arange(3000))
  n = batch["num_nodes"][:, None].repeat(10, 1)
  assert (batch["hops"] < n).all()
  small = batch["hops"][n == 5]
  _assert_counts(np.bincount(small, minlength=17), depo.hop_probs(hop_law, 5), len(small),
                 [(1, 1), (2, 2), (3, 3), (4, 4)])
  assert depo.hop_probs(hop_law, 5, wrap=True) == probs


def test_wrap_restores_the_whole_law():
  batch = DepoTask(seed=12, wrap=True).batch(np.arange(2000))
  n = batch["num_nodes"][:, None].repeat(10, 1)
  assert (batch["hops"] >= n).mean() > 0.1          # the original's law: ~21% of queries wrap
  _assert_counts(np.bincount(batch["hops"].ravel(), minlength=17), depo.hop_probs(wrap=True),
                 batch["hops"].size, [(1, 4), (5, 8), (9, 12), (13, 16)])


def test_names_are_a_uniform_subset_of_the_pool():
  batch = DepoTask(seed=13, split="eval", hops=1, num_nodes=20).batch(np.arange(2000))
  names = np.stack([sorted(u for u, _ in parse_graph(r)) for r in batch["inputs"]])
  assert (np.diff(names, axis=1) > 0).all()         # 20 distinct names per graph
  counts = np.bincount(names.ravel(), minlength=101)[1:]
  expect = 2000 * 20 / 100
  assert (np.abs(counts - expect) < 4.5 * math.sqrt(expect * 0.8)).all()


def test_names_only_guesser_and_chance():
  batch = DepoTask(split="eval", hops=4, num_nodes=75).batch(np.arange(10))
  floor = depo.chance_floor(batch)
  assert floor == pytest.approx({"loss": math.log(74), "exact_match": 1 / 74})
  task = make_task({"name": "depo", "node_law": "uniform", "full_share": 0.5})
  assert task.chance("k8") == pytest.approx(
      {"loss": math.log(74), "answer_accuracy": 1 / 74, "exact_accuracy": 74.0**-10})
  # The training law: half the graphs at n = 75, half uniform over 3..75.
  law = task.chance("train_law")["answer_accuracy"]
  assert law == pytest.approx(0.5 / 74 + 0.5 * np.mean([1 / (n - 1) for n in range(3, 76)]))


def test_task_interface_sets_and_ids():
  task = make_task({"name": "depo", "seed": 2, "hop_law": "harmonic", "full_share": 0.5})
  assert task.eval_set_names() == ("k1", "k2", "k4", "k8", "k16", "train_law",
                                   "val_k1", "val_k2", "val_k4")
  ids = [task.eval_set_id(s) for s in task.eval_set_names()]
  assert len(set(ids)) == len(ids) and all(i.startswith("depo_arrows_") for i in ids)
  # The n = 75 sets do not depend on the training recipe; the training-law set does.
  other = make_task({"name": "depo", "seed": 2})
  assert other.eval_set_id("k2") == task.eval_set_id("k2")
  assert other.eval_set_id("train_law") != task.eval_set_id("train_law")
  val, held = task.eval_examples("val_k2", np.arange(64)), task.eval_examples("k2", np.arange(64))
  assert (depo.split_of_fingerprint(depo.graph_fingerprint(val["inputs"])) == "valid").all()
  assert (depo.split_of_fingerprint(depo.graph_fingerprint(held["inputs"])) == "eval").all()
  law = task.generator("train_law").batch(np.arange(64))
  assert (depo.split_of_fingerprint(depo.graph_fingerprint(law["inputs"])) == "eval").all()
  train = task.train_examples(1, np.arange(64))
  assert set(train) == {"inputs", "targets", "loss_mask", "answer_group"}
  np.testing.assert_array_equal(train["inputs"], DepoTask(
      seed=3, hop_law="harmonic", full_share=0.5).batch(np.arange(64))["inputs"])
  assert task.layout_mask()[300:340:4].sum() == 0 and task.layout_mask().sum() == 10


@pytest.mark.parametrize("kwargs, field", [
    (dict(seed=-3), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(split="test"), "split"),
    (dict(hops=0), "hops"),
    (dict(hops=17, wrap=True), "hops"),
    (dict(hops=True), "hops"),
    (dict(hops=4, num_nodes=75, wrap=1), "wrap"),
    (dict(hops=4), "hops"),                       # no wrap: needs a fixed n > 4
    (dict(hops=4, num_nodes=4), "hops"),
    (dict(num_nodes=2), "num_nodes"),
    (dict(num_nodes=76), "num_nodes"),
    (dict(num_nodes="75"), "num_nodes"),
    (dict(node_law="zipf"), "node_law"),
    (dict(hop_law="geometric"), "hop_law"),
    (dict(full_share=1.5), "full_share"),
    (dict(full_share="0.5"), "full_share"),
])
def test_bad_task_args(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}: "):
    DepoTask(**kwargs)


@pytest.mark.parametrize("values, message", [
    ({"node_law": "zipf"}, r"config.task.node_law: must be one of \('original', 'uniform'\)"),
    ({"full_share": -0.1}, r"config.task.full_share: must be a number in \[0, 1\]"),
    ({"hop_law": "x"}, r"config.task.hop_law: must be one of \('uniform', 'harmonic'\)"),
    ({"wrap": "yes"}, "config.task.wrap: must be True or False"),
    ({"train_num_nodes": None}, "config.task.train_num_nodes: this config is of the old Depo"),
    ({"hops": 2}, r"config.task: unknown field\(s\) \['hops'\]"),
])
def test_config_errors_name_the_field(values, message):
  with pytest.raises(ValueError, match=message):
    make_task({"name": "depo", **values})


def test_bad_call_args():
  task = DepoTask()
  with pytest.raises(ValueError, match="index"):
    task.example(-1)
  with pytest.raises(ValueError, match="indices"):
    task.batch(np.array([1, -2]))
  with pytest.raises(ValueError, match="indices"):
    task.batch(np.array([[1]]))
  with pytest.raises(ValueError, match="inputs"):
    depo.graph_fingerprint(np.zeros(300, np.int32))
  with pytest.raises(ValueError, match="unknown eval set 'k3'"):
    make_task({"name": "depo"}).eval_examples("k3", np.arange(2))
