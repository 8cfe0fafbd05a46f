"""Which platform the computation being traced will run on, for kernels that compile per platform.

`target_platform()` is the platform of the devices of the mesh set with `jax.set_mesh`, else
JAX's default backend. The two differ when a program is compiled ahead of time for devices this
process does not drive: a GPU step compiled on a machine without a GPU (`sleep_lm.common.
kernel_plan`) traces under a mesh of the target's devices, so its Pallas kernels lower for the
GPU instead of falling back to interpret mode.
"""

from __future__ import annotations

import jax


def target_platform() -> str:
  """'gpu', 'tpu' or 'cpu': the set mesh's device platform, else `jax.default_backend()`."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()
