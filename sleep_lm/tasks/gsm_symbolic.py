"""GSM-Infinite, symbolic subset (paper Task 3, Figs. 4-6): which variables equal q?

Re-implemented from the published design of GSM-Infinite's symbolic generator (Zhou et al. 2025;
Infini-AI-Lab/gsm_infinite, which has no license: no code of it is used here).

The problem (`Problem`, a small structure from which both the token ids and the text are made):
  * Variables are named `V` + 6 digits, drawn without replacement from a pool of 10^6 names.
  * A core tree over `op` variables: its root gets `assign V_root = c.` (c uniform in 0..10);
    every other core variable i (in creation order) has a parent uniform among the earlier ones
    and gets `assign V_i = V_parent.`, `... + 1.` or `... - 1.` (uniform).
  * Distractors: a second tree of the same look-alike statements whose root is never assigned,
    so none of its variables can be derived. Its size fills the problem to a target length.
  * All statements are shuffled together. The question asks which variables equal q, where q is
    the value of a core variable drawn uniformly; the answer is the SET of core variables whose
    value is q (never empty), written in increasing name order and scored by exact match.
  * The paper's variant (the default): the question comes *before* the context (so it is
    evicted too) and the answer follows the context directly (no chain of thought).

Tokens (a word-level vocabulary for models trained from scratch; VOCAB_SIZE = 2098):
  PAD = 0, ASSIGN = 1 "assign", EQ = 2 "=", PLUS = 3 "+", MINUS = 4 "-", DOT = 5 ".",
  QUESTION = 6 (the question marker, followed by q), ANSWER = 7 (the answer marker),
  END = 8 (closes the answer list, so the set's size is part of the prediction),
  INT_BASE + (v - INT_MIN) = 9..97: one token per integer v in INT_MIN..INT_MAX (-39..49),
  HI_BASE + d // 1000 = 98..1097 and LO_BASE + d % 1000 = 1098..2097: a name V<d> (d < 10^6) is
  two tokens, its first three and last three digits (self-delimiting: a HI token then a LO one).

  statement                      tokens                                       count
  assign V001002 = 7.            ASSIGN HI1 LO2 EQ INT7 DOT                   6
  assign V001002 = V003004.      ASSIGN HI1 LO2 EQ HI3 LO4 DOT                7
  assign V001002 = V003004 + 1.  ASSIGN HI1 LO2 EQ HI3 LO4 PLUS INT1 DOT      9
  question                       QUESTION INTq                                2
  answer                         ANSWER HI LO HI LO ... END                   2 + 2k

Layout of one example, seq_len = max_len + 2 * max_op + 2 tokens (fixed per task):
  positions 0 .. max_len-1          the problem (question + statements, `length` tokens, in
                                    [min_len, max_len]) and max_len - length PAD tokens:
                                    padding="left": PAD ... PAD  problem      (as Depo)
                                    padding="middle": problem  PAD ... PAD    (the problem starts
                                    at position 0, so windows cut it where the paper's would)
  positions max_len .. seq_len-1    ANSWER name_1 .. name_k END PAD ... PAD   (k <= op <= max_op)
Supervision: `targets[p] = inputs[p + 1]` at p = max_len .. max_len + 2k (the ANSWER position
predicts the first name token, ..., the last name token predicts END); `loss_mask` is 1 there and
`answer_group` 0 (one answer per example: the example is right iff every answer token and END
is right, i.e. greedy decoding writes exactly the set). The answer region lies after every
problem token, so with any window L that keeps positions max_len..seq_len-1 in one window, that
window is the only prediction window: the static schedule of `Task.layout_mask`.

Length control: a target length is drawn uniformly in [min_len + 8, max_len]; the distractor
tree grows one statement at a time while the problem still fits it (a statement is 7 or 9
tokens), so every problem is 0-8 tokens shorter than its target and lies in [min_len, max_len].
The original sets the number of distractor statements from a target length, about one per 11.7
tokens of its (BPE) text; our statements average 8.3 tokens, so at equal token length a problem
here holds ~1.4x more statements than the original's (`statements_per_token`).

Sampling and purity: every example is a pure function of (seed, split, op, task fields, index)
through counter-based splitmix64 hashing (`tasks.base.example_keys`), vectorised in numpy; any
worker or resumed run can make any example. Training draws op uniformly in [min_op, max_op] per
example (the paper: 1..8); the eval sets fix it ("op2" has op = 2, ...).

Curriculum (`GsmSymbolic.curriculum`, training only): stages of (until, min_len, max_len,
max_op) by training example index; a stage's problems are drawn with its smaller lengths and op
counts and placed in the task's own layout (`GsmSymbolicTask.layout_len`, `layout_op`), so
seq_len and the window schedule never change.

Train/eval disjointness is exact: the 10^6 names are split in two pools by the parity of a
64-bit hash of the name (`name_pool`), train problems use only pool-0 names and eval problems only
pool-1 names, so no eval problem shares even one variable with any training problem, whatever
the seeds. Both pools cover every HI and LO token (each holds about half the names of every
prefix). The original draws from all 10^6 names.

Reference levels (`structural_floors`, measured on each eval set by the evaluator):
  floor_root_only: answer {the variable assigned a constant} (pure recall, no arithmetic);
  floor_all_derivable: answer every derivable variable (tree tracing, no arithmetic);
  floor_mode / floor_empty: the most common answer set / the empty set (about 0 and exactly 0:
    names are random and the answer is never empty);
  chance (`chance`): a guesser that knows the derivable variables and names a uniformly random
    non-empty subset of them: 1 / (2^op - 1).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from sleep_lm.common.validation import FieldError, check_choice, check_int, expect, relocate
from sleep_lm.tasks.base import BATCH_KEYS, GOLDEN, MASK64, Task, example_keys, mix64

# ----------------------------------------------------------------------------------- vocabulary

PAD, ASSIGN, EQ, PLUS, MINUS, DOT, QUESTION, ANSWER, END = range(9)
MAX_OP = 40                      # largest op count any task may use (the original's range)
MAX_CONST = 10                   # the root's constant is uniform in 0..MAX_CONST
INT_MIN, INT_MAX = -(MAX_OP - 1), MAX_CONST + MAX_OP - 1   # every value a core variable can take
INT_BASE = 9
HI_BASE = INT_BASE + INT_MAX - INT_MIN + 1      # 98
LO_BASE = HI_BASE + 1000                        # 1098
VOCAB_SIZE = LO_BASE + 1000                     # 2098
NUM_NAMES = 10**6

QUESTION_LEN = 2
ROOT_LEN, COPY_LEN, STEP_LEN = 6, 7, 9          # tokens of `= c.`, `= V.`, `= V +/- 1.` statements
LENGTH_SLACK = STEP_LEN - 1                     # a problem is at most this far below its target
# The original: one distractor statement per 9668 / 828 = 11.7 target tokens. Ours: 8.3 tokens
# per distractor statement on average (1/3 copies of 7 tokens, 2/3 steps of 9).
ORIGINAL_TOKENS_PER_STATEMENT = 9668 / 828
TOKENS_PER_STATEMENT = (COPY_LEN + 2 * STEP_LEN) / 3

PADDINGS = ("left", "middle")
SPLITS = ("train", "eval")
EVAL_OPS = (1, 2, 4, 6, 8)

# Task fields of the presets (experiments/gsm_symbolic.py adds the windows and the models).
# seq_len = max_len + 2 * max_op + 2; "small" and "paper" keep the answer region in the last
# window for the windows of experiments/gsm_symbolic.py.
PRESETS = {
    "smoke": dict(min_len=72, max_len=118, max_op=4),             # seq_len 128
    "small": dict(min_len=448, max_len=622, max_op=8),            # seq_len 640
    "paper": dict(min_len=2000, max_len=3300, max_op=8),          # seq_len 3318
    "long8k": dict(min_len=6144, max_len=8174, max_op=8),         # seq_len 8192
    "long32k": dict(min_len=24576, max_len=32750, max_op=8),      # seq_len 32768
    "long64k": dict(min_len=49152, max_len=65518, max_op=8),      # seq_len 65536
}

# Arbitrary distinct 64-bit constants, fixed forever (changing them changes every dataset).
_SPLIT_KEYS = {"train": 0x7472_6169_6E00_95A1, "eval": 0x6576_616C_0000_95A1}
_SPLIT_POOL = {"train": 0, "eval": 1}
_POOL_KEY = np.uint64(0x9001_5EED_0000_95A1)
(_S_OP, _S_LEN, _S_CONST, _S_CPAR, _S_CSTEP, _S_QUERY, _S_DPAR, _S_DSTEP, _S_NAMES, _S_SHUFFLE,
 _S_FIXED_OP) = (np.uint64(0x95A1_0000_0000_0000 + i) for i in range(11))
_U64MAX = np.uint64(MASK64)


def int_token(v):
  """Token id of the integer v (INT_MIN <= v <= INT_MAX); works on arrays."""
  return INT_BASE + (np.asarray(v) - INT_MIN)


def name_text(name: int) -> str:
  """'V' + 6 digits, the original's variable names."""
  return f"V{int(name):06d}"


