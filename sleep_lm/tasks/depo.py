"""Depo k-hop retrieval (paper Task 2), in the paper's format: `u -> v ,` edges, 1-token names.

One example is SEQ_LEN = 360 tokens: a graph region of GRAPH_LEN = 300 and a query region of
QUERY_LEN = 60.

  position   0 .. 299   PAD ... PAD  u_1 -> v_1 , u_2 -> v_2 , ... u_n -> v_n ,   (left-padded)
  position 300 .. 339   HOP_k X : Y  (x 10 queries, 4 tokens each)
  position 340 .. 359   PAD ... PAD                                                (right-padded)

The graph is a directed cycle v_0 -> v_1 -> ... -> v_{n-1} -> v_0 over n = num_nodes distinct
names (MIN_NODES = 3 <= n <= MAX_NODES = 75) drawn from a pool of NUM_NAMES = 100 one-token
names. Each edge is written `u ARROW v COMMA` (4 tokens, so 75 edges fill the 300 tokens
exactly, the paper's "at most 75 nodes spanning at most 300 tokens"); the n edges appear in a
uniformly shuffled order. Query i is `HOP_k X COLON Y`, where Y is the node k hops after X along
the edges' direction. The arrow puts each edge's direction in the sequence itself: the earlier
format (names of 1-2 tokens, no separators) left a name's role (source or destination) to the
parity of its position from the start of the graph, which a memory gated by decays in (0, 1)
cannot carry across three evictions (docs/tasks.md).

Vocabulary (VOCAB_SIZE = 120):
  PAD = 0                  padding on both sides; never supervised
  1 .. 100                 the names (NAME_LO .. NAME_HI)
  ARROW = 101, COMMA = 102 "->" and ","
  HOP_BASE + k = 103..118  "k hops", k = 1..MAX_HOPS = 16
  COLON = 119              between the query node and its answer

Supervision: `targets[p]` = inputs[p + 1] exactly where p is a query's COLON (predicting Y, one
token), 0 elsewhere; `loss_mask` is 1 there (10 positions per example) and `answer_group[p]` is
the query index 0..9 there, -1 elsewhere. `hops` [10] holds each query's k, `num_nodes` the n.
With window L = WINDOW = 75 the graph region fills windows 0-3 (no supervised token, so all are
consolidation windows) and every answer lies in the single prediction window 300..359.

Sampling:
  * n: `num_nodes` fixes it (the eval sets use 75). Otherwise a mixture: with probability
    `full_share` n = 75 (eval-like graphs), else n ~ `node_law` over 3..75: "original" is the
    original's training law P(n) ~ 1 / (n + sqrt(75)), "uniform" is U{3..75}.
  * Names: a uniform random n-subset of the pool, in uniform random cycle order. Edges are
    listed in an independent uniform order.
  * Query sources X: distinct uniform nodes (the first 10 of a random permutation of the nodes;
    for n < 10 the permutation repeats, so each node is asked floor or ceil of 10 / n times).
  * k: `hops` fixes it. Otherwise k ~ `hop_law` over 1..16: "uniform" (the paper's U{1..16}) or
    "harmonic" (P(k) ~ 1 / k: more of the short hops a model can learn first). Without `wrap`
    (the default) a query's k is drawn from the law restricted to 1..min(16, n - 1), so a walk
    never goes round the cycle (as at n = 75, where k <= 16 < n always); with `wrap` k is drawn
    from the whole law and the answer is k mod n hops on (X itself when n divides k), as in the
    original.

Purity and disjointness: every example is a pure function of (seed, split, index and the laws)
through counter-based splitmix64 hashing, so any worker or resumed run can produce any example
without carrying RNG state. The graph (n, names, cycle, edge order) and the query sources do not
depend on `hops`, so the eval sets for different k share their graphs and sources and differ only
in k (a paired comparison). The three splits are disjoint exactly: the fingerprint of a graph is
a 64-bit hash of its *set* of edges (`graph_fingerprint`, independent of the edge order); "train"
accepts a candidate graph only if its fingerprint is 0 mod 2, "eval" only if it is 1 mod 4 and
"valid" only if it is 3 mod 4, otherwise the example is redrawn from the next attempt counter. So
no graph, in any edge order, is in two splits, whatever the seeds and laws.

Departures from the original (data-synthetic-pretrain/Depo/depo.py in facebookresearch/PhysicsLM4)
are listed in docs/tasks.md: the paper's sizes (N = 75, K = 16, 1-token names, the arrow and
comma), no BOS, fixed padded lengths, always 10 queries, only the answer supervised, one k per
eval set, no wrap-around by default, optional node- and hop-law mixtures.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from sleep_lm.common.validation import (
  FieldError,
  check_bool,
  check_choice,
  check_int,
  expect,
  is_finite_number,
)
from sleep_lm.tasks.base import BATCH_KEYS, GOLDEN, MASK64, Task, example_keys, mix64

SEQ_LEN = 360
GRAPH_LEN = 300
QUERY_LEN = 60
NUM_QUERIES = 10
MAX_NODES = 75
MIN_NODES = 3
MAX_HOPS = 16
EVAL_HOPS = (1, 2, 4, 8, 16)
VALID_HOPS = (1, 2, 4)
WINDOW = 75
EDGE_TOKENS = 4    # u -> v ,
QUERY_TOKENS = 4   # HOP_k X : Y

PAD = 0
NUM_NAMES = 100
NAME_LO, NAME_HI = 1, NUM_NAMES
ARROW = NUM_NAMES + 1
COMMA = NUM_NAMES + 2
HOP_BASE = COMMA   # token of "k hops" is HOP_BASE + k
COLON = HOP_BASE + MAX_HOPS + 1
VOCAB_SIZE = COLON + 1  # 120

SPLITS = ("train", "eval", "valid")
NODE_LAWS = ("original", "uniform")
HOP_LAWS = ("uniform", "harmonic")
# (modulus, residue) of the graph fingerprint each split accepts: pairwise disjoint classes.
_SPLIT_ACCEPT = {"train": (2, 0), "eval": (4, 1), "valid": (4, 3)}
# Arbitrary distinct 64-bit constants, fixed forever (changing them changes every dataset).
_SPLIT_KEYS = {"train": 0x7472_6169_6E00_DE91, "eval": 0x6576_616C_0000_DE91,
               "valid": 0x7661_6C69_6400_DE91}
_S_FULL, _S_NODES, _S_NAMES, _S_EDGES, _S_SOURCES, _S_HOPS, _S_ATTEMPT = (
    np.uint64(0xD391_0000_0000_0000 + i) for i in range(7))
_FP_KEY = np.uint64(0x6470_F19E_4E00_0002)

_U64MAX = np.uint64(MASK64)
_MAX_ATTEMPTS = 256  # eval and valid accept 1/4 of candidates: (3/4)^256 < 1e-31

_N_VALUES = np.arange(MIN_NODES, MAX_NODES + 1)
_K_VALUES = np.arange(1, MAX_HOPS + 1)


def _normalised(w: np.ndarray) -> np.ndarray:
  return w / w.sum()


# P(n) over n = 3..75 for each node law (the original's: 1 / (n + sqrt(N)), N = 75).
_NODE_PROBS = {"original": _normalised(1.0 / (_N_VALUES + math.sqrt(MAX_NODES))),
               "uniform": _normalised(np.ones(len(_N_VALUES)))}
# Unnormalised weights over k = 1..16 for each hop law (restricted to 1..n-1 without wrap).
_HOP_WEIGHTS = {"uniform": np.ones(MAX_HOPS), "harmonic": 1.0 / _K_VALUES}


def node_count_probs(node_law: str = "original", full_share: float = 0.0) -> dict[int, float]:
  """The training distribution of num_nodes: {n: P(n)} (full_share of the mass moved to 75)."""
  _check_laws(node_law, full_share, "uniform")
  p = (1.0 - full_share) * _NODE_PROBS[node_law]
  p[-1] += full_share
  return {int(n): float(q) for n, q in zip(_N_VALUES, p, strict=True)}


def hop_probs(hop_law: str = "uniform", num_nodes: int = MAX_NODES,
              wrap: bool = False) -> dict[int, float]:
  """The distribution of a training query's k at n = num_nodes: {k: P(k)}."""
  _check_laws("original", 0.0, hop_law)
  kmax = MAX_HOPS if wrap else min(MAX_HOPS, num_nodes - 1)
  w = _HOP_WEIGHTS[hop_law][:kmax]
  return {int(k): float(p) for k, p in zip(_K_VALUES, w / w.sum(), strict=False)}


