"""Paths confined to the roots a user named: every file read on their behalf stays inside.

A dataset folder is data, not a place to follow links from: a symlink in an image folder (or a
``..`` in a caption file's path, an absolute path in a shard index) could otherwise pull any
readable file of the machine into the shards, e.g. a private file's text stored as a caption.
:class:`ConfinedRoot` resolves the root once (symlinks and ``..`` included, ``os.path.realpath``)
and every path under it the same way, and refuses a path whose resolved form is not inside the
resolved root with :class:`PathOutsideRoot`, naming the path as given and where it leads.

A symlink whose target stays inside the root is followed (folders of links into one dataset
are common). The check and the later open are two steps: a link swapped in between by someone
who can write into the dataset folder is not caught (that user can change the data anyway).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ConfinedRoot", "PathOutsideRoot"]


class PathOutsideRoot(ValueError):
    """A path under a confined root resolves outside it (message: the path and its target)."""


class ConfinedRoot:
    """A user-given root folder (or file, e.g. one ``.tar``) and the paths read under it.

    ``key``: how the user named the root (``"image_dir"``, ``"data.shard_dir"``), for messages.
    """

    def __init__(self, root: str | os.PathLike, key: str) -> None:
        self.given = os.fspath(root)
        self.key = key
        #: The root with every symlink and ``..`` resolved.
        self.real = Path(os.path.realpath(self.given))

    def resolve(self, path: str | os.PathLike) -> Path:
        """``path`` (relative to the root, or absolute) resolved; raises PathOutsideRoot when it
        leads outside the root. The file need not exist (callers check that themselves)."""
        joined = os.path.join(self.given, os.fspath(path))
        real = Path(os.path.realpath(joined))
        if not self.contains(real):
            raise PathOutsideRoot(
                f"{os.fspath(path)!r} resolves to {os.fspath(real)!r}, outside "
                f"{self.key} {self.given!r}"
            )
        return real

    def contains(self, real: str | os.PathLike) -> bool:
        """Whether an already resolved path is the root or inside it."""
        return Path(real) == self.real or Path(real).is_relative_to(self.real)

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` (found under the root, unresolved) as a posix path relative to the root:
        how inputs are named in messages and in ``index.json``."""
        return Path(os.path.relpath(os.fspath(path), self.given)).as_posix()
