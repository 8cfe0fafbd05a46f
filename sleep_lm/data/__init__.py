"""Task data for sleep_lm (generators, grain training input, TFDS evaluation sets)."""