def _check_laws(node_law, full_share, hop_law) -> None:
  check_choice("node_law", node_law, NODE_LAWS)
  expect(is_finite_number(full_share) and 0.0 <= full_share <= 1.0, "full_share",
         f"must be a number in [0, 1], got {full_share!r}")
  check_choice("hop_law", hop_law, HOP_LAWS)


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
  """Hash of each edge src -> dst from the two name tokens."""
  return mix64(((src.astype(np.uint64) << np.uint64(16)) | dst.astype(np.uint64)) ^ _FP_KEY)


def _fingerprint(edge_hashes: np.ndarray) -> np.ndarray:
  """Order-free fingerprint: sum (mod 2^64) of edge hashes over the last axis, then mixed."""
  return mix64(edge_hashes.sum(axis=-1, dtype=np.uint64) ^ _FP_KEY)


def split_of_fingerprint(fingerprint) -> np.ndarray:
  """The split ("train", "eval", "valid") a graph fingerprint belongs to, as a str array."""
  fp = np.asarray(fingerprint, np.uint64)
  return np.where(fp % np.uint64(2) == 0, "train",
                  np.where(fp % np.uint64(4) == 1, "eval", "valid"))


def graph_fingerprint(inputs: np.ndarray) -> np.ndarray:
  """64-bit fingerprint of the edge set in the graph region of `inputs` (int [..., SEQ_LEN]).

  Reads only the tokens (each ARROW's neighbours are an edge's source and destination), so
  evaluators can check disjointness themselves with `split_of_fingerprint`. The edge order does
  not change it.
  """
  inputs = np.asarray(inputs)
  if inputs.shape[-1:] != (SEQ_LEN,):
    raise ValueError(f"inputs must have shape [..., {SEQ_LEN}], got {inputs.shape}")
  g = inputs[..., :GRAPH_LEN].astype(np.int64)
  is_arrow = np.zeros(g.shape, bool)
  is_arrow[..., 1:-1] = g[..., 1:-1] == ARROW
  src = np.zeros_like(g)
  dst = np.zeros_like(g)
  src[..., 1:-1] = g[..., :-2]
  dst[..., 1:-1] = g[..., 2:]
  h = np.where(is_arrow, _edge_hashes(src, dst), np.uint64(0))
  return _fingerprint(h)


