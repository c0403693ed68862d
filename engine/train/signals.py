"""SIGTERM / SIGINT during training: finish the step, maybe checkpoint, exit 143 / 130.

Schedulers preempt with SIGTERM (Slurm, Kubernetes), people with Ctrl-C (SIGINT). Inside the
loop the first signal only sets a flag: the current step (and a checkpoint save in progress)
finishes, every rank agrees at the next step boundary, and the trainer checkpoints and raises
:class:`Interrupted`. A second signal abandons the step at once (the save in progress stays a
``.tmp-`` folder, removed at the next start). Outside the loop :func:`raise_on_sigterm` makes
SIGTERM raise like Ctrl-C does, so the command still exits 143 with one line.

No torch at import: the CLIs install the SIGTERM handler before their config is read.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Interrupted", "StopSignals", "raise_on_sigterm"]

log = logging.getLogger("e2ed2.train")


class Interrupted(Exception):
    """The run was stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(message or f"{name} received")


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def raise_on_sigterm() -> Any:
    """Makes SIGTERM raise :class:`Interrupted` (main thread only); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise)


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGINT request a stop instead of raising."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: abandon the step
            raise Interrupted(signum, f"second {signal.Signals(signum).name}: step abandoned")
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then checkpoint and exit (send it again "
            "to stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (one tiny all-reduce per step; ranks
        that stopped at different steps would leave a peer waiting in a collective)."""
        # lazy: step_guard imports torch; the commands' error boundary imports this module and stays
        # torch-free
        from .step_guard import any_rank

        stop = any_rank(self.signum is not None, device)
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # a peer got it; the launcher forwards SIGTERM
        return stop
