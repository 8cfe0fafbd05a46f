"""The kernels XLA planned for a compiled program and the HBM bytes each moves, from its HLO text.

  plan = kernel_plan.plan(compiled.as_text(), bandwidth=4.27e12)
  print(profiling.format_breakdown(plan["families"], title="family (bytes / bandwidth)"))

The static counterpart of `profiling` (which times the kernels of a traced run): every kernel
launch of the entry computation (while bodies times their known trip count) with the bytes of its
operands and results, named the way XLA names its kernels, so `profiling.STEP_FAMILIES` and
`profiling.model_component` group it as they group a trace. Bytes over a bandwidth is the time
the plan cannot beat however fast its kernels are. A fusion that reads only a slice of an operand
counts the slice, an in-place update counts the update; a conditional counts every branch.

`gpu_topology("h200")` makes an ahead-of-time GPU target, so a machine without a GPU can compile a
GPU program (`experiments/throughput.py --plan h200`) and read its plan. It needs the CUDA PJRT
plugin installed (`pip install -e '.[plan]'`) and JAX_PLATFORMS=cpu (the plugin cannot start
without a GPU, but its compiler runs).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from sleep_lm.common import profiling

_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(?:, (.*))?$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{$")
# Top-level instructions that launch no kernel (or whose work is counted where it happens; so
# is every "*-done" of an asynchronous pair, whose "*-start" carries the work).
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
              "after-all", "partition-id", "replica-id", "add-dependency", "domain"}
_SLICES = {"slice", "dynamic-slice"}

# Ahead-of-time targets: Hopper's limits, each part's memory, and the bandwidth that plans are
# read at (H200: the device-to-device copy rate we measured, ../shared/gpu.md; H100 SXM: the
# datasheet's 3.35 TB/s scaled by the same 89% that the H200 reaches of its 4.8).
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132
  fpus_per_core: 128  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535
  block_dim_limit_z: 65535  memory_bandwidth: {bandwidth}  l2_cache_size: 52428800
  clock_rate_ghz: 1.98  device_memory_size: {memory}  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""
GPU_TARGETS = {
    "h200": {"config": _HOPPER.format(bandwidth=4_800_000_000_000, memory=151_397_597_184,
                                      name="NVIDIA H200"), "bandwidth": 4.27e12},
    "h100": {"config": _HOPPER.format(bandwidth=3_352_320_000_000, memory=84_929_347_584,
                                      name="NVIDIA H100 80GB HBM3"), "bandwidth": 2.98e12},
}


def gpu_topology(target: str):
  """A one-device topology of `target` (a `GPU_TARGETS` key) to compile for without the device:
  `trainer.setup(run, devices=gpu_topology("h200").devices)`."""
  if target not in GPU_TARGETS:
    raise ValueError(f"plan target {target!r}: must be one of {sorted(GPU_TARGETS)}")
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                        target_config=GPU_TARGETS[target]["config"])
  except Exception as e:  # noqa: BLE001 - the cause is almost always the missing plugin
    raise RuntimeError(
        "compiling for a GPU on this machine needs the CUDA PJRT plugin of this jax version "
        "(pip install -e '.[plan]', i.e. jax-cuda13-plugin) and JAX_PLATFORMS=cpu; "
        f"get_topology_desc said: {e}") from e


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, e.g. 'bf16[3,512]{1,0}' or a tuple '(f32[4], s32[])'."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      raise ValueError(f"shape_bytes: unknown HLO element type {dtype!r} in {shape!r}")
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple]], str]:
  """{computation: [(name, shape, opcode, operand names, attributes)]} and the entry's name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = comps.setdefault(header.group(1), [])
      if line.startswith("ENTRY"):
        entry = header.group(1)
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if m:
      name, shape, opcode, args, attrs = m.groups()
      current.append((name, shape, opcode, re.findall(r"%([\w.\-]+)", args), attrs or ""))
  if entry is None:
    raise ValueError("kernel_plan: no ENTRY computation in the HLO text")
  return comps, entry