def names_only_guesser(num_nodes) -> dict[str, np.ndarray]:
  """Per example, the scores of a guesser that knows the graph's names but not its edges.

  It answers uniformly among the n - 1 nodes other than X (the answer whenever k < n, always so
  without wrap-around): likelihood 1 / (n - 1) per query, so its loss per answer token is
  log(n - 1) (answers are one token), its exact match per query 1 / (n - 1) and all 10 queries
  right (1 / (n - 1))^10. At n = 75: 4.304 nats, 1/74 = 1.35%.
  """
  n = np.asarray(num_nodes, np.float64)
  return {"loss": np.log(n - 1), "answer_accuracy": 1.0 / (n - 1),
          "exact_accuracy": (1.0 / (n - 1)) ** NUM_QUERIES}


def chance_floor(batch: dict[str, np.ndarray]) -> dict[str, float]:
  """`names_only_guesser` averaged over a batch: masked loss per answer token, exact match per
  query (the floor to print beside a model's)."""
  g = names_only_guesser(batch["num_nodes"])
  return {"loss": float(g["loss"].mean()), "exact_match": float(g["answer_accuracy"].mean())}


def _valid_first_permutation(words: np.ndarray, n: np.ndarray) -> np.ndarray:
  """Per row, a uniform permutation of slots 0..n-1 followed by slots n..width-1."""
  slots = np.arange(words.shape[1])
  keys = np.where(slots < n[:, None], words >> np.uint64(1), _U64MAX)
  return np.argsort(keys, axis=1, kind="stable")


