"""What every command line of sleep_lm shares: user errors as one line and exit status 2.

A `UserError` (a config value, the workdir, a checkpoint, a damaged file), an OSError (a full
disk, an unwritable folder), a bad flag or `--config.X=...` override and a platform the machine
lacks (JAX_PLATFORMS) print `error: ...` on stderr and exit with status 2. A run stopped by SIGTERM
after its checkpoint (`Preempted`) prints `preempted: ...` and exits with status 75
(`errors.PREEMPTED_STATUS`). With `--debug` user errors keep their traceback. Any other exception
is a bug and keeps its traceback.

orbax logs the failures of its background threads (a checkpoint write on a full disk) with
tracebacks, and raises them again in the main thread, where they are reported as above; those
log records are therefore dropped unless `--debug` is given.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags

from sleep_lm.common.errors import PREEMPTED_STATUS, Preempted, UserError


def _debug(argv) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_argument(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def unknown_override(config, override: str) -> str | None:
  """Why `--config.a.b=v` names no field of `config` (the unknown part, the allowed keys), or
  None if it names one."""
  key = override[len("--config."):].split("=", 1)[0]
  node, path = config, "config"
  for part in key.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = f"{path} has no fields" if not keys else f"allowed in {path}: {sorted(keys)}"
      return (f"unknown field {path}.{part} ({override}); {where} (an override sets only a "
              f"field that the experiment file defines)")
    node, path = node[part], f"{path}.{part}"
  return None


def _override_error(argv: list[str], e: Exception) -> str:
  overrides = [a for a in argv if a.startswith("--config.")]
  config_arg = _config_argument(argv)
  if config_arg is not None and overrides and "config" in flags.FLAGS:
    try:
      config = flags.FLAGS["config"].parser.parse(config_arg)
    except Exception:  # noqa: BLE001 - the file itself failed: report the original error
      config = None
    for override in overrides if config is not None else []:
      problem = unknown_override(config, override)
      if problem:
        return problem
  cause = str(e).strip().strip('"').splitlines()[0] if str(e).strip() else type(e).__name__
  return f"cannot apply the config ({' '.join(overrides) or 'no overrides'}): {cause}"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if _debug(argv):
      raise
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(" ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # a --config.X override
    if _debug(argv):
      raise
    _fail(_override_error(argv, e))


def check_platform() -> None:
  """A UserError if JAX_PLATFORMS asks for a platform this machine cannot start, naming what it
  asked for and what is there. Call it where the CLI first needs the devices (after
  `jax.distributed.initialize`, if any)."""
  import jax
  wanted = os.environ.get("JAX_PLATFORMS", "")
  if not wanted:
    return                                    # JAX picks what is there
  try:
    jax.devices()
  except Exception as e:  # noqa: BLE001 - RuntimeError, or an AssertionError for 'cuda'
    text = str(e).strip()
    reason = text.splitlines()[0].split(" (set JAX_PLATFORMS")[0] if text else "no backend"
    raise UserError(f"JAX_PLATFORMS={wanted} asks for a platform this machine cannot start "
                    f"({reason}); available here: {_available_platforms()}. Unset "
                    f"JAX_PLATFORMS or name one of those") from e


def _available_platforms() -> str:
  """The platforms JAX starts when free to choose (the failed choice is cleared first)."""
  import jax
  import jax.extend.backend
  logging.disable(logging.WARNING)          # JAX logs each platform it tries and lacks
  try:
    jax.extend.backend.clear_backends()
    jax.config.update("jax_platforms", "")
    return ", ".join(sorted({d.platform for d in jax.devices()}))
  except Exception:  # noqa: BLE001 - nothing starts at all
    return "none"
  finally:
    logging.disable(logging.NOTSET)


class _DropLoggedOrbaxErrors(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or "orbax" not in record.pathname


def run(main: Callable[[list[str]], object], *, check_platform_first: bool = True) -> None:
  """`app.run(main)` with user errors in flags, config and main reported as one line.

  `check_platform_first`: run `check_platform` before `main` (train.py calls it itself, after
  `jax.distributed.initialize`)."""
  def guarded(argv):
    if not flags.FLAGS.debug:
      logging.getLogger("absl").addFilter(_DropLoggedOrbaxErrors())
    try:
      if check_platform_first:
        check_platform()
      return main(argv)
    except Preempted as e:
      print(f"preempted: {e}", file=sys.stderr)
      sys.exit(PREEMPTED_STATUS)
    except (UserError, OSError) as e:
      if flags.FLAGS.debug:
        raise
      if isinstance(e, OSError) and e.strerror:
        _fail(f"{e.strerror}: {e.filename}" if e.filename else e.strerror)
      _fail(str(e))
  app.run(guarded, flags_parser=_parse_flags)


def define_debug_flag() -> None:
  flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
