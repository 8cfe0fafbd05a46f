"""The tasks, keyed by `config.task.name`: one module per task, an immutable registry.

  task = make_task({"name": "rule110", "t": 12, "seed": 0})
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from sleep_lm.common.validation import check_choice
from sleep_lm.tasks.base import BATCH_KEYS, Task, train_dataset
from sleep_lm.tasks.depo import Depo
from sleep_lm.tasks.gsm_symbolic import GsmSymbolic
from sleep_lm.tasks.gsm_text import GsmText
from sleep_lm.tasks.rule110 import Rule110
from sleep_lm.tasks.text import Text

TASKS: Mapping[str, type[Task]] = types.MappingProxyType({
    cls.name: cls for cls in (Rule110, Depo, GsmSymbolic, GsmText, Text)})


def make_task(values: Mapping[str, Any]) -> Task:
  """The task named by values["name"], built from the other keys (rejected by name if unknown)."""
  values = dict(values)
  name = values.pop("name", None)
  check_choice("config.task.name", name, sorted(TASKS))
  return TASKS[name].from_mapping(values)


__all__ = ["BATCH_KEYS", "TASKS", "Task", "make_task", "train_dataset"]