@dataclasses.dataclass(frozen=True)
class DepoTask:
  """Depo example generator; hashable and picklable.

  seed: non-negative int (< 2^64). split: "train", "eval" or "valid" (provably disjoint graphs).
  hops: None (each query's k from `hop_law`) or a fixed k in 1..16.
  num_nodes: None (n from `full_share` and `node_law`) or a fixed n in 3..75 (eval sets: 75).
  node_law: "original" or "uniform"; full_share: share of n = 75 graphs, in [0, 1].
  hop_law: "uniform" or "harmonic". wrap: allow k >= n (walks round the cycle).
  """

  seed: int = 0
  split: str = "train"
  hops: int | None = None
  num_nodes: int | None = None
  node_law: str = "original"
  full_share: float = 0.0
  hop_law: str = "uniform"
  wrap: bool = False

  def __post_init__(self):
    check_int("seed", self.seed, 0, MASK64)
    check_choice("split", self.split, SPLITS)
    if self.hops is not None:
      check_int("hops", self.hops, 1, MAX_HOPS)
    if self.num_nodes is not None:
      check_int("num_nodes", self.num_nodes, MIN_NODES, MAX_NODES)
    _check_laws(self.node_law, self.full_share, self.hop_law)
    check_bool("wrap", self.wrap)
    expect(self.hops is None or self.wrap or (
        self.num_nodes is not None and self.hops < self.num_nodes), "hops",
        f"{self.hops} without wrap needs a fixed num_nodes > {self.hops}, "
        f"got num_nodes={self.num_nodes}")

  def replace(self, **changes) -> DepoTask:
    return dataclasses.replace(self, **changes)

  def _draw_graphs(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Node counts int64 [m] and names in cycle order int64 [m, MAX_NODES] (0 past n)."""
    m = keys.shape[0]
    if self.num_nodes is None:
      u = _uniform(_words(keys, _S_NODES, 1)[:, 0])
      cdf = np.cumsum(_NODE_PROBS[self.node_law])
      n = _N_VALUES[np.minimum(np.searchsorted(cdf, u, side="right"), len(_N_VALUES) - 1)]
      full = _uniform(_words(keys, _S_FULL, 1)[:, 0]) < self.full_share
      n = np.where(full, MAX_NODES, n)
    else:
      n = np.full(m, self.num_nodes)
    n = n.astype(np.int64)
    # A uniform random n-subset of the pool in uniform random order: the first n of a uniform
    # permutation of the NUM_NAMES names.
    perm = np.argsort(_words(keys, _S_NAMES, NUM_NAMES), axis=1, kind="stable")[:, :MAX_NODES]
    names = np.where(np.arange(MAX_NODES) < n[:, None], NAME_LO + perm, 0)
    return n, names

  def batch(self, indices: Iterable[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Examples for `indices`, stacked (shapes in the module docstring, leading dim m)."""
    ex_keys = example_keys(self.seed, _SPLIT_KEYS[self.split], indices)
    m = ex_keys.shape[0]
    # Rejection on the fingerprint class; attempt a of a row uses its own hash key.
    keys = np.zeros(m, np.uint64)
    n = np.zeros(m, np.int64)
    names = np.zeros((m, MAX_NODES), np.int64)
    pending = np.arange(m)
    modulus, residue = (np.uint64(x) for x in _SPLIT_ACCEPT[self.split])
    for attempt in range(_MAX_ATTEMPTS):
      if not pending.size:
        break
      salt = mix64(np.array([attempt], np.uint64) * GOLDEN + _S_ATTEMPT)  # arrays wrap silently
      k = mix64(ex_keys[pending] ^ salt)
      cn, cnames = self._draw_graphs(k)
      succ = np.take_along_axis(cnames, (np.arange(MAX_NODES) + 1) % cn[:, None], axis=1)
      valid = np.arange(MAX_NODES)[None, :] < cn[:, None]
      h = np.where(valid, _edge_hashes(cnames, succ), np.uint64(0))
      ok = _fingerprint(h) % modulus == residue
      rows = pending[ok]
      keys[rows], n[rows], names[rows] = k[ok], cn[ok], cnames[ok]
      pending = pending[~ok]
    else:
      if pending.size:
        raise RuntimeError("fingerprint rejection did not terminate")  # p < 1e-31
    return self._layout(keys, n, names)

  def _hops(self, keys: np.ndarray, n: np.ndarray) -> np.ndarray:
    m = keys.shape[0]
    if self.hops is not None:
      return np.full((m, NUM_QUERIES), self.hops, np.int64)
    # Inverse CDF of the law restricted to 1..kmax (kmax = n - 1 without wrap).
    cum = np.cumsum(_HOP_WEIGHTS[self.hop_law])
    kmax = np.full(m, MAX_HOPS) if self.wrap else np.minimum(MAX_HOPS, n - 1)
    u = _uniform(_words(keys, _S_HOPS, NUM_QUERIES))
    k = np.searchsorted(cum, u * cum[kmax - 1][:, None], side="right") + 1
    return np.minimum(k, kmax[:, None]).astype(np.int64)

  def _layout(self, keys: np.ndarray, n: np.ndarray, names: np.ndarray) -> dict[str, np.ndarray]:
    m = keys.shape[0]
    rows = np.arange(m)[:, None]
    inputs = np.full((m, SEQ_LEN), PAD, np.int32)

    # Graph region: edges v_j -> v_{j+1} in a uniformly shuffled order, left-padded.
    order = _valid_first_permutation(_words(keys, _S_EDGES, MAX_NODES), n)
    succ = (order + 1) % n[:, None]
    edge_tok = np.stack([names[rows, order], np.full_like(order, ARROW), names[rows, succ],
                         np.full_like(order, COMMA)], axis=-1).reshape(m, GRAPH_LEN)
    start = GRAPH_LEN - EDGE_TOKENS * n                       # [m]
    pos = start[:, None] + np.arange(GRAPH_LEN)[None, :]
    r, c = np.nonzero(pos < GRAPH_LEN)
    inputs[r, pos[r, c]] = edge_tok[r, c]

    # Query region: "HOP_k X : Y" x 10, then PAD.
    perm = _valid_first_permutation(_words(keys, _S_SOURCES, MAX_NODES), n)
    src = np.take_along_axis(perm, np.arange(NUM_QUERIES)[None, :] % n[:, None], axis=1)
    hops = self._hops(keys, n)
    dst = (src + hops) % n[:, None]
    q_tok = np.stack([HOP_BASE + hops, names[rows, src], np.full_like(hops, COLON),
                      names[rows, dst]], axis=-1).reshape(m, NUM_QUERIES * QUERY_TOKENS)
    inputs[:, GRAPH_LEN:GRAPH_LEN + q_tok.shape[1]] = q_tok

    # Supervise the answer: predicted at the COLON just before it.
    colon = GRAPH_LEN + QUERY_TOKENS * np.arange(NUM_QUERIES) + 2
    targets = np.zeros((m, SEQ_LEN), np.int32)
    loss_mask = np.zeros((m, SEQ_LEN), np.float32)
    answer_group = np.full((m, SEQ_LEN), -1, np.int32)
    targets[:, colon] = names[rows, dst]
    loss_mask[:, colon] = 1.0
    answer_group[:, colon] = np.arange(NUM_QUERIES)
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "answer_group": answer_group, "hops": hops.astype(np.int32),
            "num_nodes": n.astype(np.int32)}

  def example(self, index: int) -> dict[str, np.ndarray]:
    """One example: the arrays of `batch` without the leading dim."""
    index = check_int("index", index, 0, MASK64)
    return {k: v[0] for k, v in self.batch(np.array([index], np.uint64)).items()}


