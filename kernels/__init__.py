"""Fast-weight kernels for sleep_lm: `gated_delta_rule` and `gated_linear_rule`."""

from kernels.gated_delta_rule import (
                                      RULES,
                                      available_implementations,
                                      default_implementations,
                                      gated_delta_rule,
                                      gated_linear_rule,
)

__all__ = ["RULES", "available_implementations", "default_implementations", "gated_delta_rule",
           "gated_linear_rule"]
