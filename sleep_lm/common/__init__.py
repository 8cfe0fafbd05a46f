"""Shared helpers below everything else: user errors, config-field validation, workdir files,
device-memory checks, device time from a trace."""
