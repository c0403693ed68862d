"""webdataset ``.tar`` shards (the format the LCM-distillation script and Sana stream), read as
a stream with the ``webdataset`` library: nothing is unpacked to disk.

The shards are the ``.tar`` files under the root, in sorted order; a shard linked from outside
the root is skipped and listed. Within a shard, files sharing a key (``000123.jpg``,
``000123.txt``, ``000123.json``) form a sample, listed as ``<shard>:<key>``. Its image is the
member named by ``--image-column`` (an extension, e.g. ``png``), else the first of ``jpg jpeg png
webp gif bmp tif tiff``; its caption the member named by ``--caption-column`` (default ``txt``),
else that field of its ``.json`` member (``text`` when the column is not given). A shard that
cannot be read to its end (truncated, not a tar) is listed; its samples read before the damage
are kept. Only regular files in a tar are read (webdataset skips links).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset

from ..paths import ConfinedRoot, PathOutsideRoot
from .base import Record, Sample, Skipped, caption_text

__all__ = ["TAR_IMAGE_EXTENSIONS", "WebDatasetReader"]

#: Image members looked for, in this order, when no --image-column is given.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


class WebDatasetReader:
    """webdataset shards under ``root`` (module docstring)."""

    kind = "webdataset"

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        caption_column: str | None = None,
        image_column: str | None = None,
    ) -> None:
        self.confined = ConfinedRoot(root, "image_dir")
        self.caption_member = caption_column or "txt"
        self.json_field = caption_column or "text"
        self.image_members = (image_column,) if image_column else TAR_IMAGE_EXTENSIONS
        self.total: int | None = None  # a stream: its length is known at its end

    def describe(self) -> dict[str, Any]:
        return {
            "captions": f"webdataset .tar members: .{self.caption_member}, else "
            f".json {self.json_field!r}"
        }

    def __iter__(self) -> Iterator[Record]:
        root = Path(self.confined.given)
        shards: list[str] = []
        names: dict[str, str] = {}  # resolved shard path -> its name relative to the root
        for path in sorted(root.rglob("*.tar")):
            relative = self.confined.relative(path)
            try:
                real = os.fspath(self.confined.resolve(relative))
            except PathOutsideRoot as error:
                yield Skipped(relative, f"path outside the dataset: {error}", False)
                continue
            shards.append(real)
            names[real] = relative
        if not shards:
            raise FileNotFoundError(f"image_dir {self.confined.given!r} holds no .tar shards")
        errors: list[Skipped] = []
        damaged: set[str] = set()

        def handler(error: Exception) -> bool:
            # webdataset puts the shard's path (or its open file) into the error's args, and
            # reports one damage twice (the member's read, then the tar's next header): the
            # shard is named by its path, and listed once.
            text = " ".join(str(arg) for arg in error.args)
            shard = next((name for real, name in names.items() if real in text), "a shard")
            if shard not in damaged:
                damaged.add(shard)
                reason = f"unreadable tar ({type(error).__name__}: {error.args[0]})"
                errors.append(Skipped(shard, reason, False))
            return True  # go on with the next shard

        stream = webdataset.WebDataset(
            shards,
            handler=handler,
            shardshuffle=False,
            nodesplitter=None,  # one process reads every shard
            workersplitter=None,
            empty_check=False,
        )
        for sample in stream:
            yield from errors
            errors.clear()
            shard = names.get(sample.get("__url__", ""), "?")
            yield self._sample(f"{shard}:{sample.get('__key__')}", sample)
        yield from errors

    def _sample(self, name: str, sample: dict[str, Any]) -> Record:
        image = next((sample[m] for m in self.image_members if m in sample), None)
        if not isinstance(image, bytes):
            wanted = " / ".join(self.image_members)
            return Skipped(name, f"no image member ({wanted}; --image-column)")
        if self.caption_member in sample:
            caption = caption_text(sample[self.caption_member])
        elif "json" in sample:
            try:
                fields = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError):
                return Skipped(name, "its .json member is not JSON text")
            caption = caption_text(
                fields.get(self.json_field) if isinstance(fields, dict) else None
            )
        else:
            caption = None
        if caption is None:
            return Skipped(
                name,
                f"no caption (no .{self.caption_member} member, no {self.json_field!r} in .json, "
                "or empty / not UTF-8)",
            )
        return Sample(name, image, caption)
