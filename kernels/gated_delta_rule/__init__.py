"""The gated delta rule (and gated linear rule) fast-weight op: references, dispatch, kernels."""

from kernels.gated_delta_rule.api import (
                                          RULES,
                                          available_implementations,
                                          default_implementations,
                                          gated_delta_rule,
                                          gated_linear_rule,
)
from kernels.gated_delta_rule.base import (
                                           CHUNK_SIZES,
                                           MAX_HEAD_DIM,
                                           Implementation,
                                           l2_normalize,
)

__all__ = ["CHUNK_SIZES", "MAX_HEAD_DIM", "RULES", "Implementation", "available_implementations",
           "default_implementations", "gated_delta_rule", "gated_linear_rule", "l2_normalize"]
