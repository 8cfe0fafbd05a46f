"""Depo k-hop retrieval task (paper Task 2), after Allen-Zhu's Depo (Physics of LMs 4.1).

One example is SEQ_LEN = 360 tokens: a graph region of GRAPH_LEN = 300 and a query region of
QUERY_LEN = 60.

  position   0 .. 299   PAD ... PAD  e_1 e_2 ... e_n       (left-padded edge list)
  position 300 .. 359   q_0 q_1 ... q_9  PAD ... PAD       (right-padded queries)

The graph is a directed cycle v_0 -> v_1 -> ... -> v_{n-1} -> v_0 over n = num_nodes distinct
node names (3 <= n <= MAX_NODES = 75). Edge e_j = "name(u) name(v)" for one edge u -> v; the n
edges appear in a uniformly shuffled order with no separator between them or between names (the
name tokens are self-delimiting, see below). Query q_i = "HOP_k name(X) ANSWER_SEP name(Y)", where
Y is the node k hops after X along the cycle. Names are 1 or 2 tokens, so an edge is 2-4 tokens
(75 nodes x 4 = 300 at most: the graph region always fits) and a query 4-6 (10 x 6 = 60).

Vocabulary (VOCAB_SIZE = 118):
  PAD = 0                  padding on both sides; never supervised
  1 .. 50                  NAME_INNER_*: first token of a 2-token name
  51 .. 100                NAME_END_*: last token of every name (a 1-token name is one of these)
  HOP_BASE + k = 101..116  "k hops", k = 1..MAX_HOPS
  ANSWER_SEP = 117         between the query node and its answer

Supervision: `targets[p]` is the token the model must predict at position p (inputs[p + 1]),
defined only where p + 1 holds an answer token (a token of name(Y)), 0 elsewhere. `loss_mask` is
1 exactly there: at the ANSWER_SEP of each query and, for a 2-token answer, at its first token.
`answer_group[p]` is the query index 0..9 at those positions, -1 elsewhere; a query is answered
exactly iff all its positions are predicted right. `hops` [10] holds each query's k, `num_nodes`
the n. With window L = WINDOW = 75 the graph region fills windows 0-3 (no supervised token, so
all are consolidation windows) and every answer lies in the single prediction window 300..359.

Sampling (as the original unless noted):
  * n: eval sets fix it (num_nodes=75). Otherwise n in {3..75} with P(n) proportional to
    1 / (n + sqrt(75)), the original's training law.
  * Names: the original draws words i.i.d. (length U{1,2}, tokens U{1..50}, the last token
    shifted by +50) until n distinct ones exist. We draw the same set law exactly, vectorised: a
    given 1-token word is 50x likelier than a given 2-token word, so each new distinct word is
    1-token with probability r1 / (r1 + r2 / 50), where r1 = 50 - d1 and r2 = 2500 - d2 count
    the words of each class not drawn yet; within a class the words are uniform without
    replacement (2-token ones: the first distinct values of a hashed i.i.d. stream).
  * The cycle order of the names and the edge order are independent uniform permutations.
  * Query sources X: distinct uniform nodes (the first 10 of a random permutation of the nodes).
  * k: hops=None draws each query's k ~ U{1..16} independently; hops=k fixes it. Walks wrap
    around the cycle, so for n <= k the answer is k mod n hops on (X itself when n divides k).

Purity and train/eval disjointness: every example is a pure function of (seed, split, hops,
num_nodes, index) through counter-based splitmix64 hashing, so any worker or resumed run can
produce any example without carrying RNG state. The graph (n, names, cycle, edge order) and the
query sources do not depend on `hops`, so the eval sets for different k share their graphs and
sources and differ only in k (a paired comparison across k). Disjointness is exact, not
probabilistic: the fingerprint of a graph is a 64-bit hash of its *set* of edges (independent of
the edge order, see `graph_fingerprint`); an example is accepted for "train" only if its
fingerprint is even and for "eval" only if it is odd, otherwise it is redrawn from the next
attempt counter. So no graph, in any edge order, is ever in both streams, whatever the seeds.

Departures from the original (data-synthetic-pretrain/Depo/depo.py in facebookresearch/PhysicsLM4):
  * Sizes mix its two settings as the paper does: Depo1's names (mini_vocab 50, 1-2 tokens) with
    Depo2's N = 75 and K = 16.
  * No BOS token (the original starts with one): 75 four-token edges already fill the 300-token
    graph region. The graph region is left-padded and the query region right-padded to fixed
    lengths (the paper's layout); the original emits variable-length token lists.
  * Token ids are compact (hop tokens 9000 + k -> 100 + k, separator 9500 -> 117).
  * Always 10 queries. The original asks min(n, 10): for n < 10 we cycle through a random
    permutation of all n nodes (sources repeat, each node is asked floor or ceil of 10 / n times).
  * Only the answer tokens are supervised. The original labels the separator token too (by our
    reading its labels mark target tokens); the separator is fixed by the format, so it only
    adds a trivial loss term.
  * Eval sets fix one k per set (k in EVAL_HOPS) at n = 75; the original's test mode draws each
    query's k from the powers of two <= K.
  * Name draws and n use 64-bit hashes mapped to uniforms (bias below 2^-50).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from sleep_lm.tasks.base import BATCH_KEYS, GOLDEN, MASK64, Task, check_int, example_keys, mix64

SEQ_LEN = 360
GRAPH_LEN = 300
QUERY_LEN = 60
NUM_QUERIES = 10
MAX_NODES = 75
MIN_NODES = 3
MAX_HOPS = 16
EVAL_HOPS = (1, 2, 4, 8, 16)
WINDOW = 75

PAD = 0
MINI_VOCAB = 50  # the original's mini_vocab for Depo1: tokens per name position
NAME_INNER_LO, NAME_INNER_HI = 1, MINI_VOCAB
NAME_END_LO, NAME_END_HI = MINI_VOCAB + 1, 2 * MINI_VOCAB
HOP_BASE = 2 * MINI_VOCAB  # token of "k hops" is HOP_BASE + k
ANSWER_SEP = HOP_BASE + MAX_HOPS + 1
VOCAB_SIZE = ANSWER_SEP + 1  # 118

SPLITS = ("train", "eval")
# Parity of the graph fingerprint each split accepts.
_SPLIT_PARITY = {"train": 0, "eval": 1}
# Arbitrary distinct 64-bit constants, fixed forever (changing them changes every dataset).
_SPLIT_KEYS = {"train": 0x7472_6169_6E00_DE90, "eval": 0x6576_616C_0000_DE90}
_S_NODES, _S_CLASS, _S_SHORT, _S_LONG, _S_CYCLE, _S_EDGES, _S_SOURCES, _S_HOPS, _S_ATTEMPT = (
    np.uint64(0xD390_0000_0000_0000 + i) for i in range(9))
_FP_KEY = np.uint64(0x6470_F19E_4E00_0001)

_U64MAX = np.uint64(MASK64)
_MAX_ATTEMPTS = 256  # a row needs more than a with probability 2^-a

_NUM_LONG = MINI_VOCAB * MINI_VOCAB  # distinct 2-token names
# Node-count law of the original's training data: P(n) ~ 1 / (n + sqrt(N)), n = 3..N.
_N_VALUES = np.arange(MIN_NODES, MAX_NODES + 1)
_N_PROBS = 1.0 / (_N_VALUES + math.sqrt(MAX_NODES))
_N_PROBS /= _N_PROBS.sum()
_N_CDF = np.cumsum(_N_PROBS)


def node_count_probs() -> dict[int, float]:
  """The training distribution of num_nodes (num_nodes=None): {n: P(n)}."""
  return {int(n): float(p) for n, p in zip(_N_VALUES, _N_PROBS, strict=True)}


def _words(key: np.ndarray, stream: np.uint64, count: int) -> np.ndarray:
  """Hash words j = 0..count-1 of one stream per row: uint64 [m] -> [m, count].

  Word j does not depend on count, so longer prefixes extend shorter ones.
  """
  base = mix64(key ^ stream)
  j = np.arange(1, count + 1, dtype=np.uint64) * GOLDEN
  return mix64(base[:, None] + j[None, :])


def _uniform(words: np.ndarray) -> np.ndarray:
  """uint64 -> float64 uniform in [0, 1) from the top 53 bits."""
  return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _edge_hashes(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Hash of each edge from its endpoints' name codes: 128 * inner + end (inner 0 if none)."""
  return mix64(((src.astype(np.uint64) << np.uint64(16)) | dst.astype(np.uint64)) ^ _FP_KEY)


