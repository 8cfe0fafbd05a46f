"""TensorBoard scalars through tensorboardX (no TensorFlow).

  writer = ScalarWriter("<workdir>/tensorboard/seed_0", start_step=0)
  writer.scalars(step, {"train/loss": 0.69, "eval/t12/exact_accuracy": 0.11})
  writer.close()

Each writer starts a new event file in its folder: a resumed run adds one beside the earlier
run's, and TensorBoard reads the folder as one run. The earlier run may have logged steps past
the checkpoint this one resumes from (it is redone, so the points would show twice): each file
opens with a SessionLog START at `start_step + 1`, on which TensorBoard drops every earlier
point at that step or later (its event accumulator's purge, the one tensorboardX's
`purge_step` uses). `scalars` returns only once its event is
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
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

# tensorboardX names a file by the second, the host and a suffix, and truncates a file of that
# name: the pid and a serial number keep two writers of one folder from sharing a file.
_serial = itertools.count()


class ScalarWriter:
  """Writes scalar summaries to a new event file in `log_dir`, for a run that starts (or
  resumes) at `start_step`: its points are at steps > start_step."""

  def __init__(self, log_dir: str | Path, start_step: int):
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    self._events = EventsWriter(str(log_dir / "events"),
                                filename_suffix=f".{os.getpid()}.{next(_serial)}.sleep_lm")
    self._events.write_event(Event(wall_time=time.time(), step=int(start_step) + 1,
                                   session_log=SessionLog(status=SessionLog.START)))
    self._events.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))
                             for tag, value in values.items()])
    self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
    self._events.flush()

  def close(self) -> None:
    self._events.close()