def name_pool(names) -> np.ndarray:
  """Pool (0: train, 1: eval) of each name d in [0, 10^6): the parity of a hash of d."""
  d = np.asarray(names, np.uint64)
  return (mix64(d ^ _POOL_KEY) & np.uint64(1)).astype(np.int64)


# ------------------------------------------------------------------------ the symbolic problem

class Statement(NamedTuple):
  """`assign lhs = operand.` when rhs is None (the core root, operand = c in 0..10), else
  `assign lhs = rhs.` (operand 0), `... + 1.` (operand 1) or `... - 1.` (operand -1)."""
  lhs: int
  rhs: int | None
  operand: int


class Problem(NamedTuple):
  """One problem: the question's value q, the statements in the order shown, and the answer (the
  names of the derivable variables equal to q, increasing). op: the core size."""
  question: int
  statements: tuple[Statement, ...]
  answer: tuple[int, ...]
  op: int


QUESTION_TEXT = "Question: which of the variables whose values can be derived are equal to {q}?"
ANSWER_TEXT = "Answer:"


def statement_text(s: Statement) -> str:
  """The original's syntax: `assign V123456 = V654321 + 1.`"""
  if s.rhs is None:
    return f"assign {name_text(s.lhs)} = {s.operand}."
  tail = {0: "", 1: " + 1", -1: " - 1"}[s.operand]
  return f"assign {name_text(s.lhs)} = {name_text(s.rhs)}{tail}."


