"""``e2ed2 launch``: the real ``deepspeed`` launcher on one node, with the signal forwarding and
the failure handling it lacks.

What DeepSpeed 0.19 does on one node: its runner (the ``deepspeed`` command) starts
``deepspeed.launcher.launch`` as a child and installs no signal handler, so SIGTERM to it (what
a scheduler sends the job) ends the runner alone while the ranks train on unattended.
``launch.py`` itself, on SIGTERM / SIGINT, and whenever a rank exits non-zero, terminates every
rank's process tree (SIGTERM, SIGKILL 30 s later) and exits 1 (or the failed rank's code).
So a rank that is still checkpointing gets a second SIGTERM from it the moment its peer exits
first (the trainer reads a second signal as "stop at once"), and nothing says which rank failed.

This supervisor runs the real runner in a session of its own (a terminal's Ctrl-C or a kill of
this process's group reaches this process only) and:

- **SIGTERM / SIGINT**: freezes ``launch.py`` (SIGSTOP; its monitor would re-signal the
  survivors), sends the signal once to each rank process (``launch.py``'s children: not their
  data-loader workers), waits for the ranks to end (each checkpoints and exits 143 / 130), lets
  ``launch.py`` go on (SIGCONT) and exits with the ranks' code. A second signal is forwarded the
  same way (the ranks stop at once), a third kills the whole process group. With no rank
  process on this node (still starting, or a multi-node run, whose runner forwards signals
  itself over pdsh) the signal goes to the runner's group.
- **A failed rank** (a non-zero code, or none: killed) while no signal was forwarded: one line
  names it and its code, the other ranks get :data:`FAILURE_GRACE_S` to end by themselves (one
  blocked in a collective with the dead rank cannot), then SIGKILL; the exit code is the failed
  rank's (1 when it was killed).

Each rank's exit code reaches this process through a file per rank in the folder named by
:data:`RANK_STATUS_ENV` (written by ``distributed.exit_process``): the ranks are ``launch.py``'s
children, not this process's, so their codes are not ours to wait for.

No torch at import (the wrapper starts in well under a second).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

import psutil

__all__ = ["FAILURE_GRACE_S", "RANK_STATUS_ENV", "supervise"]

#: The folder where each rank writes its exit code (file ``rank<R>``) just before it exits.
RANK_STATUS_ENV = "E2ED2_RANK_STATUS_DIR"
#: Seconds the other ranks get to end by themselves after one failed, before SIGKILL.
FAILURE_GRACE_S = 10.0
_POLL_S = 0.2
_LAUNCH_MODULE = "deepspeed.launcher.launch"


def _say(message: str) -> None:
    print(f"e2ed2 launch: {message}", file=sys.stderr, flush=True)


class _Ranks:
    """The rank processes ``launch.py`` started, found by walking the runner's process tree."""

    def __init__(self, runner_pid: int, status_dir: str) -> None:
        self.runner_pid = runner_pid
        self.status_dir = status_dir
        self.launch: psutil.Process | None = None
        self.procs: dict[int, psutil.Process] = {}  # rank -> process

    def refresh(self) -> None:
        try:
            if self.launch is None:
                for child in psutil.Process(self.runner_pid).children(recursive=True):
                    if _LAUNCH_MODULE in " ".join(child.cmdline()):
                        self.launch = child
                        break
            if self.launch is not None:
                for child in self.launch.children():
                    rank = int(child.environ().get("RANK", "-1"))
                    if rank >= 0:
                        self.procs.setdefault(rank, child)
        except (psutil.Error, ValueError):
            pass  # a process that just ended, or one still exec'ing

    def alive(self) -> dict[int, psutil.Process]:
        live = {}
        for rank, proc in self.procs.items():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    live[rank] = proc
            except psutil.Error:
                pass
        return live

    def ended(self) -> dict[int, int | None]:
        """rank -> exit code (None: ended without writing one, i.e. killed) of ended ranks."""
        live = self.alive()
        return {rank: self.code(rank) for rank in self.procs if rank not in live}

    def failure_order(self, ended: dict[int, int | None]) -> list[int]:
        """The ranks of ``ended`` that failed, the likely cause first. Ranks that end within one
        poll of each other (a rank fails, its peers' next collective then fails at once) are
        ordered by when they wrote their exit code, so the first to fail is named, not the
        lowest rank; a rank that ended without a code (killed: no time to compare) comes first,
        since a peer's death is what makes the others fail."""
        failed = [rank for rank, code in ended.items() if code != 0]

        def reported_ns(rank: int) -> int:
            try:
                return os.stat(os.path.join(self.status_dir, f"rank{rank}")).st_mtime_ns
            except OSError:
                return -1  # no exit code written: killed

        return sorted(failed, key=lambda rank: (reported_ns(rank), rank))

    def code(self, rank: int) -> int | None:
        try:
            with open(os.path.join(self.status_dir, f"rank{rank}")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def signal_launch(self, signum: int) -> None:
        if self.launch is not None:
            with contextlib.suppress(psutil.Error):
                self.launch.send_signal(signum)

    def send(self, signum: int, ranks: dict[int, psutil.Process]) -> None:
        for proc in ranks.values():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signum)


