"""The error boundary of every ``e2ed2`` command: expected failures end in one line, a code.

Exit codes (the same for every command):

- ``0``: done.
- ``2``: the input is wrong: a config key or value, a command-line argument, a missing,
  unreadable or mistyped file or folder, a checkpoint that does not match or cannot be loaded, an
  output folder that holds another run. Nothing was changed.
- ``1``: the run stopped: too many bad samples or non-finite steps (after a checkpoint), a full
  disk or another OS error while writing, or an unexpected error (a bug: the line says so).
- ``130`` / ``143``: stopped by SIGINT / SIGTERM (training: after a checkpoint).

A traceback is printed only with ``--debug`` (anywhere on the command line) or ``E2ED2_DEBUG=1``.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

# The torch-free parts of the config and train wings (a config error stays well under a second).
from ..config import ConfigError
from ..train.signals import Interrupted, raise_on_sigterm
from ..train.write_errors import as_os_error

__all__ = ["DEBUG_ENV", "run_command"]

DEBUG_ENV = "E2ED2_DEBUG"
# OSErrors that mean a path given by the user is wrong (exit 2), not that the run broke.
_INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


def _classify(error: BaseException) -> tuple[int, str]:
    """(exit code, label) of an exception escaping a command."""
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT, "interrupted (SIGINT)"
    if isinstance(error, Interrupted):
        return error.exit_code, f"interrupted ({signal.Signals(error.signum).name})"
    # The train wing's errors only if it was imported (it imports torch; a config error must
    # come back in well under a second).
    train_errors: tuple[type[BaseException], ...] = ()
    if "e2ed2.engine.train.checkpoint" in sys.modules:
        # lazy: reached only once the run imported it (it imports torch)
        from ..train.checkpoint import CheckpointError, CheckpointSaveError

        if isinstance(error, CheckpointSaveError):
            return 1, "stopped"
        train_errors += (CheckpointError,)
    if "e2ed2.engine.train.fingerprint" in sys.modules:
        # lazy: reached only once the run imported it (it imports torch)
        from ..train.fingerprint import CheckpointMismatchError

        train_errors += (CheckpointMismatchError,)
    if "e2ed2.engine.train.trainer" in sys.modules:
        # lazy: reached only once the run imported it (it imports torch)
        from ..train.trainer import DataError, NonFiniteError

        if isinstance(error, DataError | NonFiniteError):
            return 1, "stopped"
    if isinstance(error, ConfigError):
        return 2, "config error"
    if train_errors and isinstance(error, train_errors):
        return 2, "error"
    written = None if isinstance(error, OSError) else as_os_error(error)
    if written is not None and written.errno == errno.ENOSPC:
        # torch's and safetensors' writers report a full disk without an OSError.
        return 1, "stopped: the disk is full (ENOSPC)"
    if isinstance(error, OSError):
        if error.errno == errno.ENOSPC:
            return 1, "stopped: the disk is full (ENOSPC)"
        if error.errno in _INPUT_ERRNOS or isinstance(error, FileNotFoundError):
            return 2, "error"
        return 1, "stopped"
    return 1, "internal error (a bug; please report it with the traceback)"


def run_command(prog: str, body: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Runs ``body(argv)`` inside the boundary; returns the exit code (see the module doc)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    previous = raise_on_sigterm()
    try:
        return body(args)
    except SystemExit as exit_:  # argparse: usage + one error line already printed
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except (Exception, KeyboardInterrupt) as error:
        code, label = _classify(error)
        if debug:
            traceback.print_exc()
        detail = _one_line(error)
        hint = ""
        if label.startswith("internal error"):
            detail = f"{type(error).__name__}: {detail}"
            if not debug:
                hint = f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"{prog}: {label}: {detail}{hint}", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
