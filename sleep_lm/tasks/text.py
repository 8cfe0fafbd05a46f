"""The task of a converted pretrained model (`sleep_lm.pretrained.convert`): text over the
model's own vocabulary, with no data of its own yet.

A run config needs a task (it sets the vocabulary size and the example length); a model converted
from a pretrained checkpoint has a vocabulary but no training or evaluation data in sleep_lm.
`Text` holds just that: `vocab_size` (the checkpoint's) and `seq_len`. It has no eval sets
(`sleep_lm.evaluate` restores the workdir and reports none), and asking it for training
examples is an error that says so: a converted model fine-tunes on a task with data, e.g.
`gsm_text` (GSM-Infinite rendered as text in the model's tokens; experiments/pretrained_gsm.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sleep_lm.common.validation import check_int
from sleep_lm.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Text(Task):
  """Text in a pretrained model's vocabulary; no data (see the module docstring).

  Attributes:
    vocab_size: the model's vocabulary (embedding rows).
    seq_len: the example length a run would train on (the schedule's window count).
  """
  name = "text"
  vocab_size: int = 0
  seq_len: int = 2048

  def __post_init__(self):
    check_int("vocab_size", self.vocab_size, 1)
    check_int("seq_len", self.seq_len, 1)

  def train_examples(self, data_seed: int, indices) -> dict[str, np.ndarray]:
    raise ValueError("config.task: the 'text' task has no training data (a converted "
                     "pretrained model); fine-tune on a task with data, e.g. 'gsm_text' "
                     "(experiments/pretrained_gsm.py)")

  def eval_set_names(self) -> tuple[str, ...]:
    return ()

  def eval_examples(self, name: str, indices) -> dict[str, np.ndarray]:
    self._check_eval_name(name)
    raise AssertionError("unreachable: no eval sets")

  def chance(self, name: str) -> dict[str, float]:
    self._check_eval_name(name)
    raise AssertionError("unreachable: no eval sets")

  def layout_mask(self) -> np.ndarray:
    """Every token predicted (language modelling): with eviction "none", one window."""
    return np.ones(self.seq_len, np.float32)
