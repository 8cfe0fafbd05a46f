"""The gated delta rule (and gated linear rule) fast-weight op: references, dispatch, kernels."""

from kernels.gated_delta_rule.api import (
                                          RULES,
                                          Implementation,
                                          available_implementations,
                                          default_implementations,
                                          gated_delta_rule,
                                          gated_linear_rule,
                                          l2_normalize,
                                          register_implementation,
)

__all__ = ["RULES", "Implementation", "available_implementations", "default_implementations",
           "gated_delta_rule", "gated_linear_rule", "l2_normalize", "register_implementation"]
