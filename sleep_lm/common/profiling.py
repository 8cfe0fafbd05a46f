"""Where the device time of a jitted step goes: trace a few calls, sum the device events by name.

  table = device_time_table(lambda: step(state, batch), calls=3, log_dir="/tmp/trace")
  print(format_table(table))

Uses `jax.profiler.trace` and reads the xplane file back with `jax.profiler.ProfileData`, so it
needs nothing beyond jax (no TensorBoard). On a GPU the events are the kernels launched on the
device's streams (cuBLAS/cuDNN calls, XLA fusions, Pallas kernels by name); a CPU run has no device
plane and yields an empty table.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from collections.abc import Callable, Sequence

import jax

# Lines of a device plane that summarise other lines (counting them would count kernels twice).
_SUMMARY_LINES = ("XLA Modules", "XLA Ops", "Steps", "Source", "Framework", "TensorFlow")


def _latest_xplane(log_dir: str) -> str:
  paths = glob.glob(os.path.join(glob.escape(log_dir), "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {log_dir!r}: did the trace run?")
  return max(paths, key=os.path.getmtime)


def device_events(xplane_path: str) -> list[tuple[str, str, float]]:
  """(plane, event name, duration in ms) of every kernel on a device stream."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  events = []
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if any(s in line.name for s in _SUMMARY_LINES):
        continue
      events.extend((plane.name, e.name, e.duration_ns / 1e6) for e in line.events)
  return events


# Kernels that only move bytes: the CUDA runtime's device-to-device copies and XLA's copy and
# transpose kernels (named after their fusion root).
COPY_KERNELS = r"(?i)memcpy|memset|^copy|_copy|transpose"


def device_time_table(fn: Callable[[], object], *, calls: int, log_dir: str,
                      top: int | None = 25, groups: dict[str, str] | None = None) -> dict:
  """Runs `fn` once untraced (warm-up), then `calls` times traced; per-call device ms by name.

  Returns {"total_ms_per_call", "rows": [{"name", "ms_per_call", "count_per_call", "share"}],
  "groups": {group: {"ms_per_call", "count_per_call", "share"}}} with the `top` largest names
  (every name with top=None; the rest summed into one "(other)" row) and, for each regex in
  `groups` (default: "copies", `COPY_KERNELS`), the kernels whose name it matches, over all
  events.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}")
  jax.block_until_ready(fn())
  with jax.profiler.trace(log_dir):
    for _ in range(calls):
      jax.block_until_ready(fn())
  totals, counts = collections.Counter(), collections.Counter()
  for _, name, ms in device_events(_latest_xplane(log_dir)):
    totals[name] += ms
    counts[name] += 1
  total = sum(totals.values())
  group_rows = {}
  for group, pattern in (groups if groups is not None else {"copies": COPY_KERNELS}).items():
    names = [n for n in totals if re.search(pattern, n)]
    ms = sum(totals[n] for n in names)
    group_rows[group] = {"ms_per_call": ms / calls,
                         "count_per_call": sum(counts[n] for n in names) / calls,
                         "share": ms / total if total else 0.0}
  rows = [{"name": n, "ms_per_call": ms / calls, "count_per_call": counts[n] / calls,
           "share": ms / total if total else 0.0} for n, ms in totals.most_common(top)]
  rest = total - sum(totals[n] for n, _ in totals.most_common(top))
  if rest > 0:
    rows.append({"name": "(other)", "ms_per_call": rest / calls,
                 "count_per_call": (sum(counts.values()) - sum(r["count_per_call"] * calls
                                                               for r in rows)) / calls,
                 "share": rest / total})
  return {"total_ms_per_call": total / calls, "rows": rows, "groups": group_rows}


def family_table(table: dict, families: Sequence[tuple[str, str]]) -> dict:
  """Each kernel of `table` (made with top=None, so that no row is "(other)") in the first
  family whose regex matches its name, or in "other": {family: {"ms_per_call",
  "count_per_call", "share"}}, in the order given, summing to the table's total."""
  out = {name: {"ms_per_call": 0.0, "count_per_call": 0.0, "share": 0.0}
         for name in [*(f for f, _ in families), "other"]}
  for row in table["rows"]:
    family = next((f for f, pattern in families if re.search(pattern, row["name"])), "other")
    for key in ("ms_per_call", "count_per_call", "share"):
      out[family][key] += row[key]
  return out


def format_families(families: dict) -> str:
  lines = [f"{'ms/call':>9} {'share':>6} {'n/call':>7}  family (each kernel in its first match)"]
  lines += [f"{r['ms_per_call']:9.3f} {100 * r['share']:5.1f}% {r['count_per_call']:7.1f}  {name}"
            for name, r in families.items()]
  return "\n".join(lines)


def format_table(table: dict, width: int = 70) -> str:
  if not table["rows"]:
    return "no device events (a CPU run has no device plane)"
  lines = [f"device time per call: {table['total_ms_per_call']:.3f} ms (kernels summed over "
           "streams)", f"{'ms/call':>9} {'share':>6} {'n/call':>7}  kernel"]
  for r in table["rows"]:
    name = r["name"] if len(r["name"]) <= width else r["name"][:width - 3] + "..."
    lines.append(f"{r['ms_per_call']:9.3f} {100 * r['share']:5.1f}% {r['count_per_call']:7.1f}  "
                 f"{name}")
  for group, r in table.get("groups", {}).items():
    lines.append(f"{r['ms_per_call']:9.3f} {100 * r['share']:5.1f}% {r['count_per_call']:7.1f}  "
                 f"[all {group}]")
  return "\n".join(lines)
