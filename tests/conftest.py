"""Test session setup: compile fast, and once.

- One persistent XLA compilation cache for the whole run: many tests compile the same tiny
  models, in this process and in the subprocesses they start (kill and resume, SIGTERM, the CLIs,
  two-process training); the cache lets them share compilations. Subprocesses inherit it
  through the environment.
- The CPU backend's LLVM optimisation off: the test models are tiny, so compiling dominates and
  the generated code's speed does not matter. It changes no result (no fast-math either way);
  tests that compare two runs run both under the same flags.
- Shape checks at the package boundaries on (SLEEP_LM_TYPECHECK=1, kernels/array_types.py):
  every annotated call checks its arrays' ranks, sizes and dtypes with jaxtyping and beartype
  (where beartype, a test extra, is installed; test_array_types says so if it is not).
All are set before JAX and the package are imported, and only when the caller has not set them.
"""

import importlib.util
import os
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sleep_lm_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if importlib.util.find_spec("beartype") is not None:  # a test extra; GPU images may lack it
  os.environ.setdefault("SLEEP_LM_TYPECHECK", "1")
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true")
