"""What a failed write means, for the writers that do not raise an ``OSError``; the checkpoint
save's injected write failure (a test hook).

A full disk reaches the engine in three forms: an ``OSError`` with ``errno.ENOSPC`` (Python's own
files, PIL), safetensors' ``SafetensorError: Error while serializing: I/O error: No space left on
device (os error 28)``, and torch's zip writer (``torch.save``, so every DeepSpeed checkpoint
file), which checks each write's byte count and reports a short one as ``RuntimeError:
[enforce fail at inline_container.cc:...] . unexpected pos N vs M``: the write stopped early,
which on a local or network disk means it or the user's quota is full. All three are one
"the disk is full" here, so a checkpoint save and the command's exit say so instead of calling
it a bug.

No torch at import: the command boundary uses it on any escaping error.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..core.faults import FAIL_SAVE_ENV, FaultPlan

__all__ = ["FAIL_SAVE_ENV", "as_os_error", "attempt_write", "injected_save_fault"]

# Fragments of the messages above (the safetensors one carries the OS's own strerror text).
_FULL_DISK = ("unexpected pos", "No space left on device", "os error 28")

# Test hook: core/faults.py's ``fail_save`` point (``E2ED2_FAULTS="fail_save:rank=R"``, or its
# older spelling ``E2ED2_FAIL_SAVE_RANK=R``, re-exported here) makes rank R's file writes inside
# DeepSpeed's checkpoint save raise (an injected EIO): the one way to test, on real ranks, a rank
# failing between that save's collectives. Read at each save, by :func:`injected_save_fault`.


def as_os_error(error: BaseException) -> OSError | None:
    """``error`` itself if it is an OSError; an ``ENOSPC`` OSError for the full-disk messages of
    torch's and safetensors' writers; else None (not a write failure this module knows)."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    writer = isinstance(error, RuntimeError) or type(error).__name__ == "SafetensorError"
    if writer and any(fragment in text for fragment in _FULL_DISK):
        first = text.splitlines()[0]
        full = OSError(errno.ENOSPC, f"No space left on device ({type(error).__name__}: {first})")
        full.__cause__ = error
        return full
    return None


def attempt_write(
    error: OSError | None, write: Callable[[], object], *, always: bool = False
) -> OSError | None:
    """Runs ``write`` unless an earlier write failed (``always``: it holds a collective and
    runs anyway); returns the first write failure. Anything else propagates."""
    if error is not None and not always:
        return error
    try:
        write()
    except Exception as err:
        failure = as_os_error(err)
        if failure is None:
            raise
        return error or failure
    return error


def injected_save_fault(rank: int) -> Callable[[str], OSError] | None:
    """The failure of this rank's DeepSpeed file writes if the fault plan's ``fail_save`` names
    it, else None (checkpoint.py raises it from each write:
    deepspeed_compat.failing_checkpoint_writes)."""
    if not FaultPlan.from_env().hits("fail_save", rank=rank):
        return None

    def fault(path: str) -> OSError:
        return OSError(errno.EIO, f"injected write failure (fail_save on rank {rank})", path)

    return fault
