"""Whether a batch fits in device memory, checked before it is allocated: a request too large is
refused with its limit (a `UserError`) instead of exhausting the memory mid-run.

  check_batch_fits(lambda b: decode_state(config, b), num_streams, what="--num_streams")

What one item (a stream) costs is measured by shape evaluation, nothing allocated: the bytes of
`make(2)` minus those of `make(1)` (so shared leaves, like a position counter, do not count). The
budget is half the free memory of the device: `bytes_limit - bytes_in_use` of
`device.memory_stats()` where the device reports them (GPU, TPU; the parameters, already loaded,
are in use), else, on a CPU, the host's available memory (MemAvailable). The other half is left
for what scales with the batch besides the state (prefill and decode activations, logits) and
for compilation. Where neither is known, at most `UNKNOWN_MEMORY_CAP` items are allowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from sleep_lm.common.errors import UserError

UNKNOWN_MEMORY_CAP = 1024
BUDGET_FRACTION = 0.5


def tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def bytes_per_item(make: Callable[[int], Any]) -> int:
  """Bytes that one more item adds to `make(batch)` (a pytree of arrays), by shape only."""
  return tree_bytes(jax.eval_shape(lambda: make(2))) - tree_bytes(jax.eval_shape(lambda: make(1)))


def free_memory(device) -> tuple[int | None, str]:
  """(free bytes or None, where that number comes from) for `device`."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return free, f"{device.device_kind} {device.id}"
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "the host (MemAvailable)"
    except OSError:
      pass
    try:
      return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the host (free pages)"
    except (ValueError, OSError, AttributeError):
      pass
  return None, f"{device.platform} device {device.id} (reports no memory)"


def _gib(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size / 4:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} bytes"


def max_items(per_item: int, device) -> tuple[int, str]:
  """(the most items that fit, how that was decided)."""
  free, where = free_memory(device)
  if free is None:
    return UNKNOWN_MEMORY_CAP, f"{where}: capped at {UNKNOWN_MEMORY_CAP}"
  budget = int(max(free, 0) * BUDGET_FRACTION)
  return budget // max(per_item, 1), (f"{_gib(free)} free on {where}, half of it for the "
                                      f"states: {_gib(budget)}")


def check_batch_fits(make: Callable[[int], Any], batch: int, *, what: str,
                     device=None) -> int:
  """Returns the bytes per item of `make`, or a UserError when `batch` items do not fit."""
  device = device or jax.devices()[0]
  per_item = bytes_per_item(make)
  limit, why = max_items(per_item, device)
  if batch > limit:
    raise UserError(f"{what} {batch} does not fit: each holds {_gib(per_item)} of state "
                    f"({why}), so at most {limit}; ask for fewer")
  return per_item
