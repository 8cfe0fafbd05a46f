"""sleep_lm: offline sleep consolidation for hybrid language models."""
