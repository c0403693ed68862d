"""e2ed2's own image folder: images found recursively, captions from ``captions.jsonl`` (one
``{"file": <path relative to the root>, "caption": <text>}`` per line; wins where both exist)
or a sidecar text file next to the image (``cat.txt`` or ``cat.png.txt``), the kohya / ai-toolkit
convention. Images are read in sorted order of their relative paths."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..images import IMAGE_EXTENSIONS
from ..paths import ConfinedRoot, PathOutsideRoot
from .base import Record, Sample, Skipped, caption_text, metadata_lines

__all__ = ["CAPTIONS_FILE", "CaptionsReader", "image_files"]

CAPTIONS_FILE = "captions.jsonl"


class CaptionsReader:
    """Images under ``root`` with ``captions.jsonl`` or sidecar captions (module docstring)."""

    kind = "captions"

    def __init__(self, root: str | os.PathLike) -> None:
        self.confined = ConfinedRoot(root, "image_dir")
        self.total: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"captions": f"{CAPTIONS_FILE}, else sidecar .txt"}

    def __iter__(self) -> Iterator[Record]:
        skipped: list[Skipped] = []
        files = image_files(self.confined, skipped)
        self.total = len(files) + len(skipped)  # the images found, inside the root or not
        listed = _read_captions_jsonl(self.confined, skipped)
        for name in sorted(set(listed) - set(files)):
            skipped.append(Skipped(name, f"listed in {CAPTIONS_FILE} but no such image", False))
        yield from skipped
        for name in files:
            caption = listed.get(name)
            if caption is None:
                caption, problem = _sidecar_caption(self.confined, name)
                if problem is not None:
                    yield Skipped(name, problem)
                    continue
            text = caption_text(caption)
            if text is None:
                yield Skipped(
                    name, f"no caption (not in {CAPTIONS_FILE}, no sidecar .txt, or empty)"
                )
                continue
            yield Sample(name, self.confined.resolve(name), text)


def image_files(confined: ConfinedRoot, skipped: list[Skipped]) -> list[str]:
    """The image files under the root (relative posix paths, sorted) that resolve inside it;
    those that do not (a symlink out) are appended to ``skipped``, never read."""
    files = []
    root = Path(confined.given)
    for name in sorted(
        confined.relative(p)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ):
        try:
            confined.resolve(name)
        except PathOutsideRoot as error:
            skipped.append(Skipped(name, f"path outside the dataset: {error}"))
            continue
        files.append(name)
    return files


def _read_captions_jsonl(confined: ConfinedRoot, skipped: list[Skipped]) -> dict[str, str]:
    """``{relative posix path: caption}`` from ``captions.jsonl``; bad lines (not UTF-8, not
    JSON, wrong keys, a path leaving the root) are appended to ``skipped`` as
    ``captions.jsonl:<line>``. Raises PathOutsideRoot when the file itself leads outside."""
    path = confined.resolve(CAPTIONS_FILE)
    if not path.is_file():
        return {}
    captions: dict[str, str] = {}
    for number, line, problem in metadata_lines(path):
        where = f"{CAPTIONS_FILE}:{number}"
        if line is None:
            skipped.append(Skipped(where, str(problem), False))
            continue
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append(Skipped(where, f"not JSON ({error})", False))
            continue
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("file"), str)
            or not isinstance(entry.get("caption"), str)
        ):
            skipped.append(
                Skipped(where, 'expected {"file": <relative path>, "caption": <text>}', False)
            )
            continue
        name = posixpath.normpath(entry["file"].replace("\\", "/"))
        try:
            confined.resolve(name)
        except PathOutsideRoot as error:
            skipped.append(Skipped(where, f"path outside the dataset: {error}", False))
            continue
        captions[name] = entry["caption"]
    return captions


def _sidecar_caption(confined: ConfinedRoot, name: str) -> tuple[str | None, str | None]:
    """(caption of ``cat.txt`` or ``cat.png.txt`` next to image ``name``, None), (None, None)
    without one, or (None, why) for one that is unreadable or resolves outside the root."""
    stem = posixpath.splitext(name)[0]
    for candidate in (stem + ".txt", name + ".txt"):
        if not (Path(confined.given) / candidate).is_file():
            continue
        try:
            return confined.resolve(candidate).read_text(encoding="utf-8-sig"), None
        except PathOutsideRoot as error:
            return None, f"sidecar caption outside the dataset: {error}"
        except (OSError, UnicodeDecodeError) as error:
            return None, f"unreadable sidecar caption {candidate} ({type(error).__name__})"
    return None, None
