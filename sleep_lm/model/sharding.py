"""Device mesh, the logical-axis rules table, and the shardings derived from them.

Mesh: three named axes, sizes from `config.mesh` (one of them may be -1: the rest of the devices).
  "data"    batch split; parameters and optimizer state replicated (gradients all-reduced).
  "fsdp"    batch split AND parameters / optimizer state split along their "embed" dimension
            (ZeRO-3 / FSDP: XLA all-gathers a weight where it is used and reduce-scatters its
            gradient), so a model that does not fit one device's memory fits the mesh.
  "tensor"  attention / GDN heads and the MLP width split (Megatron-style tensor parallelism).

Rules: `config.sharding_rules`, pairs (logical axis, mesh axis | tuple of mesh axes | None), map
the logical names that the layers give their parameters and activations (`LOGICAL_AXES`) to mesh
axes, as in maxtext. Parameters, optimizer state and batches are placed by `jax.jit` with
`NamedSharding`s computed here; activations get `nn.with_logical_constraint` at block boundaries.

How the mesh reaches the model: callers enter `jax.set_mesh(mesh)` around the jitted calls (the
trainer, evaluation, the benchmarks). That is JAX's own context: `jax.jit` keys its cache on it,
`jax.sharding.get_abstract_mesh()` returns it while tracing, and flax's
`nn.with_logical_constraint` reads it. The rules are closed over by the jitted functions
(`make_train_step(rules=...)`), which enter `nn.logical_axis_rules(rules)` while tracing: they are
part of the function, not a thread-local left over from another run. The model and its configs
never hold a mesh, so ModelConfig stays hashable and device-free.

The mesh axes are `AxisType.Auto` (XLA propagates shardings between the constraints), not
`Explicit` (`jax.make_mesh`'s default): the model is written without sharding-in-types, and the
constraints plus the input/output shardings pin down the layout that matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sleep_lm.common.validation import FieldError, expect, is_int, unknown_fields

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical axis name used by the model (`sleep_lm.model.layers`, `sleep_lm.model.hybrid`) and
# what it is.
LOGICAL_AXES = {
    "batch": "examples of a batch (inputs, activations, fast-weight states)",
    "activation_length": "tokens of an activation [B,T,D]",
    "activation_embed": "d_model of an activation [B,T,D] (the residual stream)",
    "vocab": "vocabulary (embedding table rows, output head columns)",
    "embed": "d_model of a weight",
    "mlp": "SwiGLU hidden width",
    "heads": "attention / GDN heads x head dim, flattened, of a projection",
    "head_dim": "per-head norm gains",
    "gdn_heads": "one scalar per GDN head (A_log, dt_bias, a/b projections, the op's heads)",
    "conv": "depthwise conv taps",
}

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Data parallel over (data, fsdp); weights' d_model over fsdp; heads and MLP width over tensor.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("gdn_heads", "tensor"),
    ("conv", None),
)

# The residual stream h [B,T,D] at every block boundary.
ACTIVATION = ("batch", "activation_length", "activation_embed")


def check_rules(rules) -> Rules:
  """The rules as a tuple of (name, None | str | tuple of str), validated with clear errors.

  Accepts lists (a config restored from JSON). Every name of LOGICAL_AXES needs exactly one rule,
  so that nothing is left unsharded by a typo; "batch" and "gdn_heads" must not share a mesh axis
  (the fast-weight op is split over both at once).
  """
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise FieldError("config.sharding_rules", f"must be a sequence of (logical axis, mesh axes) "
                     f"pairs, got {rules!r}")
  out, seen = [], set()
  for entry in rules:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
      raise FieldError("config.sharding_rules", f"each entry must be a pair (logical axis, mesh "
                       f"axes), got {entry!r}")
    name, axes = entry
    if name not in LOGICAL_AXES:
      raise FieldError("config.sharding_rules", f"unknown logical axis {name!r}; allowed: "
                       f"{sorted(LOGICAL_AXES)}")
    if name in seen:
      raise FieldError("config.sharding_rules", f"logical axis {name!r} has more than one rule")
    seen.add(name)
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      if not axes:
        axes = None
    members = () if axes is None else (axes,) if isinstance(axes, str) else axes
    for a in members:
      if a not in MESH_AXES:
        raise FieldError("config.sharding_rules", f"{name!r} -> {a!r} is not a mesh axis; "
                         f"allowed: {MESH_AXES} or None")
    if len(set(members)) != len(members):
      raise FieldError("config.sharding_rules", f"{name!r} names a mesh axis twice: {axes!r}")
    out.append((name, axes))
  missing = sorted(set(LOGICAL_AXES) - seen)
  if missing:
    raise FieldError("config.sharding_rules", f"no rule for logical axis(es) {missing} (use None "
                     f"for replicated)")
  rules = tuple(out)
  overlap = set(mesh_axes_of(rules, "batch")) & set(mesh_axes_of(rules, "gdn_heads"))
  if overlap:
    raise FieldError("config.sharding_rules", f"'batch' and 'gdn_heads' both use mesh axis(es) "
                     f"{sorted(overlap)}; the fast-weight op is split over both at once")
  return rules


def mesh_axes_of(rules: Rules, name: str) -> tuple[str, ...]:
  """The mesh axes that logical axis `name` maps to (empty: replicated)."""
  axes = dict(rules).get(name)
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_shape(mesh_config: Mapping, device_count: int) -> dict[str, int]:
  """{"data", "fsdp", "tensor"} sizes from the config, -1 resolved, checked against the devices."""
  unknown_fields("config.mesh", mesh_config, MESH_AXES,
                 subject="the mesh ('model' is now 'tensor')" if "model" in mesh_config else "")
  sizes = {a: mesh_config.get(a, 1) for a in MESH_AXES}
  for a, n in sizes.items():
    expect(is_int(n) and (n >= 1 or n == -1), f"config.mesh.{a}",
           f"must be an integer >= 1 or -1 (the rest of the devices), got {n!r}")
  free = [a for a, n in sizes.items() if n == -1]
  expect(len(free) <= 1, "config.mesh", f"at most one axis may be -1, got {free}")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if device_count % fixed:
      raise FieldError("config.mesh", f"the fixed axes ({fixed} devices) must divide the "
                       f"{device_count} devices for mesh.{free[0]} = -1")
    sizes[free[0]] = device_count // fixed
  if math.prod(sizes.values()) != device_count:
    raise FieldError("config.mesh", f"data x fsdp x tensor = {math.prod(sizes.values())} must "
                     f"equal the number of devices ({device_count}), got {sizes}")
  return sizes


def make_mesh(mesh_config: Mapping | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh over `devices` (default: every device, all processes).

  `jax.make_mesh` orders devices for the interconnect (TPU rings; on GPU and CPU hosts,
  process-major, so each process holds a contiguous slice of the batch). Auto axis types: see
  the module docstring.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(dict(mesh_config or {"data": -1}), len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions carry these logical names (None: replicated).

  flax's resolution: a mesh axis already used by an earlier dimension is not used again."""
  return nn.logical_to_mesh_axes(tuple(names), rules)


