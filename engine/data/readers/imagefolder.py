"""A diffusers / Hugging Face ``imagefolder``: images with a ``metadata.jsonl`` or
``metadata.csv`` whose ``file_name`` column names each image (relative to the metadata file's
folder) and whose caption column (``--caption-column``, default ``text``) holds its caption.

Metadata files may sit in any folder under the root (an imagefolder's split folders each have
their own). Images are read in the order of their metadata rows, files in sorted order; an image
no metadata row names is skipped and listed, as is a row naming no image, a row without a
caption, and a line with bad bytes or bad JSON (``metadata.jsonl:<line>``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..paths import ConfinedRoot, PathOutsideRoot
from .base import Record, Sample, Skipped, caption_text, metadata_lines
from .captions import image_files

__all__ = ["METADATA_FILES", "ImageFolderReader"]

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class ImageFolderReader:
    """An imagefolder under ``root`` (module docstring)."""

    kind = "imagefolder"

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        caption_column: str | None = None,
        image_column: str | None = None,
    ) -> None:
        self.confined = ConfinedRoot(root, "image_dir")
        self.caption_column = caption_column or "text"
        self.image_column = image_column or "file_name"
        self.total: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "captions": f"{' / '.join(METADATA_FILES)}: {self.image_column} + {self.caption_column}"
        }

    def __iter__(self) -> Iterator[Record]:
        skipped: list[Skipped] = []
        files = image_files(self.confined, skipped)
        self.total = len(files) + len(skipped)  # one record per image file
        yield from skipped
        root = Path(self.confined.given)
        metadata = sorted(
            self.confined.relative(p)
            for p in root.rglob("metadata.*")
            if p.name in METADATA_FILES and p.is_file()
        )
        if not metadata:
            raise FileNotFoundError(
                f"image_dir {self.confined.given!r} has no {' or '.join(METADATA_FILES)}"
            )
        named: set[str] = set()
        for relative in metadata:
            path = self.confined.resolve(relative)  # a metadata file linked from outside: refused
            rows = _csv_rows if relative.endswith(".csv") else _jsonl_rows
            folder = posixpath.dirname(relative)
            for where, row in rows(path, relative):
                if isinstance(row, str):
                    yield Skipped(where, row, False)
                    continue
                record = self._sample(where, row, folder)
                if record.sample:  # a row naming an image (a Sample, or one without caption)
                    if record.name in named:
                        yield Skipped(where, f"{record.name} is named twice", False)
                        continue
                    named.add(record.name)
                yield record
        for name in files:
            if name not in named:
                yield Skipped(name, f"no metadata row names it ({self.image_column})")

    def _sample(self, where: str, row: dict[str, Any], folder: str) -> Record:
        file = row.get(self.image_column)
        if not isinstance(file, str) or not file:
            return Skipped(where, f"no {self.image_column!r} (--image-column)", False)
        name = posixpath.normpath(posixpath.join(folder, file.replace("\\", "/")))
        try:
            path = self.confined.resolve(name)
        except PathOutsideRoot as error:
            return Skipped(where, f"path outside the dataset: {error}", False)
        if not path.is_file():
            return Skipped(where, f"names {name}, no such image", False)
        caption = caption_text(row.get(self.caption_column))
        if caption is None:
            return Skipped(name, f"no caption ({self.caption_column!r} missing or empty, {where})")
        return Sample(name, path, caption)


def _jsonl_rows(path: Path, relative: str) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(``file:line``, row) per line, or (``file:line``, why) for a bad one."""
    for number, line, problem in metadata_lines(path):
        where = f"{relative}:{number}"
        if line is None:
            yield where, str(problem)
        elif line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield where, f"not JSON ({error})"
                continue
            yield where, row if isinstance(row, dict) else "not a JSON object"


def _csv_rows(path: Path, relative: str) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(``file:line``, row) per CSV record (header first), or (``file:line``, why)."""
    # Bad bytes are kept as surrogates, so a record holding one is found and skipped alone.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        start = 2
        for row in reader:
            where = f"{relative}:{start}"
            start = reader.line_num + 1
            values = [v for v in row.values() if isinstance(v, str)]
            if any(_has_bad_bytes(v) for v in values):
                yield where, "not UTF-8 text"
            elif None in row:
                yield where, f"more fields than the header's {len(reader.fieldnames or [])}"
            else:
                yield where, row
    except csv.Error as error:
        yield f"{relative}:{reader.line_num}", f"not CSV ({error}); the rest of the file is unread"


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)
