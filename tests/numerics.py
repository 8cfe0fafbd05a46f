"""The tests' one measure of numerical agreement with an oracle."""

import numpy as np


def rel_rms(x, ref) -> float:
  """Relative RMS error of x against ref, in float64: ||x - ref|| / ||ref|| (||x|| where ref is
  all zero). The shapes must match and x must be finite: a broadcast or a NaN is a failure,
  never a small error."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  assert np.all(np.isfinite(x)), "non-finite values"
  scale = np.linalg.norm(ref)
  return float(np.linalg.norm(x - ref) / scale) if scale else float(np.linalg.norm(x))