def param_shardings(boxed_params, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for (boxed) parameters from their logical names."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """[B, ...] arrays: the leading (batch) axis split as the "batch" rule says."""
  return NamedSharding(mesh, logical_spec(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """Into how many parts the batch is split."""
  return math.prod(mesh.shape[a] for a in mesh_axes_of(rules, "batch"))


def opt_state_shardings(opt_state, params, param_sh, mesh: Mesh):
  """Shardings of an optimizer state: a leaf that holds a per-parameter quantity (Adam's mu and
  nu, Muon's momentum: its path ends with a parameter's path and it has that parameter's shape)
  gets the parameter's sharding; everything else (step counts, coefficients) is replicated.

  (`optax.tree_map_params` cannot do this: it fails on the MaskedNodes of `multi_transform`.)
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    by_path[tuple(k.key for k in path)] = (leaf.shape, path)
  sh_by_path = {tuple(k.key for k in p): s
                for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}

  def one(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == leaf.shape:
        return sh_by_path[keys[start:]]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(one, opt_state)


def check_divisible(batch_size: int, mesh: Mesh, boxed_params, rules: Rules = DEFAULT_RULES,
                    what: str = "batch_size") -> None:
  """Clear errors for a batch or a weight axis that the mesh cannot split evenly."""
  shards = batch_shards(mesh, rules)
  axes = " x ".join(f"mesh.{a}" for a in mesh_axes_of(rules, "batch")) or "1"
  if batch_size % shards:
    raise ValueError(f"config.{what} ({batch_size}) must be divisible by {axes} ({shards}), the "
                     f"mesh axes of the 'batch' rule")
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    spec = logical_spec(leaf.names, rules)
    for size, name, axes in zip(leaf.value.shape, leaf.names, spec, strict=True):
      members = () if axes is None else (axes,) if isinstance(axes, str) else axes
      parts = math.prod(mesh.shape[a] for a in members)
      if size % parts:
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} axis '{name}' has size {size}, not "
            f"divisible by {' x '.join(f'mesh.{a}' for a in members)} ({parts}); change the "
            f"mesh, the rule for '{name}' in config.sharding_rules, or the model")


def process_batch_slice(sharding: NamedSharding, global_batch: int, axis: int = 0
                        ) -> tuple[int, int]:
  """(shard_index, shard_count): the contiguous part of the global batch that this process's
  devices hold, for the data pipeline (`train_dataset(shard_index=..., shard_count=...)`).

  Read from the sharding rather than assumed to be `jax.process_index()`: the device order of the
  mesh decides which rows land on which process, and processes that hold the same rows (a batch
  replicated over an axis spanning processes) must read the same examples.
  """
  shape = [1] * (axis + 1)
  shape[axis] = global_batch
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    sl = index[axis]
    rows.update(range(*sl.indices(global_batch)))
  lo, n = min(rows), len(rows)
  if rows != set(range(lo, lo + n)) or global_batch % n or lo % n:
    raise ValueError(f"this process's devices hold batch rows that are not one aligned contiguous "
                     f"block ({sorted(rows)[:8]}...); use a mesh whose batch axes are "
                     f"process-major")
  return lo // n, global_batch // n


def split_over_devices(name: str, rules: Rules | None = None) -> bool:
  """Whether logical axis `name` is split over more than one device of the current mesh (the
  context's rules, else `DEFAULT_RULES`); False without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return False
  rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
  return math.prod(mesh.shape.get(a, 1) for a in mesh_axes_of(rules, name)) > 1


def fast_weight_specs(q_shape: Sequence[int], rules: Rules | None = None):
  """shard_map specs of the fast-weight op inside the current mesh, or None for a plain call.

  q [B,T,H,K] (and k, v), g and beta [B,T,H], state [B,H,K,V]: batch over the mesh axes of the
  "batch" rule, heads over those of "gdn_heads". A mesh axis that does not divide its dimension
  is left out (those devices then hold the same rows: correct, only redundant), e.g. a batch of
  1 when decoding. None (plain call) when there is no mesh in context, it has one device, or
  we are already inside a manual (shard_map) region.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or AxisType.Manual in mesh.axis_types:
    return None
  rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
  b, _, h, _ = q_shape

  def fit(size, axes):
    axes = tuple(a for a in axes if a in mesh.shape)
    kept, parts = [], 1
    for a in axes:
      if size % (parts * mesh.shape[a]) == 0:
        kept.append(a)
        parts *= mesh.shape[a]
    return tuple(kept) or None

  batch, heads = fit(b, mesh_axes_of(rules, "batch")), fit(h, mesh_axes_of(rules, "gdn_heads"))
  if batch is None and heads is None:
    return None
  return (PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, heads),
          PartitionSpec(batch, heads, None, None))