def _fusion_bytes(body: list[tuple]) -> int:
  """Bytes a fusion moves: each parameter read whole, or only the slices taken of it, or not
  at all when it is the buffer of an in-place update; each result written whole, or only the
  update written into it. Bitcasts (free) are looked through."""
  by_name = {inst[0]: inst for inst in body}
  users = collections.defaultdict(list)
  for name, _, opcode, operands, _ in body:
    for position, operand in enumerate(operands):
      users[operand].append((opcode, position, name))

  def uses(name):                    # (opcode, operand position, user) past any bitcasts
    for opcode, position, user in users[name]:
      yield from uses(user) if opcode == "bitcast" else [(opcode, position, user)]

  def source(name):                  # the instruction a chain of bitcasts starts from
    while by_name[name][2] == "bitcast":
      name = by_name[name][3][0]
    return name

  root, _, root_opcode, root_operands, _ = body[-1]
  in_place, total = set(), 0
  for out in (root_operands if root_opcode == "tuple" else [root]):
    _, shape, opcode, operands, _ = by_name[source(out)]
    buffer = source(operands[0]) if opcode == "dynamic-update-slice" else None
    if buffer is not None and by_name[buffer][2] == "parameter":
      in_place.add(buffer)
      total += shape_bytes(by_name[operands[1]][1])
    else:
      total += shape_bytes(by_name[out][1])
  for name, shape, opcode, _, _ in body:
    if opcode != "parameter":
      continue
    reads = list(uses(name))
    if name in in_place and all(op == "dynamic-update-slice" and p == 0 for op, p, _ in reads):
      continue                                        # the buffer updated in place
    if reads and all(op in _SLICES and p == 0 for op, p, _ in reads):
      total += sum(shape_bytes(by_name[user][1]) for _, _, user in reads)
    else:
      total += shape_bytes(shape)
  return total


def _kernel_name(name: str, opcode: str, attrs: str) -> str:
  """The name a trace gives the kernel: a Pallas kernel's own name, a library call's target,
  XLA's fusion name with '_' for '.' (identical fusions share the kernel of the first, its
  `deduplicated_name`)."""
  if opcode == "custom-call":
    kernel = re.search(r'\bname = "([^"]+)"', attrs)
    if kernel:
      return kernel.group(1)
    target = re.search(r'custom_call_target="([^"]+)"', attrs)
    return target.group(1) if target else name
  shared = re.search(r'\bdeduplicated_name="([^"]+)"', attrs)
  return (shared.group(1) if shared else name).replace(".", "_")


def launches(hlo_text: str) -> list[dict]:
  """Every kernel launch of a compiled module (`compiled.as_text()`), in program order:
  {"kernel", "instruction", "opcode", "op_name" (None where the instruction has none), "bytes",
  "calls" (launches per run: the product of the enclosing while loops' known trip counts)}."""
  comps, entry = _computations(hlo_text)
  out = []

  def walk(comp: str, calls: int):
    shapes = {}
    for name, shape, opcode, operands, attrs in comps[comp]:
      shapes[name] = shape
      if opcode == "while":
        body = re.search(r"\bbody=%([\w.\-]+)", attrs).group(1)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        walk(body, calls * (int(trip.group(1)) if trip else 1))
        continue
      if opcode == "conditional":
        for branch in re.findall(r"%([\w.\-]+)", re.search(
            r"(?:branch_computations=\{([^}]*)\}|true_computation=.*)", attrs).group(0)):
          if branch in comps:
            walk(branch, calls)
        continue
      if opcode == "call":
        walk(re.search(r"\bto_apply=%([\w.\-]+)", attrs).group(1), calls)
        continue
      if opcode == "async-start":         # the wrapped computation's launches
        walk(re.search(r"\bcalls=%([\w.\-]+)", attrs).group(1), calls)
        continue
      if opcode in _NO_KERNEL or opcode.endswith("-done"):   # an async op's work is its start's
        continue
      fused = re.search(r"\bcalls=%([\w.\-]+)", attrs)
      if opcode in ("fusion", "fusion-start") and fused:
        nbytes = _fusion_bytes(comps[fused.group(1)])
      elif opcode == "copy-start":
        nbytes = 2 * sum(shape_bytes(shapes.get(o, "")) for o in operands)
      else:
        nbytes = sum(shape_bytes(shapes.get(o, "")) for o in operands) + shape_bytes(shape)
      op_name = re.search(r'\bop_name="([^"]*)"', attrs)
      out.append({"kernel": _kernel_name(name, opcode, attrs), "instruction": name,
                  "opcode": opcode, "op_name": op_name.group(1) if op_name else None,
                  "bytes": nbytes, "calls": calls})

  walk(entry, 1)
  return out


def kernel_launches(hlo_text: str) -> dict[str, list[tuple[str | None, int]]]:
  """{kernel name as a trace names it: [(op_name, launches per run)]} of a compiled module: the
  instructions behind each kernel (identical fusions share one), for traces that tag kernels with
  a command buffer's instruction (`profiling.component_table`)."""
  out = collections.defaultdict(collections.Counter)
  for launch in launches(hlo_text):
    out[launch["kernel"]][launch["op_name"]] += launch["calls"]
  return {kernel: list(counts.items()) for kernel, counts in out.items()}