def _fingerprint(edge_hashes: np.ndarray) -> np.ndarray:
  """Order-free fingerprint: sum (mod 2^64) of edge hashes over the last axis, then mixed."""
  return mix64(edge_hashes.sum(axis=-1, dtype=np.uint64) ^ _FP_KEY)


def graph_fingerprint(inputs: np.ndarray) -> np.ndarray:
  """64-bit fingerprint of the edge set in the graph region of `inputs` (int [..., SEQ_LEN]).

  Reads only the tokens, so evaluators can check disjointness themselves: train examples have
  even fingerprints, eval examples odd ones. The edge order does not change it.
  """
  inputs = np.asarray(inputs)
  if inputs.shape[-1:] != (SEQ_LEN,):
    raise ValueError(f"inputs must have shape [..., {SEQ_LEN}], got {inputs.shape}")
  g = inputs[..., :GRAPH_LEN].astype(np.int64)
  is_end = (g >= NAME_END_LO) & (g <= NAME_END_HI)
  prev = np.zeros_like(g)
  prev[..., 1:] = g[..., :-1]
  inner = np.where((prev >= NAME_INNER_LO) & (prev <= NAME_INNER_HI), prev, 0)
  code = np.where(is_end, inner * 128 + g, 0)
  # Names alternate source, destination; pair each destination with the name before it.
  role = (np.cumsum(is_end, axis=-1) - 1) % 2
  pos = np.where(is_end, np.arange(GRAPH_LEN), -1)
  last_end = np.maximum.accumulate(pos, axis=-1)
  prev_end = np.full_like(last_end, -1)
  prev_end[..., 1:] = last_end[..., :-1]
  src = np.take_along_axis(code, np.maximum(prev_end, 0), axis=-1)
  is_dst = is_end & (role == 1)
  h = np.where(is_dst, _edge_hashes(src, code), np.uint64(0))
  return _fingerprint(h)