def render_prompt(problem: Problem, *, question_first: bool = True) -> str:
  """What the model reads before answering: the question line then the statements on one line,
  space-separated as the original joins them (question_first=False: statements, then the
  question), then the answer marker."""
  question = QUESTION_TEXT.format(q=problem.question)
  context = " ".join(statement_text(s) for s in problem.statements)
  parts = [question, context] if question_first else [context, question]
  return "\n".join(parts) + "\n" + ANSWER_TEXT


def render_answer(problem: Problem) -> str:
  """The answer list, increasing: ' V000012, V345678' (with a leading space after 'Answer:')."""
  return " " + ", ".join(name_text(n) for n in problem.answer)


def render_text(problem: Problem, *, question_first: bool = True) -> str:
  """The whole example as text in the original's syntax, e.g.

    Question: which of the variables whose values can be derived are equal to 4?
    assign V120384 = V009731 + 1. assign V009731 = 3. assign V884210 = V120384. ...
    Answer: V120384, V884210

  A pure function of the problem (no tokenizer): `render_prompt` + `render_answer`. A text
  model reads the prompt and should continue with the answer."""
  return render_prompt(problem, question_first=question_first) + render_answer(problem)


def solve(problem: Problem) -> dict[int, int]:
  """Values of every derivable variable (the core), by memoised evaluation of the statements."""
  by_lhs = {s.lhs: s for s in problem.statements}
  values: dict[int, int | None] = {}

  def value(name):
    chain = []
    while name not in values:
      s = by_lhs.get(name)
      if s is None:                      # never assigned: not derivable
        values[name] = None
        break
      if s.rhs is None:
        values[name] = s.operand
        break
      chain.append(s)
      name = s.rhs
    for s in reversed(chain):
      base = values[s.rhs]
      values[s.lhs] = None if base is None else base + s.operand
    return values[chain[0].lhs] if chain else values[name]

  for s in problem.statements:
    value(s.lhs)
  return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------- hashing helpers

def _words(keys: np.ndarray, stream: np.uint64, count: int) -> np.ndarray:
  """Hash words j = 0..count-1 of one stream per row: uint64 [m] -> [m, count]. Word j does not
  depend on count, so longer prefixes extend shorter ones (batch-independent draws)."""
  base = mix64(keys ^ stream)
  j = np.arange(1, count + 1, dtype=np.uint64) * GOLDEN
  return mix64(base[:, None] + j[None, :])


def _uniform(words: np.ndarray) -> np.ndarray:
  """uint64 -> float64 uniform in [0, 1) from the top 53 bits."""
  return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _below(words: np.ndarray, n) -> np.ndarray:
  """Uniform integers in [0, n) (n >= 1, broadcast), int64."""
  return np.minimum(np.floor(_uniform(words) * n).astype(np.int64), np.asarray(n) - 1)


def _first_distinct(vals: np.ndarray, ok: np.ndarray, count: np.ndarray) -> tuple:
  """Per row, the first `count` distinct values of `vals` among the positions where `ok`, in
  stream order: (rows, ranks, values) of the picks, or None if some row has too few."""
  v = np.where(ok, vals, -1)
  order = np.argsort(v, axis=1, kind="stable")          # equal values: earliest first
  sv = np.take_along_axis(v, order, axis=1)
  first_sorted = sv >= 0
  first_sorted[:, 1:] &= sv[:, 1:] != sv[:, :-1]
  is_first = np.empty_like(first_sorted)
  np.put_along_axis(is_first, order, first_sorted, axis=1)
  if (is_first.sum(axis=1) < count).any():
    return None
  rank = np.cumsum(is_first, axis=1) - 1
  rows, cols = np.nonzero(is_first & (rank < count[:, None]))
  return rows, rank[rows, cols], vals[rows, cols]