def _rows(groups: dict, bandwidth: float, total: float) -> dict:
  return {k: {"gb": b / 1e9, "ms_per_call": 1e3 * b / bandwidth, "count_per_call": n,
              "share": b / total if total else 0.0}
          for k, (b, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])}


def plan(hlo_text: str, *, bandwidth: float,
         families: Sequence[tuple[str, str]] = profiling.STEP_FAMILIES, top: int = 25) -> dict:
  """The launches of `hlo_text` summed per run: {"kernels", "gb", "ms_at_bandwidth",
  "families": {family: row}, "components": {model part: row}, "top_kernels": {kernel: row}
  (the `top` largest, a kernel counting every launch of it)} with rows {"gb", "ms_per_call"
  (bytes / `bandwidth` in bytes/s), "count_per_call", "share" (of the bytes)}, largest first
  (families: each kernel in its first matching regex, as `profiling.family_table`; components:
  `profiling.model_component` of the op_name, "(no op_name)" where there is none)."""
  fam, comp, kern = (collections.defaultdict(lambda: [0, 0]) for _ in range(3))
  total = 0
  for launch in launches(hlo_text):
    b, n = launch["bytes"] * launch["calls"], launch["calls"]
    total += b
    family = profiling.family_of(launch["kernel"], families)
    part = (profiling.model_component(launch["op_name"]) if launch["op_name"] is not None
            else "(no op_name)")
    for groups, key in ((fam, family), (comp, part), (kern, launch["kernel"])):
      groups[key][0] += b
      groups[key][1] += n
  return {"kernels": sum(n for _, n in fam.values()), "gb": total / 1e9,
          "ms_at_bandwidth": 1e3 * total / bandwidth, "families": _rows(fam, bandwidth, total),
          "components": _rows(comp, bandwidth, total),
          "top_kernels": dict(list(_rows(kern, bandwidth, total).items())[:top])}


def achieved_bandwidth(hlo_text: str, ops: dict,
                       families: Sequence[tuple[str, str]] = profiling.STEP_FAMILIES,
                       rows: Sequence[dict] | None = None, by_layer_part: bool = False) -> dict:
  """The plan's bytes against a trace's device time, per family: for each HLO instruction that
  the trace timed (`ops`: `profiling.summarize`'s {instruction: {"ms_per_call",
  "count_per_call"}} of a run of this same compiled program), its bytes per launch times its
  launches, over its device time. Returns {family: {"gb", "ms_per_call", "gb_per_s"}} largest
  time first, with "total"; instructions missing from either side are left out (so "total" is
  the timed and planned part). Where none of the trace's instructions is the program's (a
  command buffer's instruction tags the kernels, `profiling.component_table`), the kernels are
  matched by name (`rows`, the table's rows made with top=None): a kernel counts where the trace
  launched it as often as the plan does. With `by_layer_part`, per instruction only, rows are
  "<layer part>: <family>" and "<layer part>: all" (`profiling.layer_part` of the instruction's
  op_name): which layer's kernels run far from the bandwidth (empty for name matching)."""
  all_launches = launches(hlo_text)
  by_instruction = {profiling.instruction_key(launch["instruction"]): launch
                    for launch in all_launches}
  out = collections.defaultdict(lambda: [0.0, 0.0])
  if rows is not None and ops and not any(profiling.instruction_key(op) in by_instruction
                                          for op in ops):
    planned = collections.defaultdict(lambda: [0, 0])      # kernel -> [bytes per run, launches]
    for launch in all_launches:
      planned[launch["kernel"]][0] += launch["bytes"] * launch["calls"]
      planned[launch["kernel"]][1] += launch["calls"]
    timed = [(row, planned.get(row["name"]) or planned.get(profiling.kernel_base_name(row["name"])))
             for row in rows]
    timed = [] if by_layer_part else [
        ((profiling.family_of(row["name"], families),), plan[0], row["ms_per_call"])
        for row, plan in timed if plan and plan[1] == round(row["count_per_call"])]
  else:
    timed = []
    for op, timing in ops.items():
      launch = by_instruction.get(profiling.instruction_key(op))
      if launch is not None:
        family = profiling.family_of(launch["kernel"], families)
        part = profiling.layer_part(launch["op_name"])
        keys = (f"{part}: {family}", f"{part}: all") if by_layer_part else (family,)
        timed.append((keys, launch["bytes"] * timing["count_per_call"], timing["ms_per_call"]))
  for keys, nbytes, ms in timed:
    for key in (*keys, "total"):
      out[key][0] += nbytes
      out[key][1] += ms
  return {k: {"gb": b / 1e9, "ms_per_call": ms, "gb_per_s": b / 1e9 / (ms / 1e3) if ms else 0.0}
          for k, (b, ms) in sorted(out.items(), key=lambda kv: -kv[1][1])}
