"""The one interface of precompute's inputs: a reader yields samples and skipped inputs.

Every reader (its own module in this package) walks one way users keep image-caption data and
yields, in a fixed order, :class:`Sample` records (an image to decode and its caption) and
:class:`Skipped` records (an input left out and why), which precompute lists in ``index.json``.
Readers never decode images (precompute does, data/images.py) and read every file through a
:class:`~e2ed2.engine.data.paths.ConfinedRoot` of the dataset root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Reader", "Record", "Sample", "Skipped", "caption_text", "metadata_lines"]


@dataclass(frozen=True)
class Sample:
    """An image with its caption. ``name``: how the sample is listed (a path relative to the
    root, ``shard.tar:key``, ``row 12``); ``image``: a resolved path inside the root, the
    file's bytes, or an opened ``PIL.Image.Image``; ``caption``: non-empty text."""

    name: str
    image: Path | bytes | Any
    caption: str
    #: A sample is always an image found (as :attr:`Skipped.sample`).
    sample = True


@dataclass(frozen=True)
class Skipped:
    """An input left out: ``name`` (a sample, a file, or ``file:line`` of a metadata file) and
    ``reason``. ``sample``: whether it counts as an image found (False: a metadata line or a
    file holding no single sample)."""

    name: str
    reason: str
    sample: bool = True


Record = Sample | Skipped


class Reader(Protocol):
    """What precompute reads: records in a fixed order, and a description for index.json."""

    #: The reader's name (``e2ed2 precompute --source``).
    kind: str
    #: How many images (usable or skipped) the reader yields, for the progress bar's ETA:
    #: set once its first record is read; None for a stream of unknown length.
    total: int | None

    def __iter__(self) -> Iterator[Record]: ...

    def describe(self) -> dict[str, Any]:
        """Where captions (and images) came from, as stored under ``index.json``'s source."""
        ...


def caption_text(value: Any) -> str | None:
    """A caption field's text, stripped, or None when it has none. A list of captions (datasets
    often keep several per image) gives its first text, as diffusers' examples do outside
    training."""
    if isinstance(value, list | tuple) and value:
        value = value[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def metadata_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, None)`` for each line of a text file, or ``(number, None, why)``
    for a line that is not UTF-8: one bad byte costs its own line, not the file (a BOM at the
    start is dropped)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8"), None
            except UnicodeDecodeError as error:
                yield number, None, f"not UTF-8 text ({error})"
