"""Inference: decoding as pure functions and the host-side stream."""
