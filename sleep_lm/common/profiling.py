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
from collections.abc import Callable, Mapping, Sequence

import jax

# Lines of a device plane that summarise other lines (counting them would count kernels twice).
_SUMMARY_LINES = ("XLA Modules", "XLA Ops", "Steps", "Source", "Framework", "TensorFlow")


def _latest_xplane(log_dir: str) -> str:
  paths = glob.glob(os.path.join(glob.escape(log_dir), "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {log_dir!r}: did the trace run?")
  return max(paths, key=os.path.getmtime)


def device_events(xplane) -> list[tuple[str, str, float, str | None]]:
  """(plane, event name, duration in ms, HLO instruction) of every kernel on a device stream of
  `xplane` (a *.xplane.pb path or a `jax.profiler.ProfileData`); the instruction is the event's
  "hlo_op" stat (XLA's GPU tracer sets it on the kernels it launches), None where there is none."""
  data = jax.profiler.ProfileData.from_file(xplane) if isinstance(xplane, str) else xplane
  events = []
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if any(s in line.name for s in _SUMMARY_LINES):
        continue
      events.extend((plane.name, e.name, e.duration_ns / 1e6, dict(e.stats).get("hlo_op"))
                    for e in line.events)
  return events


# Kernels that only move bytes: the CUDA runtime's device-to-device copies and XLA's copy and
# transpose kernels (named after their fusion root).
COPY_KERNELS = r"(?i)memcpy|memset|^copy|_copy|transpose"

# Kernel families of a train step, by kernel name (a trace's, or `kernel_plan`'s for a compiled
# program); each kernel counts in the first that matches.
STEP_FAMILIES = (
    ("fast-weight op (Pallas)", r"intra_fwd|state_fwd|state_bwd|qk_grads|wy_grads|gdr_"),
    ("SwiGLU MLP (Pallas)", r"swiglu_up"),
    ("matmuls (cuBLAS, XLA gemm fusions)", r"(?i)nvjet|gemm|cublas|cutlass|xmma|wgmma|dot"),
    ("attention (cuDNN)", r"(?i)cudnn|fmha|flash|attn"),
    ("copies and transposes", COPY_KERNELS),
    ("reductions (XLA reduce fusions)", r"(?i)reduce|reduction"),
    ("elementwise (other XLA fusions)", r"(?i)fusion"),
)


def device_time_table(fn: Callable[[], object], *, calls: int, log_dir: str,
                      top: int | None = 25, groups: dict[str, str] | None = None) -> dict:
  """Runs `fn` once untraced (warm-up), then `calls` times traced; per-call device ms by name.

  Returns {"total_ms_per_call", "rows": [{"name", "ms_per_call", "count_per_call", "share"}],
  "groups": {group: {"ms_per_call", "count_per_call", "share"}}} with the `top` largest names
  (every name with top=None; the rest summed into one "(other)" row) and, for each regex in
  `groups` (default: "copies", `COPY_KERNELS`), the kernels whose name it matches, over all
  events; "ops": the time per HLO instruction (`summarize`).
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}")
  jax.block_until_ready(fn())
  with jax.profiler.trace(log_dir):
    for _ in range(calls):
      jax.block_until_ready(fn())
  return summarize(device_events(_latest_xplane(log_dir)), calls=calls, top=top, groups=groups)


def summarize(events, *, calls: int, top: int | None = 25,
              groups: dict[str, str] | None = None) -> dict:
  """`device_time_table`'s result from `device_events`' list for `calls` calls; also "ops":
  {HLO instruction: {"ms_per_call", "count_per_call"}} of the kernels that name theirs."""
  totals, counts = collections.Counter(), collections.Counter()
  op_ms, op_counts = collections.Counter(), collections.Counter()
  for _, name, ms, op in events:
    totals[name] += ms
    counts[name] += 1
    if op:
      op_ms[op] += ms
      op_counts[op] += 1
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
  ops = {op: {"ms_per_call": ms / calls, "count_per_call": op_counts[op] / calls}
         for op, ms in op_ms.most_common()}
  return {"total_ms_per_call": total / calls, "rows": rows, "groups": group_rows, "ops": ops}


def family_of(kernel: str, families: Sequence[tuple[str, str]]) -> str:
  """The first family whose regex matches the kernel's name, else "other"."""
  return next((f for f, pattern in families if re.search(pattern, kernel)), "other")


def family_table(table: dict, families: Sequence[tuple[str, str]]) -> dict:
  """Each kernel of `table` (made with top=None, so that no row is "(other)") in the first
  family whose regex matches its name, or in "other": {family: {"ms_per_call",
  "count_per_call", "share"}}, in the order given, summing to the table's total."""
  out = {name: {"ms_per_call": 0.0, "count_per_call": 0.0, "share": 0.0}
         for name in [*(f for f, _ in families), "other"]}
  for row in table["rows"]:
    family = family_of(row["name"], families)
    for key in ("ms_per_call", "count_per_call", "share"):
      out[family][key] += row[key]
  return out


# Segments of a JAX op_name that are transformations or control flow, not Flax modules.
_NOT_MODULES = {"while", "body", "cond", "eval_jaxpr", "checkpoint", "remat",
                "rematted_computation"}


def hlo_op_names(hlo_text: str) -> dict[str, str | None]:
  """{instruction name: its JAX op_name, or None where it has none} of every instruction of a
  compiled module's text (`compiled.as_text()`); a fusion carries its root's op_name, so a kernel
  maps to the model code that made it."""
  instruction = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$', re.M)
  op_name = re.compile(r'\bop_name="([^"]*)"')
  return {name: (m.group(1) if (m := op_name.search(rest)) else None)
          for name, rest in instruction.findall(hlo_text)}


def instruction_key(name: str) -> str:
  """An HLO instruction's name compared across a module's text and a trace: without the '%',
  '.' read as '_' (as kernel names write it), so either spelling matches."""
  return name.lstrip("%").replace(".", "_")


def model_component(op_name: str) -> str:
  """The part of the model an op_name comes from, layer indices dropped, forward or backward:
  ".../transpose(jvp(...))/.../blocks_1/layer_1_gdn/out_norm/mul" -> "gdn/out_norm (backward)".
  Reads sleep_lm's module names (`layer_{i}_{kind}` inside `blocks_{i}`); ops outside every
  module (loss, optimizer, data movement) are "outside the layers"."""
  direction = "backward" if "transpose(" in op_name else "forward"
  mods = [m for m in op_name.split("/")[:-1]                  # the last segment is the primitive
          if "(" not in m and "." not in m and m not in _NOT_MODULES]
  layers = [i for i, m in enumerate(mods) if re.fullmatch(r"layer_\d+_\w+", m)]
  if layers:
    kind = re.sub(r"^layer_\d+_", "", mods[layers[-1]])
    rest = [m for m in mods[layers[-1] + 1:] if not re.fullmatch(r"(blocks|layer)_\d+\w*", m)]
    parts = [kind, *dict.fromkeys(rest)]
  else:
    named = [m for m in mods if not re.fullmatch(r"blocks_\d+", m)]
    parts = [named[-1]] if named else (["block (residual adds)"] if mods else [])
  return f"{'/'.join(parts) or 'outside the layers'} ({direction})"


def layer_part(op_name: str | None) -> str:
  """The layer part of `model_component`, sub-module and direction dropped ("gdn/out_norm
  (backward)" -> "gdn", "block (residual adds) (forward)" -> "block (residual adds)"); an
  instruction without an op_name is "(no op_name)"."""
  if op_name is None:
    return "(no op_name)"
  return model_component(op_name).rsplit(" (", 1)[0].split("/")[0]


def component_table(table: dict, op_names: Mapping[str, str | None],
                    kernel_launches: Mapping[str, list] | None = None) -> dict:
  """Device ms per call by `model_component` of each kernel's HLO instruction (`table["ops"]`
  from `summarize`, `op_names` from `hlo_op_names`), largest first, with the kernel time that
  names no instruction, one missing from the module or one without an op_name in rows of their
  own.

  On a GPU, XLA's command buffers (CUDA graphs, on by default) tag every kernel they launch with
  the buffer's instruction (`command_buffer_1`), not the kernel's own. Given `kernel_launches`
  ({kernel name as a trace names it: [(op_name, launches per run)]},
  `kernel_plan.kernel_launches` of the same module), a trace none of whose instructions is the
  module's is charged by kernel name instead (`table` made with top=None): a kernel's time is
  split over the instructions that launch it (identical fusions share one kernel) by their
  launch counts. A library's kernel (cuBLAS's `nvjet_*`) is named by the library, not the
  module: its time stays in a row of its own. Names are far less reliable than instructions
  (on an H100 they charged 20% of a step): trace a program compiled without command buffers
  (`experiments/throughput.py --profile-dir` does)."""
  known = {instruction_key(k): v for k, v in op_names.items()}
  ops = table.get("ops", {})
  if kernel_launches is not None and ops and not any(instruction_key(op) in known for op in ops):
    return _charged_by_kernel_name(table, kernel_launches)
  out = collections.defaultdict(lambda: {"ms_per_call": 0.0, "count_per_call": 0.0})
  for op, r in ops.items():
    op = instruction_key(op)
    key = ("(instruction not in the module)" if op not in known
           else "(no op_name)" if known[op] is None else model_component(known[op]))
    out[key]["ms_per_call"] += r["ms_per_call"]
    out[key]["count_per_call"] += r["count_per_call"]
  named = sum(r["ms_per_call"] for r in table.get("ops", {}).values())
  if table["total_ms_per_call"] - named > 1e-9:
    out["(kernels without an hlo_op)"] = {
        "ms_per_call": table["total_ms_per_call"] - named,
        "count_per_call": (sum(r["count_per_call"] for r in table["rows"])
                           - sum(r["count_per_call"] for r in table.get("ops", {}).values()))}
  return _largest_first(out, table["total_ms_per_call"])


def _largest_first(rows: dict, total: float) -> dict:
  return {k: {**r, "share": r["ms_per_call"] / total if total else 0.0}
          for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["ms_per_call"])}


