"""One writer per folder: an advisory OS lock on ``<folder>/.e2ed2.lock`` for a process's life.

``e2ed2 train`` (rank 0) and ``e2ed2 precompute`` take it on their output folder before they
write anything there. The lock is ``fcntl.flock`` on the lock file, not the file itself: the
kernel drops it when the holding process ends in any way (exit, exception, SIGKILL, a node
reboot), so a lock file a dead process left behind never blocks; the file stays and is reused.
The holder writes its pid, host, command and start time into the file, read only to name the
holder in the refusal. The lock follows the file's inode, so it survives the file being renamed
(``run.overwrite`` moves an old run aside and links the held lock file back, see run_dir.py).

Hand-written rather than the ``filelock`` package: a refused process must read the holder's
note, and ``filelock`` neither writes one nor promises to leave the file's contents alone (its
Unix lock truncates the file on open in some versions); ``flock`` itself is one call.

Over NFS, Linux maps ``flock`` onto the server's byte-range locks (NFSv4, or NFSv3 with lockd),
so two hosts sharing a run folder exclude each other. A file system without locks (ENOLCK,
EOPNOTSUPP: some FUSE mounts) gets a warning and no lock, rather than a refused run.

No torch at import: the CLIs take the lock before their heavy imports.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

__all__ = ["LOCK_FILE", "FolderInUseError", "FolderLock", "lock_folder"]

log = logging.getLogger("e2ed2.train")

#: The lock file's name inside the locked folder (never deleted: see the module doc).
LOCK_FILE = ".e2ed2.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock; the message names its pid, host, start."""


class FolderLock:
    """A held lock (``locked`` False where the file system has none); ``release`` or ``with``."""

    def __init__(self, path: Path, descriptor: int, locked: bool, created: bool) -> None:
        self.path = path
        self.locked = locked
        self._descriptor: int | None = descriptor
        # The folder did not exist before the lock: a refused start leaves it as it found it.
        self._created = created

    def release(self) -> None:
        """Drops the lock (closing the descriptor releases a ``flock``); idempotent. A folder
        the lock created that still holds nothing but the lock file is removed again."""
        if self._descriptor is None:
            return
        if self._created and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            # Unlinked while still held: a waiter that then gets this inode's lock sees that
            # the path no longer leads to it and starts over (lock_folder's inode check).
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
        os.close(self._descriptor)
        self._descriptor = None
        self.locked = False

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()


def _holder(descriptor: int) -> str:
    """The holder's note as words, read from the open lock file."""
    try:
        note = json.loads(os.pread(descriptor, 4096, 0).decode())
        return (
            f"{note['command']}, pid {note['pid']} on host {note['host']}, started "
            f"{note['started']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        # Locked an instant ago, its note not yet written (or a foreign file).
        return "its pid not yet recorded"


def lock_folder(folder: str | os.PathLike, key: str, command: str) -> FolderLock:
    """Creates ``folder`` if needed and locks it for this process, or raises.

    ``key`` names the folder in messages (``run.output_dir``, ``OUT_DIR``), ``command`` is what
    the note calls this process. Raises :class:`FolderInUseError` while another process holds
    it, NotADirectoryError where ``folder`` is a file.
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{key}={os.fspath(folder)!r} is a file; it must be a folder")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    while True:
        # No O_TRUNC: the holder's note must survive a refused opener. Not inherited by exec.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise FolderInUseError(
                f"{key}={os.fspath(folder)!r} is in use by another process ({holder}); one "
                f"process writes a folder at a time: wait for it to end or stop it, or choose "
                f"another {key}"
            ) from None
        except OSError as err:
            os.close(descriptor)
            if err.errno not in _NO_LOCKS:
                raise
            log.warning(
                "%s=%r: the file system does not support locks (%s); nothing stops a second "
                "process from writing into it at the same time",
                key,
                os.fspath(folder),
                os.strerror(err.errno),
            )
            return FolderLock(path, os.open(path, os.O_RDONLY), locked=False, created=False)
        # The file may have been removed (a refused start cleaning up the folder it created)
        # between our open and our lock: then the lock is on an orphan inode; start over.
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
        root.mkdir(parents=True, exist_ok=True)
    note = {
        "command": command,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(note) + "\n").encode(), 0)
    return FolderLock(path, descriptor, locked=True, created=created)