def chance_floor(batch: dict[str, np.ndarray]) -> dict[str, float]:
  """Scores of a guesser that knows the graph's names but not its edges (the floor to print).

  It answers uniformly among the n - 1 nodes other than X (the answer when k mod n != 0, always
  so for the eval sets: k <= 16 < 75). Per query its likelihood is 1 / (n - 1) whatever the name
  lengths, so its masked loss is sum over queries of log(n - 1) / (answer tokens) and its exact
  match 1 / (n - 1). At n = 75: 4.30 nats per query, ~2.7 nats per answer token, EM 1/74 = 1.35%.
  """
  n = np.asarray(batch["num_nodes"], np.float64)
  tokens = float(np.asarray(batch["loss_mask"]).sum())
  loss = float((NUM_QUERIES * np.log(n - 1)).sum()) / tokens
  return {"loss": loss, "exact_match": float((1.0 / (n - 1)).mean())}


def _draw_graphs(keys: np.ndarray, fixed_n: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Node counts int64 [m] and name codes in cycle order int64 [m, MAX_NODES] (0 past n)."""
  m = keys.shape[0]
  if fixed_n is None:
    u = _uniform(_words(keys, _S_NODES, 1)[:, 0])
    n = _N_VALUES[np.minimum(np.searchsorted(_N_CDF, u, side="right"), len(_N_VALUES) - 1)]
  else:
    n = np.full(m, fixed_n, np.int64)
  n = n.astype(np.int64)
  # Split the n distinct names into the two length classes exactly as the original's rejection
  # loop does: each new distinct word is 1-token with probability (remaining 1-token weight) /
  # (remaining total weight), a 1-token word weighing 50x a 2-token one.
  u = _uniform(_words(keys, _S_CLASS, MAX_NODES))
  d1 = np.zeros(m, np.int64)
  d2 = np.zeros(m, np.int64)
  for s in range(MAX_NODES):
    active = s < n
    rest1 = (MINI_VOCAB - d1).astype(np.float64)
    p1 = rest1 / (rest1 + (_NUM_LONG - d2) / MINI_VOCAB)
    short = active & (u[:, s] < p1)
    d1 += short
    d2 += active & ~short
  slots = np.arange(MAX_NODES)
  # 1-token names: the first d1 of a uniform permutation of the 50 end tokens.
  perm = np.argsort(_words(keys, _S_SHORT, MINI_VOCAB), axis=1, kind="stable")
  short_codes = NAME_END_LO + perm  # [m, 50]
  # 2-token names: the first d2 distinct values of an i.i.d. uniform stream over the 2500 words
  # (a uniform sample without replacement). 128 draws give >= 75 distinct except with
  # probability far below 1e-40; the loop lengthens the stream if not (prefixes agree).
  length = 128
  while True:
    vals = (_words(keys, _S_LONG, length) % np.uint64(_NUM_LONG)).astype(np.int64)
    order = np.argsort(vals, axis=1, kind="stable")  # equal values: earliest first
    sv = np.take_along_axis(vals, order, axis=1)
    first_sorted = np.ones_like(sv, bool)
    first_sorted[:, 1:] = sv[:, 1:] != sv[:, :-1]
    is_first = np.empty_like(first_sorted)
    np.put_along_axis(is_first, order, first_sorted, axis=1)
    if (is_first.sum(axis=1) >= d2).all():
      break
    length *= 2
  rank = np.cumsum(is_first, axis=1) - 1
  keep = is_first & (rank < d2[:, None])
  rows, cols = np.nonzero(keep)
  long_codes = np.zeros((m, MAX_NODES), np.int64)
  v = vals[rows, cols]
  long_codes[rows, rank[rows, cols]] = (
      (NAME_INNER_LO + v // MINI_VOCAB) * 128 + NAME_END_LO + v % MINI_VOCAB)
  short_pad = np.zeros((m, MAX_NODES), np.int64)
  short_pad[:, :MINI_VOCAB] = short_codes
  long_shifted = np.take_along_axis(
      long_codes, np.clip(slots[None, :] - d1[:, None], 0, MAX_NODES - 1), axis=1)
  names = np.where(slots < d1[:, None], short_pad, long_shifted)
  names = np.where(slots < n[:, None], names, 0)
  # Uniform cycle order of the names (the original shuffles them).
  cycle = _valid_first_permutation(_words(keys, _S_CYCLE, MAX_NODES), n)
  return n, np.take_along_axis(names, cycle, axis=1)


def _valid_first_permutation(words: np.ndarray, n: np.ndarray) -> np.ndarray:
  """Per row, a uniform permutation of slots 0..n-1 followed by slots n..MAX_NODES-1."""
  slots = np.arange(words.shape[1])
  keys = np.where(slots < n[:, None], words >> np.uint64(1), _U64MAX)
  return np.argsort(keys, axis=1, kind="stable")


def _successor_codes(codes: np.ndarray, n: np.ndarray) -> np.ndarray:
  nxt = (np.arange(MAX_NODES)[None, :] + 1) % np.maximum(n, 1)[:, None]
  return np.take_along_axis(codes, nxt, axis=1)


@dataclasses.dataclass(frozen=True)
class DepoTask:
  """Depo example generator; hashable and picklable.

  seed: non-negative int (< 2^64). split: "train" or "eval" (provably disjoint graphs).
  hops: None (each query's k ~ U{1..16}) or a fixed k in 1..16.
  num_nodes: None (n drawn per example by the original's law, see `node_count_probs`) or a fixed
  n in 3..75 (the eval sets use 75).
  """

  seed: int = 0
  split: str = "train"
  hops: int | None = None
  num_nodes: int | None = None

  def __post_init__(self):
    check_int("seed", self.seed, 0, MASK64)
    if self.split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
    if self.hops is not None:
      check_int("hops", self.hops, 1, MAX_HOPS)
    if self.num_nodes is not None:
      check_int("num_nodes", self.num_nodes, MIN_NODES, MAX_NODES)

  def replace(self, **changes) -> DepoTask:
    return dataclasses.replace(self, **changes)

  def _keys(self, indices) -> np.ndarray:
    return example_keys(self.seed, _SPLIT_KEYS[self.split], indices)

  def batch(self, indices: Iterable[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Examples for `indices`, stacked (shapes in the module docstring, leading dim n)."""
    ex_keys = self._keys(indices)
    m = ex_keys.shape[0]
    # Rejection on the fingerprint's parity; attempt a of a row uses its own hash key.
    keys = np.zeros(m, np.uint64)
    n = np.zeros(m, np.int64)
    codes = np.zeros((m, MAX_NODES), np.int64)
    pending = np.arange(m)
    parity = np.uint64(_SPLIT_PARITY[self.split])
    for attempt in range(_MAX_ATTEMPTS):
      if not pending.size:
        break
      salt = mix64(np.array([attempt], np.uint64) * GOLDEN + _S_ATTEMPT)  # arrays wrap silently
      k = mix64(ex_keys[pending] ^ salt)
      cn, cc = _draw_graphs(k, self.num_nodes)
      valid = np.arange(MAX_NODES)[None, :] < cn[:, None]
      h = np.where(valid, _edge_hashes(cc, _successor_codes(cc, cn)), np.uint64(0))
      ok = (_fingerprint(h) & np.uint64(1)) == parity
      rows = pending[ok]
      keys[rows], n[rows], codes[rows] = k[ok], cn[ok], cc[ok]
      pending = pending[~ok]
    else:
      if pending.size:
        raise RuntimeError("fingerprint rejection did not terminate")  # p < 2^-256
    return self._layout(keys, n, codes)

  def _layout(self, keys: np.ndarray, n: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    m = keys.shape[0]
    rows = np.arange(m)[:, None]
    inner, end = codes >> 7, codes & 127  # inner 0: a 1-token name

    # Graph region: edges (v_j -> v_{j+1}) in a uniformly shuffled order, left-padded.
    edge_order = _valid_first_permutation(_words(keys, _S_EDGES, MAX_NODES), n)
    succ = (edge_order + 1) % n[:, None]
    valid = np.arange(MAX_NODES)[None, :] < n[:, None]
    edge_tok = np.stack([inner[rows, edge_order], end[rows, edge_order],
                         inner[rows, succ], end[rows, succ]], axis=-1)
    edge_tok = np.where(valid[..., None], edge_tok, PAD).reshape(m, 4 * MAX_NODES)
    present = edge_tok != PAD
    length = present.sum(axis=1)
    pos = GRAPH_LEN - length[:, None] + np.cumsum(present, axis=1) - 1
    inputs = np.full((m, SEQ_LEN), PAD, np.int32)
    r, c = np.nonzero(present)
    inputs[r, pos[r, c]] = edge_tok[r, c]

    # Query region: "HOP_k X ANSWER_SEP Y" x 10, right-padded.
    perm = _valid_first_permutation(_words(keys, _S_SOURCES, MAX_NODES), n)
    qidx = np.arange(NUM_QUERIES)[None, :] % n[:, None]  # n < 10: cycle through the nodes
    src = np.take_along_axis(perm, qidx, axis=1)
    if self.hops is None:
      hops = 1 + (_words(keys, _S_HOPS, NUM_QUERIES) % np.uint64(MAX_HOPS)).astype(np.int64)
    else:
      hops = np.full((m, NUM_QUERIES), self.hops, np.int64)
    dst = (src + hops) % n[:, None]
    q_tok = np.stack([HOP_BASE + hops, inner[rows, src], end[rows, src],
                      np.full_like(hops, ANSWER_SEP), inner[rows, dst], end[rows, dst]], axis=-1)
    is_answer = np.zeros(q_tok.shape, bool)
    is_answer[..., 4:] = True
    q_tok = q_tok.reshape(m, QUERY_LEN)
    present = q_tok != PAD
    is_answer = is_answer.reshape(m, QUERY_LEN) & present
    group = np.repeat(np.arange(NUM_QUERIES), 6)[None, :].repeat(m, 0)
    pos = GRAPH_LEN + np.cumsum(present, axis=1) - 1
    r, c = np.nonzero(present)
    inputs[r, pos[r, c]] = q_tok[r, c]

    # Supervise the prediction of every answer token: at the position just before it.
    targets = np.zeros((m, SEQ_LEN), np.int32)
    loss_mask = np.zeros((m, SEQ_LEN), np.float32)
    answer_group = np.full((m, SEQ_LEN), -1, np.int32)
    r, c = np.nonzero(is_answer)
    p = pos[r, c] - 1
    targets[r, p] = q_tok[r, c]
    loss_mask[r, p] = 1.0
    answer_group[r, p] = group[r, c]
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "answer_group": answer_group, "hops": hops.astype(np.int32),
            "num_nodes": n.astype(np.int32)}

  def example(self, index: int) -> dict[str, np.ndarray]:
    """One example: the arrays of `batch` without the leading dim."""
    index = check_int("index", index, 0, MASK64)
    return {k: v[0] for k, v in self.batch(np.array([index], np.uint64)).items()}


def render(example: dict[str, np.ndarray]) -> str:
  """Readable text of one example: a 1-token name prints as its end token minus 50 ("7"), a
  2-token name as inner_end ("12_7"); edges as "u>v", queries as "<k> X : Y"."""
  tokens = [int(t) for t in example["inputs"]]
  items, inner = [], 0
  for t in tokens:
    if NAME_INNER_LO <= t <= NAME_INNER_HI:
      inner = t
    elif NAME_END_LO <= t <= NAME_END_HI:
      items.append(f"{inner}_{t - MINI_VOCAB}" if inner else f"{t - MINI_VOCAB}")
      inner = 0
    elif HOP_BASE < t <= HOP_BASE + MAX_HOPS:
      items.append(f"<{t - HOP_BASE}>")
    elif t == ANSWER_SEP:
      items.append(":")
  n_edges = 2 * int(example["num_nodes"])
  edges = [f"{a}>{b}" for a, b in zip(items[:n_edges:2], items[1:n_edges:2], strict=True)]
  queries = " ".join(items[n_edges:]).replace(" <", "\n<")
  pads = tokens[:GRAPH_LEN].count(PAD), tokens[GRAPH_LEN:].count(PAD)
  return f"[{pads[0]} x PAD] " + " ".join(edges) + "\n" + queries + f"\n[{pads[1]} x PAD]"


@dataclasses.dataclass(frozen=True)
class Depo(Task):
  """The task interface (`config.task`: name="depo", seed, train_num_nodes) over `DepoTask`.

  seed: the task seed; it keys the eval sets and, mixed with each model seed, the training
  streams. train_num_nodes: None draws n per training example by the original's law (most
  training graphs are then short and fit in the last graph window, see docs/tasks.md), or a fixed
  n in 3..75. Training queries draw k ~ U{1..16}; the eval sets "k1", "k2", "k4", "k8", "k16" fix
  k at n = 75, so the graph always spans the four evicted windows.
  """

  name = "depo"
  vocab_size = VOCAB_SIZE
  seq_len = SEQ_LEN

  seed: int = 0
  train_num_nodes: int | None = None

  def __post_init__(self):
    DepoTask(seed=self.seed, num_nodes=self.train_num_nodes)  # validates, naming the field

  def train_examples(self, data_seed: int, indices) -> dict[str, np.ndarray]:
    batch = DepoTask(seed=self.seed + data_seed, num_nodes=self.train_num_nodes).batch(indices)
    return {k: batch[k] for k in BATCH_KEYS}

  def eval_set_names(self) -> tuple[str, ...]:
    return tuple(f"k{k}" for k in EVAL_HOPS)

  def eval_examples(self, name: str, indices) -> dict[str, np.ndarray]:
    self._check_eval_name(name)
    generator = DepoTask(seed=self.seed, split="eval", hops=int(name[1:]), num_nodes=MAX_NODES)
    batch = generator.batch(indices)
    return {k: batch[k] for k in BATCH_KEYS}

  def eval_set_id(self, name: str) -> str:
    self._check_eval_name(name)
    return f"depo_{name}_n{MAX_NODES}_s{self.seed}"

  def chance(self, name: str) -> dict[str, float]:
    """A guesser that knows the names but not the edges (`chance_floor` at n = 75)."""
    self._check_eval_name(name)
    per_query = 1.0 / (MAX_NODES - 1)
    return {"exact_accuracy": per_query ** NUM_QUERIES, "answer_accuracy": per_query}