def supervise(command: list[str], env: dict[str, str] | None = None) -> int:
    """Runs ``command`` (the ``deepspeed`` runner's command line) as described in the module
    doc; returns the exit code for this process."""
    status_dir = tempfile.mkdtemp(prefix="e2ed2-launch-")
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner = subprocess.Popen(
            command,
            env={**(env or os.environ), RANK_STATUS_ENV: status_dir},
            start_new_session=True,
        )
        return _watch(runner, _Ranks(runner.pid, status_dir), received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(status_dir, ignore_errors=True)


def _watch(runner: subprocess.Popen, ranks: _Ranks, received: list[int]) -> int:
    forwarded: list[int] = []
    failed: tuple[int, int | None] | None = None
    kill_at: float | None = None
    frozen = False
    while True:
        ranks.refresh()
        live = ranks.alive()
        while len(forwarded) < len(received):  # a new signal
            signum = received[len(forwarded)]
            forwarded.append(signum)
            if len(forwarded) >= 3:
                _say("third signal: killing every process of the run")
                _kill_group(runner)
            elif live:
                if not frozen:
                    ranks.signal_launch(signal.SIGSTOP)
                    frozen = True
                _say(f"{signal.Signals(signum).name}: forwarded to ranks {sorted(live)}")
                ranks.send(signum, live)
            else:
                _signal_group(runner, signum)
        if failed is None and not forwarded:
            ended = ranks.ended()
            first = ranks.failure_order(ended)
            if first:
                rank, code = first[0], ended[first[0]]
                failed = (rank, code)
                how = "was killed (no exit code)" if code is None else f"exited {code}"
                _say(
                    f"rank {rank} {how} (its own message above says why); the other ranks "
                    f"{sorted(live)} are stopped within {FAILURE_GRACE_S:.0f} s"
                )
                if not frozen:
                    ranks.signal_launch(signal.SIGSTOP)
                    frozen = True
                kill_at = time.monotonic() + FAILURE_GRACE_S
        if kill_at is not None and time.monotonic() >= kill_at and live:
            ranks.send(signal.SIGKILL, live)
            kill_at = None
        if frozen and ranks.procs and not live:
            ranks.signal_launch(signal.SIGCONT)  # it reports the ranks' codes and exits
            frozen = False
        returned = runner.poll()
        if returned is not None:
            break
        time.sleep(_POLL_S)
    ranks.refresh()
    codes = {rank: ranks.code(rank) for rank in sorted(ranks.procs)}
    if failed is not None:
        return 1 if failed[1] is None else failed[1]
    if forwarded:
        expected = 128 + forwarded[0]
        if codes and all(
            code is not None and code in (128 + s for s in forwarded) for code in codes.values()
        ):
            return expected
        _say(f"after {signal.Signals(forwarded[0]).name} the ranks exited {codes}")
        return expected if returned in (expected, -forwarded[0]) else 1
    return returned if returned >= 0 else 128 - returned


def _signal_group(runner: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(runner.pid, signum)


def _kill_group(runner: subprocess.Popen) -> None:
    _signal_group(runner, signal.SIGCONT)
    _signal_group(runner, signal.SIGKILL)