def kernel_base_name(name: str) -> str:
  """A trace names a Pallas kernel's second compiled copy `<name>__1` (an H200 step:
  `_qk_grads_kernel` 10 and `_qk_grads_kernel__1` 24 launches); the module names both `<name>`."""
  return re.sub(r"__\d+$", "", name)


def _charged_by_kernel_name(table: dict, kernel_launches: Mapping[str, list]) -> dict:
  out = collections.defaultdict(lambda: {"ms_per_call": 0.0, "count_per_call": 0.0})
  for row in table["rows"]:
    shares = (kernel_launches.get(row["name"])
              or kernel_launches.get(kernel_base_name(row["name"])))
    if shares:
      parts = [(model_component(op) if op is not None else "(no op_name)", n) for op, n in shares]
    else:                             # named by a library at run time (cuBLAS's nvjet_*)
      parts = [("(a library's kernel: its name is not in the module, e.g. cuBLAS)", 1)]
    launches = sum(n for _, n in parts)
    for key, n in parts:
      out[key]["ms_per_call"] += row["ms_per_call"] * n / launches
      out[key]["count_per_call"] += row["count_per_call"] * n / launches
  return _largest_first(out, table["total_ms_per_call"])


def format_breakdown(rows: dict, title: str = "family (each kernel in its first match)") -> str:
  """A {name: {"ms_per_call", "share", "count_per_call"}} breakdown (`family_table`,
  `component_table`) as text, one line a name."""
  lines = [f"{'ms/call':>9} {'share':>6} {'n/call':>7}  {title}"]
  lines += [f"{r['ms_per_call']:9.3f} {100 * r['share']:5.1f}% {r['count_per_call']:7.1f}  {name}"
            for name, r in rows.items()]
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
