"""Lowering a compiled GPU kernel on any machine: Pallas' Triton back end asks the device for its
GPU; inside `abstract_gpu()` an abstract H200 answers (`jax.sharding.AbstractDevice`), so
`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs on a CPU. Lowering only:
Triton's compilation to PTX and the numbers need a GPU."""

from __future__ import annotations

import jax

TRITON_CALL = "__gpu$xla.gpu.triton"      # the custom call of one lowered Triton kernel


def abstract_gpu(device_kind: str = "NVIDIA H200"):
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("device",), abstract_device=device))
