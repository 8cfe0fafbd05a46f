"""Benchmarks of the kernels (run on the GPU machine; see each module docstring)."""