# ----------------------------------------------------------------------------------- generator

class _Arrays(NamedTuple):
  """A batch of problems as arrays (statements in display order, -1 past n_statements)."""
  op: np.ndarray            # int64 [m]
  question: np.ndarray      # int64 [m]
  lhs: np.ndarray           # int64 [m, S] names
  rhs: np.ndarray           # int64 [m, S] names, -1 for the root's constant statement
  operand: np.ndarray       # int64 [m, S]
  n_statements: np.ndarray  # int64 [m]
  answer: np.ndarray        # int64 [m, max_op] names, increasing, -1 past answer_size
  answer_size: np.ndarray   # int64 [m]
  length: np.ndarray        # int64 [m] problem tokens (question + statements)


def _statement_lengths(rhs: np.ndarray, operand: np.ndarray) -> np.ndarray:
  return np.where(rhs < 0, ROOT_LEN, np.where(operand == 0, COPY_LEN, STEP_LEN))


@dataclasses.dataclass(frozen=True)
class GsmSymbolicTask:
  """Generator of GSM-Infinite symbolic problems; hashable and picklable.

  seed: non-negative int (< 2^64). split: "train" or "eval" (disjoint name pools).
  op: None draws op uniformly in [min_op, max_op] per example; an int fixes it.
  min_len, max_len: problem length range in tokens (question + statements).
  max_op: the answer region holds up to max_op names (seq_len = max_len + 2 max_op + 2).
  question_first: the paper's order (question, statements, answer); False puts the question
    after the statements, as the original's prompt does.
  padding: "left" (PAD before the problem) or "middle" (the problem at position 0, PAD between
    it and the answer).
  layout_len, layout_op: the layout's sizes (None: max_len, max_op): the problem region holds
    layout_len tokens and the answer region 2 layout_op + 2, so that problems drawn with smaller
    max_len / max_op (a curriculum stage) sit in a longer task's layout, exactly as that task
    places its own shorter problems.
  """

  seed: int = 0
  split: str = "train"
  op: int | None = None
  min_len: int = PRESETS["small"]["min_len"]
  max_len: int = PRESETS["small"]["max_len"]
  min_op: int = 1
  max_op: int = PRESETS["small"]["max_op"]
  question_first: bool = True
  padding: str = "left"
  layout_len: int | None = None
  layout_op: int | None = None

  def __post_init__(self):
    check_int("seed", self.seed, 0, MASK64)
    check_choice("split", self.split, SPLITS)
    check_int("max_op", self.max_op, 1, MAX_OP)
    check_int("min_op", self.min_op, 1, self.max_op)
    if self.op is not None:
      check_int("op", self.op, 1, self.max_op)
    # The longest core with its question must fit the shortest problem.
    core = QUESTION_LEN + ROOT_LEN + STEP_LEN * (self.max_op - 1)
    check_int("min_len", self.min_len, core)
    check_int("max_len", self.max_len, self.min_len + LENGTH_SLACK)
    expect(isinstance(self.question_first, (bool, np.bool_)), "question_first",
           f"must be True or False, got {self.question_first!r}")
    check_choice("padding", self.padding, PADDINGS)
    if self.layout_len is not None:
      check_int("layout_len", self.layout_len, self.max_len)
    if self.layout_op is not None:
      check_int("layout_op", self.layout_op, self.max_op, MAX_OP)

  @property
  def problem_len(self) -> int:
    """Tokens of the problem region (layout_len, default max_len)."""
    return self.max_len if self.layout_len is None else self.layout_len

  @property
  def answer_len(self) -> int:
    return 2 * (self.max_op if self.layout_op is None else self.layout_op) + 2

  @property
  def seq_len(self) -> int:
    return self.problem_len + self.answer_len

  def replace(self, **changes) -> GsmSymbolicTask:
    return dataclasses.replace(self, **changes)

  def _keys(self, indices) -> np.ndarray:
    keys = example_keys(self.seed, _SPLIT_KEYS[self.split], indices)
    if self.op is not None:
      keys = mix64(keys ^ (np.array([self.op], np.uint64) * GOLDEN + _S_FIXED_OP))  # wraps
    return keys

  def arrays(self, indices: Iterable[int] | np.ndarray) -> _Arrays:
    """The problems of `indices` as arrays (see `_Arrays`)."""
    keys = self._keys(indices)
    m = keys.shape[0]
    rows = np.arange(m)[:, None]
    max_op = self.max_op
    if self.op is None:
      span = self.max_op - self.min_op + 1
      op = self.min_op + _below(_words(keys, _S_OP, 1)[:, 0], span)
    else:
      op = np.full(m, self.op, np.int64)
    target = (self.min_len + LENGTH_SLACK
              + _below(_words(keys, _S_LEN, 1)[:, 0], self.max_len - self.min_len - 7))

    # Core tree: node 0 is the root (`= c`), node i > 0 hangs under a uniform earlier node.
    slots = np.arange(max_op)
    c_par = _below(_words(keys, _S_CPAR, max_op), np.maximum(slots, 1))
    c_step = _below(_words(keys, _S_CSTEP, max_op), 3) - 1            # 0, +1 or -1
    c_step[:, 0] = 0
    const = _below(_words(keys, _S_CONST, 1)[:, 0], MAX_CONST + 1)
    values = np.zeros((m, max_op), np.int64)
    values[:, 0] = const
    for i in range(1, max_op):
      values[:, i] = values[np.arange(m), c_par[:, i]] + c_step[:, i]
    in_core = slots[None, :] < op[:, None]
    q_node = _below(_words(keys, _S_QUERY, 1)[:, 0], op)
    question = values[np.arange(m), q_node]
    core_len = np.where(in_core, np.where(slots == 0, ROOT_LEN,
                                          np.where(c_step == 0, COPY_LEN, STEP_LEN)), 0).sum(1)

    # Distractor tree: node 0 is its root (never assigned); node j >= 1 gets a statement under a
    # uniform earlier node. Grow while the problem still fits its target length.
    budget = target - QUESTION_LEN - core_len
    max_d = int(budget.max()) // COPY_LEN + 1
    d_idx = np.arange(1, max_d + 1)
    d_par = _below(_words(keys, _S_DPAR, max_d), d_idx)               # [m, max_d], in 0..j-1
    d_step = _below(_words(keys, _S_DSTEP, max_d), 3) - 1
    d_len = np.where(d_step == 0, COPY_LEN, STEP_LEN)
    n_d = (np.cumsum(d_len, axis=1) <= budget[:, None]).sum(1)
    length = QUESTION_LEN + core_len + np.where(
        n_d > 0, np.take_along_axis(np.cumsum(d_len, 1), np.maximum(n_d - 1, 0)[:, None], 1)[:, 0],
        0)

    # Names: distinct, from the split's pool. Node order: core 0..op-1, the distractor root,
    # distractors 1..n_d.
    need = op + 1 + n_d
    picked, count = None, 2 * int(need.max()) + 64
    while picked is None:
      vals = _below(_words(keys, _S_NAMES, count), NUM_NAMES)
      picked = _first_distinct(vals, name_pool(vals) == _SPLIT_POOL[self.split], need)
      count *= 2
    names = np.full((m, max_op + 1 + max_d), -1, np.int64)
    prow, prank, pval = picked
    names[prow, prank] = pval
    core_names = names[:, :max_op]
    d_names = np.take_along_axis(names, np.minimum(op[:, None] + np.arange(max_d + 1),
                                                   names.shape[1] - 1), axis=1)  # [m, max_d+1]

    # Statements by node (core first, then distractors), then shuffled uniformly.
    s_lhs = np.concatenate([core_names, d_names[:, 1:]], axis=1)
    s_rhs = np.concatenate([np.where(slots == 0, -1, core_names[rows, c_par]),
                            d_names[rows, d_par]], axis=1)
    s_operand = np.concatenate([np.where(slots == 0, const[:, None], c_step), d_step], axis=1)
    valid = np.concatenate([in_core, d_idx[None, :] <= n_d[:, None]], axis=1)
    shuffle_words = _words(keys, _S_SHUFFLE, valid.shape[1]) >> np.uint64(1)
    order = np.argsort(np.where(valid, shuffle_words, _U64MAX), axis=1, kind="stable")
    n_statements = op + n_d
    shown = np.arange(valid.shape[1])[None, :] < n_statements[:, None]
    take = lambda a: np.where(shown, np.take_along_axis(a, order, axis=1), -1)
    lhs, rhs, operand = take(s_lhs), take(s_rhs), take(s_operand)
    operand = np.where(shown, operand, 0)

    # The answer: the core names whose value is q, increasing.
    hit = in_core & (values == question[:, None])
    answer = np.sort(np.where(hit, core_names, NUM_NAMES), axis=1)
    answer = np.where(answer < NUM_NAMES, answer, -1)
    return _Arrays(op, question, lhs, rhs, operand, n_statements, answer, hit.sum(1), length)

  def problems(self, indices: Iterable[int] | np.ndarray) -> list[Problem]:
    """The problems of `indices` as `Problem`s (the structure the tokens and the text show)."""
    return problems_from_arrays(self.arrays(indices))

  def batch(self, indices: Iterable[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Examples for `indices`, stacked: inputs, targets, answer_group int32 [n, seq_len],
    loss_mask float32 [n, seq_len], and per example op, length (problem tokens), answer_size,
    question (q), n_statements, int32 [n]."""
    a = self.arrays(indices)
    return {**self._layout(a), "op": a.op.astype(np.int32), "length": a.length.astype(np.int32),
            "answer_size": a.answer_size.astype(np.int32), "question": a.question.astype(np.int32),
            "n_statements": a.n_statements.astype(np.int32)}

  def example(self, index: int) -> dict[str, np.ndarray]:
    """One example: the arrays of `batch` without the leading axis."""
    index = check_int("index", index, 0, MASK64)
    return {k: v[0] for k, v in self.batch(np.array([index], np.uint64)).items()}

  def _layout(self, a: _Arrays) -> dict[str, np.ndarray]:
    m, s = a.lhs.shape
    t = self.seq_len
    # Every statement as 9 token slots, -1 where it is shorter.
    tok = np.full((m, s, STEP_LEN), -1, np.int64)
    shown = a.lhs >= 0
    is_root, is_copy = shown & (a.rhs < 0), shown & (a.rhs >= 0) & (a.operand == 0)
    is_step = shown & (a.rhs >= 0) & (a.operand != 0)
    tok[..., 0] = np.where(shown, ASSIGN, -1)
    tok[..., 1] = np.where(shown, HI_BASE + a.lhs // 1000, -1)
    tok[..., 2] = np.where(shown, LO_BASE + a.lhs % 1000, -1)
    tok[..., 3] = np.where(shown, EQ, -1)
    rhs_hi, rhs_lo = HI_BASE + a.rhs // 1000, LO_BASE + a.rhs % 1000
    tok[..., 4] = np.where(is_root, int_token(np.clip(a.operand, 0, MAX_CONST)),
                           np.where(shown, rhs_hi, -1))
    tok[..., 5] = np.where(is_root, DOT, np.where(shown, rhs_lo, -1))
    tok[..., 6] = np.where(is_copy, DOT, np.where(is_step, np.where(a.operand > 0, PLUS, MINUS),
                                                  -1))
    tok[..., 7] = np.where(is_step, int_token(1), -1)
    tok[..., 8] = np.where(is_step, DOT, -1)
    tok = tok.reshape(m, s * STEP_LEN)
    question = np.stack([np.full(m, QUESTION), int_token(a.question)], axis=1)
    parts = [question, tok] if self.question_first else [tok, question]
    problem = np.concatenate(parts, axis=1)
    present = problem >= 0
    region = self.problem_len
    start = region - a.length if self.padding == "left" else np.zeros(m, np.int64)
    pos = start[:, None] + np.cumsum(present, axis=1) - 1
    inputs = np.full((m, t), PAD, np.int32)
    r, c = np.nonzero(present)
    inputs[r, pos[r, c]] = problem[r, c]

    # Answer region: ANSWER name_1 .. name_k END, then PAD.
    k = a.answer_size
    ans = np.full((m, self.answer_len), PAD, np.int64)
    ans[:, 0] = ANSWER
    names = a.answer
    width = (self.answer_len - 2) // 2
    names = np.pad(names, ((0, 0), (0, width - names.shape[1])), constant_values=-1)
    slot = np.arange(width)[None, :]
    has = slot < k[:, None]
    ans[:, 1:-1:2] = np.where(has, HI_BASE + names // 1000, PAD)
    ans[:, 2::2] = np.where(has, LO_BASE + names % 1000, PAD)
    ans[np.arange(m), 1 + 2 * k] = END
    inputs[:, region:] = ans
    offsets = np.arange(t - region)[None, :]
    supervised = np.zeros((m, t), bool)
    supervised[:, region:] = offsets <= 2 * k[:, None]
    targets = np.zeros((m, t), np.int32)
    targets[:, :-1] = np.where(supervised[:, :-1], inputs[:, 1:], 0)
    return {"inputs": inputs, "targets": targets, "loss_mask": supervised.astype(np.float32),
            "answer_group": np.where(supervised, 0, -1).astype(np.int32)}


def problems_from_arrays(a: _Arrays) -> list[Problem]:
  out = []
  for i in range(a.lhs.shape[0]):
    n = int(a.n_statements[i])
    statements = tuple(
        Statement(int(x), None if r < 0 else int(r), int(o))
        for x, r, o in zip(a.lhs[i, :n], a.rhs[i, :n], a.operand[i, :n], strict=True))
    answer = tuple(int(x) for x in a.answer[i, :int(a.answer_size[i])])
    out.append(Problem(int(a.question[i]), statements, answer, int(a.op[i])))
  return out


# ----------------------------------------------------------------------- reading tokens back

def decode(inputs: np.ndarray, max_len: int) -> Problem:
  """The problem an example's tokens (int [seq_len]) show, answer included (op: the number of
  derivable variables). Inverse of the layout for either padding and question order."""
  tok = np.asarray(inputs).astype(np.int64)
  name = lambda p: int((tok[p] - HI_BASE) * 1000 + (tok[p + 1] - LO_BASE))
  is_int = lambda x: INT_BASE <= x < HI_BASE
  statements = []
  for p in np.flatnonzero(tok[:max_len] == ASSIGN):
    if is_int(tok[p + 4]):
      statements.append(Statement(name(p + 1), None, int(tok[p + 4] - INT_BASE + INT_MIN)))
    else:
      nxt = tok[p + 6]
      statements.append(Statement(name(p + 1), name(p + 4),
                                  0 if nxt == DOT else (1 if nxt == PLUS else -1)))
  qpos = int(np.flatnonzero(tok[:max_len] == QUESTION)[0])
  question = int(tok[qpos + 1] - INT_BASE + INT_MIN)
  answer, p = [], max_len + 1
  while tok[p] != END:
    answer.append(name(p))
    p += 2
  problem = Problem(question, tuple(statements), tuple(answer), 0)
  return problem._replace(op=len(solve(problem)))


def structural_floors(inputs: np.ndarray, max_len: int) -> dict[str, float]:
  """Exact accuracy of answers that need no arithmetic, on a set of examples (int [n, seq_len]):
  `problem_floors` of the problems their tokens show."""
  return problem_floors([decode(row, max_len) for row in inputs])


def problem_floors(problems: Sequence[Problem]) -> dict[str, float]:
  """Exact accuracy of answers that need no arithmetic, on a set of problems (answers
  included): floor_root_only ({the variable assigned a constant}), floor_all_derivable (every
  derivable variable), floor_mode (the most common answer set) and floor_empty (the empty
  set). Derivability comes from `solve` on the statements shown."""
  hits = Counter()
  answers = Counter()
  n = len(problems)
  for problem in problems:
    values = solve(problem)
    root = next(s.lhs for s in problem.statements if s.rhs is None)
    hits["root_only"] += problem.answer == (root,)
    hits["all_derivable"] += problem.answer == tuple(sorted(values))
    hits["empty"] += problem.answer == ()
    answers[problem.answer] += 1
  out = {f"floor_{k}": hits[k] / max(n, 1) for k in ("root_only", "all_derivable", "empty")}
  out["floor_mode"] = max(answers.values()) / n if n else 0.0
  return out


def subset_chance(op: int) -> dict[str, float]:
  """The chance of a guesser that knows the op derivable variables and names a uniform
  non-empty subset of them: 1 / (2^op - 1) (the eval sets' "chance")."""
  p = 1.0 / (2 ** op - 1)
  return {"exact_accuracy": p, "answer_accuracy": p}


def statements_per_token(length: int) -> dict[str, float]:
  """Expected statements in a problem of `length` tokens: ours and the original's law."""
  return {"ours": (length - QUESTION_LEN) / TOKENS_PER_STATEMENT,
          "original": length / ORIGINAL_TOKENS_PER_STATEMENT}


# ------------------------------------------------------------------------- the task interface

@dataclasses.dataclass(frozen=True)
class GsmSymbolic(Task):
  """The task interface (`config.task`: name="gsm_symbolic" and the fields below).

  seed: keys the eval sets and, mixed with each model seed, the training streams.
  min_len, max_len: problem length range in tokens; max_op: largest op count (answer region
  2 max_op + 2 tokens; seq_len = max_len + 2 max_op + 2); min_op: training draws op uniformly
  in [min_op, max_op]; eval_ops: one eval set "op<k>" per k (each k <= max_op);
  question_first, padding: see `GsmSymbolicTask`. Presets: `PRESETS`.
  curriculum: training stages, a tuple of (until, min_len, max_len, max_op), `until`
    increasing: training example i of a seed's stream (step s holds s * batch_size ..
    (s + 1) * batch_size - 1) with i < until (and past the stage before) is drawn with that
    stage's length range and op range [min_op, max_op] and laid out in the task's layout
    (seq_len, padding and the answer's place do not change, so neither does the window
    schedule); past the last stage, the task's own fields. Every stage's max_len and max_op are
    at most the task's. Eval sets ignore it. () (the default): no curriculum.
  """

  name = "gsm_symbolic"
  vocab_size = VOCAB_SIZE

  seed: int = 0
  min_len: int = PRESETS["small"]["min_len"]
  max_len: int = PRESETS["small"]["max_len"]
  min_op: int = 1
  max_op: int = PRESETS["small"]["max_op"]
  eval_ops: tuple[int, ...] = EVAL_OPS
  question_first: bool = True
  padding: str = "left"
  curriculum: tuple[tuple[int, int, int, int], ...] = ()

  def __post_init__(self):
    ops = self.eval_ops
    expect(not isinstance(ops, (int, np.integer)) and isinstance(ops, Sequence) and len(ops) > 0,
           "eval_ops", f"must be a non-empty list of op counts, got {ops!r}")
    object.__setattr__(self, "eval_ops", tuple(ops))
    self._generator("train")  # validates the fields the generator shares
    for k in self.eval_ops:
      check_int("eval_ops", k, 1, self.max_op)
    expect(len(set(self.eval_ops)) == len(self.eval_ops), "eval_ops",
           f"must not repeat an op count, got {self.eval_ops}")
    object.__setattr__(self, "curriculum", self._check_curriculum(self.curriculum))

  def _check_curriculum(self, stages) -> tuple[tuple[int, int, int, int], ...]:
    expect(not isinstance(stages, (str, bytes)) and isinstance(stages, Sequence), "curriculum",
           f"must be a list of (until, min_len, max_len, max_op) stages, got {stages!r}")
    out, last = [], 0
    for k, stage in enumerate(stages):
      where = f"curriculum[{k}]"
      expect(not isinstance(stage, (str, bytes)) and isinstance(stage, Sequence)
             and len(stage) == 4, where,
             f"must be (until, min_len, max_len, max_op), got {stage!r}")
      try:        # the stage's fields, and the generator's checks of them, named in the stage
        until = check_int("until", stage[0], last + 1)
        min_len, max_len, max_op = (check_int(n, v, 1) for n, v in
                                    zip(("min_len", "max_len", "max_op"), stage[1:], strict=True))
        check_int("max_len", max_len, 1, self.max_len)
        check_int("max_op", max_op, 1, self.max_op)
        self._stage_generator((until, min_len, max_len, max_op), seed=0)
      except FieldError as e:
        raise relocate(e, where) from None
      out.append((until, min_len, max_len, max_op))
      last = until
    return tuple(out)

  def _stage_generator(self, stage, seed: int) -> GsmSymbolicTask:
    _, min_len, max_len, max_op = stage
    return GsmSymbolicTask(seed=seed, split="train", min_len=min_len, max_len=max_len,
                           min_op=self.min_op, max_op=max_op, question_first=self.question_first,
                           padding=self.padding, layout_len=self.max_len, layout_op=self.max_op)

  def _generator(self, split: str, seed: int | None = None, op: int | None = None):
    return GsmSymbolicTask(seed=self.seed if seed is None else seed, split=split, op=op,
                           min_len=self.min_len, max_len=self.max_len, min_op=self.min_op,
                           max_op=self.max_op, question_first=self.question_first,
                           padding=self.padding)

  @property
  def seq_len(self) -> int:
    return self._generator("train").seq_len

  def train_examples(self, data_seed: int, indices) -> dict[str, np.ndarray]:
    seed = self.seed + data_seed
    if not self.curriculum:
      batch = self._generator("train", seed=seed).batch(indices)
      return {k: batch[k] for k in BATCH_KEYS}
    indices = np.asarray(indices, np.uint64).reshape(-1)
    bounds = np.array([s[0] for s in self.curriculum], np.uint64)
    stage = np.searchsorted(bounds, indices, side="right")     # len(bounds): past the last
    out = None
    for k in np.unique(stage):
      gen = (self._generator("train", seed=seed) if k == len(bounds)
             else self._stage_generator(self.curriculum[k], seed))
      rows = np.flatnonzero(stage == k)
      part = gen.batch(indices[rows])
      if out is None:
        out = {key: np.zeros((len(indices), *part[key].shape[1:]), part[key].dtype)
               for key in BATCH_KEYS}
      for key in BATCH_KEYS:
        out[key][rows] = part[key]
    return out

  def eval_set_names(self) -> tuple[str, ...]:
    return tuple(f"op{k}" for k in self.eval_ops)

  def eval_examples(self, name: str, indices) -> dict[str, np.ndarray]:
    self._check_eval_name(name)
    batch = self._generator("eval", op=int(name[2:])).batch(indices)
    return {k: batch[k] for k in BATCH_KEYS}

  def eval_set_id(self, name: str) -> str:
    # The set's content depends on these fields only (not on min_op or the other eval ops).
    self._check_eval_name(name)
    order = "qfirst" if self.question_first else "qlast"
    return (f"gsm_symbolic_{name}_len{self.min_len}-{self.max_len}_maxop{self.max_op}_{order}_"
            f"{self.padding}_s{self.seed}")

  def chance(self, name: str) -> dict[str, float]:
    self._check_eval_name(name)
    return subset_chance(int(name[2:]))

  def set_floors(self, name: str, batch: dict[str, np.ndarray]) -> dict[str, float]:
    self._check_eval_name(name)
    return structural_floors(batch["inputs"], self.max_len)

  def layout_mask(self) -> np.ndarray:
    """Every position that can be supervised (the answer region but its last token): the same
    windows as every example's own mask, whatever its answer size."""
    mask = np.zeros(self.seq_len, np.float32)
    mask[self.max_len:self.max_len + 2 * self.max_op + 1] = 1.0
    return mask