def render(example: dict[str, np.ndarray]) -> str:
  """Readable text of one example: names as `n<id>`, edges `n17->n12,`, queries `<k> n24 : n28`
  one per line, with the pad counts of both regions."""
  tokens = [int(t) for t in example["inputs"]]
  words = {ARROW: "->", COMMA: ",", COLON: ":"}

  def word(t):
    if NAME_LO <= t <= NAME_HI:
      return f"n{t}"
    if HOP_BASE < t <= HOP_BASE + MAX_HOPS:
      return f"<{t - HOP_BASE}>"
    return words.get(t, f"?{t}")

  graph = "".join(word(t) + (" " if t == COMMA else "") for t in tokens[:GRAPH_LEN] if t != PAD)
  queries = [t for t in tokens[GRAPH_LEN:] if t != PAD]
  lines = [" ".join(word(t) for t in queries[i:i + QUERY_TOKENS])
           for i in range(0, len(queries), QUERY_TOKENS)]
  pads = tokens[:GRAPH_LEN].count(PAD), tokens[GRAPH_LEN:].count(PAD)
  return "\n".join([f"[{pads[0]} x PAD] {graph.strip()}", *lines, f"[{pads[1]} x PAD]"])


_LEGACY_FIELDS = {"train_num_nodes"}


