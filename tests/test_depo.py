"""Tests for the Depo task: an independent parser and solver, layout, purity, disjointness, laws."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest

from sleep_lm.tasks import depo
from sleep_lm.tasks.depo import DepoTask

# The format, spelled out here rather than imported, so the parser below is independent.
PAD, SEP, HOP0 = 0, 117, 100
INNER = range(1, 51)
END = range(51, 101)


def _read_name(tokens, p):
  """Name starting at position p: (tuple of tokens, next position)."""
  if tokens[p] in INNER:
    assert tokens[p + 1] in END, f"inner token not followed by an end token at {p}"
    return (tokens[p], tokens[p + 1]), p + 2
  assert tokens[p] in END, f"expected a name at {p}, got {tokens[p]}"
  return (tokens[p],), p + 1


def solve(ex):
  """Parses one example from its tokens alone, walks the cycle, checks every array.

  Returns (edges in listed order, {name: successor}).
  """
  tok = [int(t) for t in ex["inputs"]]
  assert len(tok) == 360
  n = int(ex["num_nodes"])
  # Graph region: PAD* then names, exactly filling up to position 300.
  start = next(p for p, t in enumerate(tok[:300] + [-1]) if t != PAD)
  assert start < 300, "empty graph"
  names, p = [], start
  while p < 300:
    name, p = _read_name(tok, p)
    names.append(name)
  assert p == 300, "a name straddles the graph/query boundary"
  assert len(names) == 2 * n
  edges = list(zip(names[::2], names[1::2], strict=True))
  succ = dict(edges)
  assert len(succ) == n, "a node has two out-edges"
  assert sorted(succ.values()) == sorted(succ), "in-edges do not match out-edges"
  assert all(len(x) in (1, 2) for x in succ)
  # One cycle through all n nodes.
  x, seen = edges[0][0], set()
  for _ in range(n):
    seen.add(x)
    x = succ[x]
  assert x == edges[0][0] and len(seen) == n

  # Query region: n_q queries "HOP_k X SEP Y", then PAD to the end.
  expect_mask = np.zeros(360, np.float32)
  expect_targets = np.zeros(360, np.int32)
  expect_group = np.full(360, -1, np.int32)
  hops, sources, p = [], [], 300
  while p < 360 and tok[p] != PAD:
    k = tok[p] - HOP0
    assert 1 <= k <= 16, f"expected a hop token at {p}, got {tok[p]}"
    src, p = _read_name(tok, p + 1)
    assert tok[p] == SEP
    y = src
    for _ in range(k):
      y = succ[y]
    for j, t in enumerate(y):
      assert tok[p + 1 + j] == t, f"wrong answer token at {p + 1 + j}"
      expect_mask[p + j] = 1.0
      expect_targets[p + j] = t
      expect_group[p + j] = len(hops)
    p += 1 + len(y)
    hops.append(k)
    sources.append(src)
  assert all(t == PAD for t in tok[p:]), "query region not right-padded"
  assert len(hops) == 10
  np.testing.assert_array_equal(ex["hops"], hops)
  np.testing.assert_array_equal(ex["loss_mask"], expect_mask)
  np.testing.assert_array_equal(ex["targets"], expect_targets)
  np.testing.assert_array_equal(ex["answer_group"], expect_group)
  # Sources: distinct when n >= 10, else every node asked floor or ceil(10 / n) times.
  counts = {s: sources.count(s) for s in set(sources)}
  if n >= 10:
    assert len(counts) == 10
  else:
    assert len(counts) == n and set(counts.values()) <= {10 // n, -(-10 // n)}
  return edges, succ


def _rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["inputs"]))]


@pytest.mark.parametrize("task, count", [
    (DepoTask(seed=0), 200),
    (DepoTask(seed=1, split="eval"), 60),
    (DepoTask(seed=2, hops=16, num_nodes=4), 30),
    (DepoTask(seed=3, hops=7), 30),
    (DepoTask(seed=4, num_nodes=75), 30),
    (DepoTask(seed=5, split="eval", num_nodes=9), 30),
] + [(DepoTask(seed=6, split="eval", hops=k, num_nodes=75), 20) for k in depo.EVAL_HOPS])
def test_independent_solver(task, count):
  batch = task.batch(np.arange(count) * 7919)
  assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
  assert batch["loss_mask"].dtype == np.float32 and batch["answer_group"].dtype == np.int32
  assert batch["hops"].dtype == np.int32 and batch["num_nodes"].dtype == np.int32
  for key in ("inputs", "targets", "loss_mask", "answer_group"):
    assert batch[key].shape == (count, 360)
  assert batch["hops"].shape == (count, 10) and batch["num_nodes"].shape == (count,)
  if task.hops is not None:
    assert (batch["hops"] == task.hops).all()
  if task.num_nodes is not None:
    assert (batch["num_nodes"] == task.num_nodes).all()
  in_order = 0
  for ex in _rows(batch):
    edges, _ = solve(ex)
    in_order += all(a[1] == b[0] for a, b in zip(edges, edges[1:], strict=False))
    assert ex["inputs"].max() < depo.VOCAB_SIZE and ex["inputs"].min() >= 0
    assert not ex["loss_mask"][:300].any()  # graph windows hold no supervised token
  # Shuffled edge lists: listing in cycle order has probability ~1/(n-1)! for one example.
  assert in_order <= count // 5 if task.num_nodes in (None, 4) else in_order == 0


def test_render_and_constants():
  assert depo.SEQ_LEN == depo.GRAPH_LEN + depo.QUERY_LEN == 360
  assert depo.VOCAB_SIZE == 118 and depo.WINDOW == 75 and depo.GRAPH_LEN == 4 * depo.WINDOW
  assert (depo.PAD, depo.ANSWER_SEP, depo.HOP_BASE) == (PAD, SEP, HOP0)
  text = depo.render(DepoTask(seed=0, num_nodes=5, hops=2).example(0))
  graph, *queries, pads = text.split("\n")
  assert graph.count(">") == 5 and len(queries) == 10 and all(q.startswith("<2> ") for q in queries)
  assert pads == f"[{60 - sum(len(q.split()) + q.count('_') for q in queries)} x PAD]"


def test_deterministic_and_distinct():
  a = DepoTask(seed=5)
  b = pickle.loads(pickle.dumps(DepoTask(seed=5)))
  assert a == b and hash(a) == hash(b)
  idx = np.array([3, 0, 77, 2**40, 2**64 - 1], np.uint64)
  batch = a.batch(idx)
  for j, i in enumerate(idx):
    ex, ex2 = a.example(int(i)), b.example(int(i))
    for k, v in ex.items():
      np.testing.assert_array_equal(batch[k][j], v)
      np.testing.assert_array_equal(ex2[k], v)
  # Position in the batch does not matter.
  np.testing.assert_array_equal(a.batch(idx[::-1])["inputs"], batch["inputs"][::-1])
  graphs = a.batch(np.arange(500))["inputs"]
  assert len({row.tobytes() for row in graphs}) == 500
  other = DepoTask(seed=6).batch(np.arange(500))["inputs"]
  assert not (graphs == other).all(axis=1).any()
  ev = DepoTask(seed=5, split="eval").batch(np.arange(500))["inputs"]
  assert not (graphs == ev).all(axis=1).any()


def test_eval_sets_are_paired_across_k():
  # The graph and query sources do not depend on k: eval sets differ only in k and answers.
  sets = [DepoTask(seed=9, split="eval", hops=k, num_nodes=75).batch(np.arange(50))
          for k in depo.EVAL_HOPS]
  src = [[[q[1] for q in _queries(row)] for row in s["inputs"]] for s in sets]
  for s, sr in zip(sets[1:], src[1:], strict=True):
    np.testing.assert_array_equal(s["inputs"][:, :300], sets[0]["inputs"][:, :300])
    assert sr == src[0]
  for s, k in zip(sets, depo.EVAL_HOPS, strict=True):
    assert (s["hops"] == k).all()


def _queries(row):
  """(k, X, Y) per query from the tokens."""
  tok, out, p = [int(t) for t in row], [], 300
  while p < 360 and tok[p] != PAD:
    x, p = _read_name(tok, p + 1)
    y, q = _read_name(tok, p + 1)
    out.append((tok[p - 1 - len(x)] - HOP0, x, y))
    p = q
  return out


# Independent fingerprint, from the documented definition: code(name) = 128 * inner + end
# (inner = 0 for a 1-token name); edge hash = mix(code(u) << 16 | code(v) ^ KEY); fingerprint =
# mix((sum of edge hashes mod 2^64) ^ KEY).
_M = (1 << 64) - 1
_KEY = 0x6470_F19E_4E00_0001


def _mix(z):
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
  return z ^ (z >> 31)


def _code(name):
  return 128 * name[0] + name[1] if len(name) == 2 else name[0]


def _py_fingerprint(edges):
  total = sum(_mix(((_code(u) << 16) | _code(v)) ^ _KEY) for u, v in edges) & _M
  return _mix(total ^ _KEY)


def test_train_eval_disjoint_by_fingerprint_parity():
  tr = DepoTask(seed=0).batch(np.arange(3000))
  ev = np.concatenate([DepoTask(seed=s, split="eval", hops=k, num_nodes=n).batch(
      np.arange(400))["inputs"] for s, k, n in [(0, 1, 75), (0, None, None), (123, 16, 75)]])
  fp_tr, fp_ev = depo.graph_fingerprint(tr["inputs"]), depo.graph_fingerprint(ev)
  assert (fp_tr % 2 == 0).all() and (fp_ev % 2 == 1).all()
  # The token-level fingerprint is the documented function of the edge set.
  for row in list(tr["inputs"][:20]) + list(ev[:20]):
    edges = _edges(row)
    assert int(depo.graph_fingerprint(row)) == _py_fingerprint(edges)
    # Any other listing order of the same edges has the same fingerprint.
    random.Random(0).shuffle(edges)
    assert int(depo.graph_fingerprint(_with_edges(row, edges))) == _py_fingerprint(edges)
  # Hence no edge set is in both streams.
  sets_tr = {frozenset(_edges(r)) for r in tr["inputs"]}
  assert not any(frozenset(_edges(r)) in sets_tr for r in ev)
  # Without the parity rule half of the graphs would be on the wrong side: the rule does work.
  assert 0.4 < np.mean([_py_fingerprint(_edges(r)) % 2 for r in _unfiltered(300)]) < 0.6


def _edges(row):
  tok = [int(t) for t in row]
  p = next(p for p, t in enumerate(tok) if t != PAD)
  names = []
  while p < 300:
    name, p = _read_name(tok, p)
    names.append(name)
  return list(zip(names[::2], names[1::2], strict=True))


def _with_edges(row, edges):
  graph = [t for u, v in edges for t in (*u, *v)]
  out = np.array(row)
  out[:300] = [PAD] * (300 - len(graph)) + graph
  return out


def _unfiltered(count):
  """Random cycles from Python's RNG (no parity rule), as token rows."""
  rng, rows = random.Random(1), []
  for _ in range(count):
    n = rng.randint(3, 75)
    names = set()
    while len(names) < n:
      names.add((rng.randint(51, 100),) if rng.random() < 0.5
                else (rng.randint(1, 50), rng.randint(51, 100)))
    names = list(names)
    rng.shuffle(names)
    rows.append(_with_edges(np.zeros(360, np.int32),
                            [(names[i], names[(i + 1) % n]) for i in range(n)]))
  return rows


