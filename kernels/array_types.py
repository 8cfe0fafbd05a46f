"""Array shape types for the package boundaries (jaxtyping), checked at run time in tests only.

The op's implementation call, the model's window pass, sleep and the decode functions annotate
their arrays with named dimensions, e.g. `Float[Arr, "b t h k"]`; a name binds one size across
the arguments and the results of one call. `typed` turns the annotations into checks only when
`SLEEP_LM_TYPECHECK=1` is in the environment as the module is imported (tests/conftest.py sets
it): the call then goes through `jaxtyping.jaxtyped` with beartype, and a wrong rank, size or
dtype raises `jaxtyping.TypeCheckError` naming the argument and the dimensions. Otherwise
`typed` returns the function itself, so users pay nothing. Under `jax.jit` the check runs once,
at tracing, on the tracers' shapes.

This module sits in `kernels` (the lowest layer) so that the op and `sleep_lm` share it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jaxtyping import Bool, Float, Int, Shaped  # noqa: F401  (re-exported for the annotations)

CHECK = os.environ.get("SLEEP_LM_TYPECHECK") == "1"
Arr = jax.Array | np.ndarray   # what the boundaries accept: device arrays, tracers, NumPy arrays

def typed[F](fn: F) -> F:
  """`fn` with its jaxtyping annotations checked at every call (under SLEEP_LM_TYPECHECK=1), or
  `fn` itself."""
  if not CHECK:
    return fn
  import beartype  # a test dependency only
  from jaxtyping import jaxtyped
  # is_pep484_tower: an int is a valid float, as Python's own numeric tower has it
  checker = beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))
  return jaxtyped(typechecker=checker)(fn)
