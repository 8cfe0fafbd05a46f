"""Device mesh and named shardings from the parameters' logical axis names.

The mesh has two axes, "data" (batch) and "model" (heads / MLP width). One rules table, config
data, maps each logical axis (see `sleep_lm.layers`) to a mesh axis or to None (replicated).
`jax.jit` then runs the sharded program from the input shardings (no pjit, no shard_map).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")
# Logical axis -> mesh axis. Heads and MLP width split across "model"; the rest is replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("head_dim", None),
    ("gdn_heads", "model"),
    ("conv", None),
)


def make_mesh(data: int = -1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh; data = -1 takes every device not used by "model"."""
  devices = list(devices if devices is not None else jax.devices())
  if model < 1 or len(devices) % model:
    raise ValueError(f"mesh.model must be >= 1 and divide the {len(devices)} devices, got {model}")
  if data == -1:
    data = len(devices) // model
  if data < 1 or data * model != len(devices):
    raise ValueError(f"mesh.data * mesh.model must equal the number of devices "
                     f"({len(devices)}), got data={data}, model={model}")
  return Mesh(np.asarray(devices).reshape(data, model), MESH_AXES)


def param_shardings(boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for (boxed) parameters from their logical names."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over "data", the rest replicated."""
  return NamedSharding(mesh, PartitionSpec("data"))


def check_divisible(batch_size: int, mesh: Mesh, boxed_params, rules=DEFAULT_RULES) -> None:
  """Clear errors for a batch or a weight axis that the mesh cannot split evenly."""
  data = mesh.shape["data"]
  if batch_size % data:
    raise ValueError(f"batch_size ({batch_size}) must be divisible by mesh.data ({data})")
  rule = dict(rules)
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    for size, name in zip(leaf.value.shape, leaf.names, strict=True):
      axis = rule.get(name)
      if axis is not None and size % mesh.shape[axis]:
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} axis '{name}' has size {size}, not "
            f"divisible by mesh.{axis} ({mesh.shape[axis]}); change mesh.{axis} or the model")