def test_node_count_law():
  probs = depo.node_count_probs()
  assert sorted(probs) == list(range(3, 76))
  z = sum(1 / (n + math.sqrt(75)) for n in range(3, 76))
  for n, p in probs.items():
    assert p == pytest.approx(1 / (n + math.sqrt(75)) / z, rel=1e-12)
  counts = np.bincount(DepoTask(seed=11).batch(np.arange(4000))["num_nodes"], minlength=76)
  assert counts[:3].sum() == 0
  for lo, hi in [(3, 5), (6, 9), (10, 19), (20, 39), (40, 75)]:
    p = sum(probs[n] for n in range(lo, hi + 1))
    sigma = math.sqrt(4000 * p * (1 - p))
    assert abs(counts[lo:hi + 1].sum() - 4000 * p) < 4.5 * sigma, (lo, hi)
  assert (DepoTask(split="eval", num_nodes=75).batch(np.arange(64))["num_nodes"] == 75).all()


def _original_one_token_count(rng, n):
  """The original's name loop: i.i.d. words of U{1,2} tokens until n distinct ones."""
  words = set()
  while len(words) < n:
    length = rng.randint(1, 2)
    words.add(tuple(rng.randint(1, 50) for _ in range(length)))
  return sum(len(w) == 1 for w in words)


