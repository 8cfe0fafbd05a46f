"""Errors the user can fix (a config value, a workdir, a checkpoint, the disk), and preemption.

The CLIs print a `UserError` as one line and exit with status 2; anything else is a bug and keeps
its traceback. `--debug` shows the traceback of a `UserError` too. A run stopped by SIGTERM after
saving its checkpoint raises `Preempted`: the CLIs print one line and exit with
`PREEMPTED_STATUS`.
"""

# EX_TEMPFAIL of sysexits.h, "temporary failure; the user is invited to retry": the run stopped
# cleanly on request (SIGTERM) with its checkpoint saved, and the same command continues it. It
# differs from success (0), a bug (1), a user error (2) and a death by a signal (128 + N, which
# a shell reports for a run killed before it could save): a scheduler requeues on 75.
PREEMPTED_STATUS = 75


class UserError(Exception):
  """A problem with the input or the environment, explained by its message."""


class Preempted(Exception):
  """The run stopped on request (SIGTERM) after saving its checkpoint; rerun to continue."""