@dataclasses.dataclass(frozen=True)
class Depo(Task):
  """The task interface (`config.task`: name="depo", seed, node_law, full_share, hop_law, wrap)
  over `DepoTask`.

  seed: the task seed; it keys the eval and validation sets and, mixed with each model seed, the
  training streams. node_law, full_share, hop_law, wrap: the training distribution (see
  `DepoTask`; the defaults are the original's laws without wrap-around).

  Eval sets: "k1", "k2", "k4", "k8", "k16" fix k at n = 75 (every graph spans the four evicted
  windows); "train_law" is held out at the training distribution. Validation sets "val_k1",
  "val_k2", "val_k4" (n = 75) come from the third split, disjoint from both: choose recipes on
  them, never on the held-out sets.
  """

  name = "depo"
  vocab_size = VOCAB_SIZE
  seq_len = SEQ_LEN

  seed: int = 0
  node_law: str = "original"
  full_share: float = 0.0
  hop_law: str = "uniform"
  wrap: bool = False

  def __post_init__(self):
    self._generator("train")  # validates every field (its fields are the generator's)

  @classmethod
  def from_mapping(cls, values, path: str = "config.task") -> Depo:
    legacy = sorted(_LEGACY_FIELDS & set(values))
    if legacy:
      raise FieldError(
          f"{path}.{legacy[0]}", "this config is of the old Depo format (names of 1-2 tokens, "
          "no arrow or comma; before issue 21), whose data this code no longer makes. The "
          f"training graphs are now set by {path}.node_law (one of {NODE_LAWS}), full_share "
          f"(share of n = 75 graphs, in [0, 1]), hop_law (one of {HOP_LAWS}) and wrap; e.g. "
          "full_share=1.0 trains on n = 75 only")
    return super().from_mapping(values, path)

  def _generator(self, split: str, **kw) -> DepoTask:
    return DepoTask(seed=self.seed, split=split, node_law=self.node_law,
                    full_share=self.full_share, hop_law=self.hop_law, wrap=self.wrap, **kw)

  def train_examples(self, data_seed: int, indices) -> dict[str, np.ndarray]:
    batch = self._generator("train").replace(seed=self.seed + data_seed).batch(indices)
    return {k: batch[k] for k in BATCH_KEYS}

  def eval_set_names(self) -> tuple[str, ...]:
    return (*(f"k{k}" for k in EVAL_HOPS), "train_law", *(f"val_k{k}" for k in VALID_HOPS))

  def generator(self, name: str) -> DepoTask:
    """The `DepoTask` that makes eval (or validation) set `name`."""
    self._check_eval_name(name)
    if name == "train_law":
      return self._generator("eval")
    split = "valid" if name.startswith("val_") else "eval"
    return DepoTask(seed=self.seed, split=split, hops=int(name.rsplit("k", 1)[1]),
                    num_nodes=MAX_NODES)

  def eval_examples(self, name: str, indices) -> dict[str, np.ndarray]:
    batch = self.generator(name).batch(indices)
    return {k: batch[k] for k in BATCH_KEYS}

  def eval_set_id(self, name: str) -> str:
    """The n = 75 sets depend only on the seed (every recipe shares them); "train_law" also on
    the laws. "arrows" tells them from the old format's sets (ids "depo_k1_n75_s0", ...)."""
    self._check_eval_name(name)
    if name != "train_law":
      return f"depo_arrows_{name}_n{MAX_NODES}_s{self.seed}"
    share = repr(float(self.full_share)).replace(".", "p").replace("-", "m")
    return (f"depo_arrows_train_law_{self.node_law}_full{share}_{self.hop_law}"
            f"_{'wrap' if self.wrap else 'nowrap'}_s{self.seed}")

  def chance(self, name: str) -> dict[str, float]:
    """The names-only guesser (`names_only_guesser`) in expectation over the set's n: at n = 75
    per-query accuracy 1/74 and loss log 74 = 4.304 nats per answer token. For "train_law" with
    wrap, queries with k >= n are scored as if k < n."""
    self._check_eval_name(name)
    if name == "train_law":
      probs = node_count_probs(self.node_law, self.full_share)
      n, p = np.array(list(probs)), np.array(list(probs.values()))
    else:
      n, p = np.array([MAX_NODES]), np.array([1.0])
    g = names_only_guesser(n)
    return {k: float((v * p).sum()) for k, v in g.items()}