@pytest.mark.parametrize("n", [10, 75])
def test_name_length_law_matches_original_loop(n):
  rng = random.Random(n)
  ref = np.array([_original_one_token_count(rng, n) for _ in range(1500)])
  batch = DepoTask(seed=n, num_nodes=n).batch(np.arange(1500))
  got = np.array([sum(len(u) == 1 for u, _ in _edges(row)) for row in batch["inputs"]])
  se = math.sqrt(ref.var() / len(ref) + got.var() / len(got))
  assert abs(ref.mean() - got.mean()) < 4.5 * se, (ref.mean(), got.mean())
  assert abs(ref.std() - got.std()) < 0.15 * ref.std() + 0.05


def test_hops_law_and_sources():
  hops = DepoTask(seed=3).batch(np.arange(2000))["hops"].ravel()
  counts = np.bincount(hops, minlength=17)
  assert counts[0] == 0 and len(counts) == 17
  sigma = math.sqrt(len(hops) / 16 * (1 - 1 / 16))
  assert (np.abs(counts[1:] - len(hops) / 16) < 4.5 * sigma).all()


def test_chance_floor():
  batch = DepoTask(split="eval", hops=4, num_nodes=75).batch(np.arange(100))
  floor = depo.chance_floor(batch)
  assert floor["exact_match"] == pytest.approx(1 / 74)
  assert floor["loss"] == pytest.approx(1000 * math.log(74) / batch["loss_mask"].sum())
  assert 2.4 < floor["loss"] < 3.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(seed=-3), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(split="test"), "split"),
    (dict(hops=0), "hops"),
    (dict(hops=17), "hops"),
    (dict(hops=2.0), "hops"),
    (dict(hops=True), "hops"),
    (dict(num_nodes=2), "num_nodes"),
    (dict(num_nodes=76), "num_nodes"),
    (dict(num_nodes="75"), "num_nodes"),
])
def test_bad_task_args(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field} must"):
    DepoTask(**kwargs)


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
