"""Errors the user can fix (a config value, a workdir, a checkpoint, the disk).

The CLIs print a `UserError` as one or two lines and exit with status 2; anything else is a bug
and keeps its traceback. `--debug` shows the traceback of a `UserError` too.
"""


class UserError(Exception):
  """A problem with the input or the environment, explained by its message."""
