"""Rule 110 task (paper Task 1): recall-and-compute over evicted context.

One example is SEQ_LEN = 104 tokens over the vocabulary {ZERO=0, ONE=1, QUERY=2}:

  position  0 ..  23   state 0, 24 cells as ZERO/ONE tokens (cell 0 first)
  position 24 ..  47   state 1
  position 48 ..  71   state 2
  position 72 ..  95   state 3
  position 96 .. 103   Q a0 Q a1 Q a2 Q a3

a_i is cell 0 of state i after t steps of Rule 110 on a periodic ring. `targets[p]` is the token the
model must predict at position p (the next token): a_i at the QUERY position before it, ZERO
elsewhere; `loss_mask` is 1 exactly at the 4 QUERY positions (96, 98, 100, 102) and
`answer_group` numbers them 0..3 (-1 elsewhere). With window L = 24 each state fills one window and
is evicted before any question is asked.

Every example is a pure function of (seed, split, index): a counter-based hash (splitmix64)
keyed by those three values draws the states, so any worker, shard or resumed run can produce any
example without carrying RNG state. Train and eval use different split keys, so the two streams
never share an (index, key) pair; the contexts could only coincide by a 2^-96-per-pair accident.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from sleep_lm.common.validation import check_choice, check_int
from sleep_lm.tasks.base import GOLDEN, MASK64, Task, example_keys, mix64

ZERO = 0
ONE = 1
QUERY = 2
VOCAB_SIZE = 3
NUM_STATES = 4
STATE_BITS = 24
SEQ_LEN = NUM_STATES * STATE_BITS + NUM_STATES * 2  # 104

SPLITS = ("train", "eval")
# Stream keys mixed into the hash; arbitrary distinct 64-bit constants, fixed forever (changing
# them changes every dataset).
_SPLIT_KEYS = {"train": 0x7472_6169_6E00_0110, "eval": 0x6576_616C_0000_0110}

def rule110_step(states: np.ndarray) -> np.ndarray:
  """One Rule 110 step on a periodic ring. states: bool [..., bits] -> bool [..., bits]."""
  states = np.asarray(states)
  if states.dtype != np.bool_:
    raise ValueError(f"states must be a bool array, got dtype {states.dtype}")
  if states.ndim < 1 or states.shape[-1] < 1:
    raise ValueError(f"states must have shape [..., bits] with bits >= 1, got {states.shape}")
  left = np.roll(states, 1, axis=-1)  # cell j-1
  right = np.roll(states, -1, axis=-1)  # cell j+1
  # Rule 110 = 0b01101110: on iff (centre or right) and not all three on.
  return (states | right) & ~(left & states & right)


def evolve(states: np.ndarray, t: int) -> np.ndarray:
  """Applies `rule110_step` t times. states: bool [..., bits]."""
  t = check_int("t", t, 0)
  states = np.asarray(states)
  if states.dtype != np.bool_:
    raise ValueError(f"states must be a bool array, got dtype {states.dtype}")
  for _ in range(t):
    states = rule110_step(states)
  return states


@dataclasses.dataclass(frozen=True)
class Rule110Task:
  """Rule 110 example generator for one (seed, t, split); hashable and picklable.

  seed: non-negative int (< 2^64). t: automaton steps (0 = pure recall). split: "train" or
  "eval" (disjoint seed streams). num_states / state_bits: layout sizes (paper: 4 x 24).
  """

  seed: int = 0
  t: int = 8
  split: str = "train"
  num_states: int = NUM_STATES
  state_bits: int = STATE_BITS

  def __post_init__(self):
    check_int("seed", self.seed, 0, MASK64)
    check_int("t", self.t, 0)
    check_choice("split", self.split, SPLITS)
    check_int("num_states", self.num_states, 1)
    # One 64-bit hash word per state; 3 cells is the smallest ring with distinct neighbours.
    check_int("state_bits", self.state_bits, 3, 64)

  @property
  def seq_len(self) -> int:
    return self.num_states * (self.state_bits + 2)

  @property
  def query_positions(self) -> np.ndarray:
    """Positions of the QUERY tokens (where the loss is taken), int [num_states]."""
    return self.num_states * self.state_bits + 2 * np.arange(self.num_states)

  def replace(self, **changes) -> Rule110Task:
    return dataclasses.replace(self, **changes)

  def states(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
    """Initial states for example indices: bool [n, num_states, state_bits]."""
    h = example_keys(self.seed, _SPLIT_KEYS[self.split], indices)       # [n]
    word_ids = np.arange(1, self.num_states + 1, dtype=np.uint64) * GOLDEN
    words = mix64(h[:, None] + word_ids[None, :])  # [n, num_states]
    shifts = np.arange(self.state_bits, dtype=np.uint64)
    return ((words[..., None] >> shifts) & np.uint64(1)).astype(np.bool_)

  def batch(self, indices: Iterable[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Examples for `indices`, stacked: inputs/targets/answer_group int32 [n, L], loss_mask
    float32 [n, L]."""
    states = self.states(indices)
    n = states.shape[0]
    answers = evolve(states, self.t)[..., 0].astype(np.int32)  # [n, num_states]
    ctx = self.num_states * self.state_bits
    inputs = np.empty((n, self.seq_len), np.int32)
    inputs[:, :ctx] = states.reshape(n, ctx)
    inputs[:, ctx::2] = QUERY
    inputs[:, ctx + 1::2] = answers
    qpos = self.query_positions
    targets = np.zeros((n, self.seq_len), np.int32)
    targets[:, qpos] = answers
    loss_mask = np.zeros((n, self.seq_len), np.float32)
    loss_mask[:, qpos] = 1.0
    answer_group = np.full((n, self.seq_len), -1, np.int32)
    answer_group[:, qpos] = np.arange(self.num_states, dtype=np.int32)
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "answer_group": answer_group}

  def example(self, index: int) -> dict[str, np.ndarray]:
    """One example: the arrays of `batch` for one index, without the leading axis."""
    index = check_int("index", index, 0, MASK64)
    return {k: v[0] for k, v in self.batch(np.array([index], np.uint64)).items()}


@dataclasses.dataclass(frozen=True)
class Rule110(Task):
  """The task interface (`config.task`: name="rule110", t, seed) over `Rule110Task`.

  t: automaton steps of the trained (and evaluated) depth. seed: the task seed; it keys the
  eval set (the stream "eval") and, mixed with each model seed, the training streams.
  """

  name = "rule110"
  vocab_size = VOCAB_SIZE
  seq_len = SEQ_LEN
  token_chars = "01Q"      # ZERO, ONE, QUERY

  t: int = 8
  seed: int = 0

  def __post_init__(self):
    Rule110Task(seed=self.seed, t=self.t)  # validates t and seed, naming them

  def train_examples(self, data_seed: int, indices) -> dict[str, np.ndarray]:
    return Rule110Task(seed=self.seed + data_seed, t=self.t).batch(indices)

  def eval_set_names(self) -> tuple[str, ...]:
    return (f"t{self.t}",)

  def eval_examples(self, name: str, indices) -> dict[str, np.ndarray]:
    self._check_eval_name(name)
    return Rule110Task(seed=self.seed, t=self.t, split="eval").batch(indices)

  def eval_set_id(self, name: str) -> str:
    self._check_eval_name(name)
    return f"rule110_t{self.t}_s{self.seed}"

  def chance(self, name: str) -> dict[str, float]:
    self._check_eval_name(name)
    return {"exact_accuracy": 0.5 ** NUM_STATES, "answer_accuracy": 0.5}
