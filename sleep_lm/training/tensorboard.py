"""TensorBoard scalars through tensorboardX (no TensorFlow).

  writer = ScalarWriter("<workdir>/tensorboard/seed_0")
  writer.scalars(step, {"train/loss": 0.69, "eval/t12/exact_accuracy": 0.11})
  writer.close()

Each writer starts a new event file in its folder: a resumed run adds one beside the earlier
run's, and TensorBoard reads the folder as one run. `scalars` returns only once its event is
written and flushed, so a killed run loses none of the points it wrote. That is why this uses
tensorboardX's synchronous `EventsWriter` and not its `SummaryWriter`, which hands events to a
background thread that writes them to disk only every `flush_secs` (its `flush()` does not wait
for that thread). Non-finite values are written as they are (TensorBoard shows NaN).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from pathlib import Path

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

# tensorboardX names a file by the second, the host and a suffix, and truncates a file of that
# name: the pid and a serial number keep two writers of one folder from sharing a file.
_serial = itertools.count()


class ScalarWriter:
  """Writes scalar summaries to a new event file in `log_dir`."""

  def __init__(self, log_dir: str | Path):
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    self._events = EventsWriter(str(log_dir / "events"),
                                filename_suffix=f".{os.getpid()}.{next(_serial)}.sleep_lm")

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))
                             for tag, value in values.items()])
    self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
    self._events.flush()

  def close(self) -> None:
    self._events.close()
