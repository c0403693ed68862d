"""Precompute's inputs, one module per way users keep image-caption data (base.py: the one
interface every reader implements).

* ``captions``: e2ed2's image folder, ``captions.jsonl`` or sidecar ``.txt`` captions;
* ``imagefolder``: diffusers' imagefolder, ``metadata.jsonl`` / ``metadata.csv``;
* ``hf``: a local Hugging Face ``datasets`` folder (``save_to_disk``) or parquet / arrow files;
* ``webdataset``: ``.tar`` shards, read as a stream.

``auto`` (:func:`detect_source`) picks by what the root holds, in this order: a ``datasets``
folder or parquet / arrow files, ``.tar`` shards, ``captions.jsonl``, a metadata file, else
images with sidecars.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .base import Reader, Record, Sample, Skipped
from .captions import CAPTIONS_FILE, CaptionsReader
from .hf_datasets import DATA_FILE_SUFFIXES, SAVED_DATASET_FILES, HFDatasetReader
from .imagefolder import METADATA_FILES, ImageFolderReader
from .tars import WebDatasetReader

__all__ = [
    "SOURCES",
    "Reader",
    "Record",
    "Sample",
    "Skipped",
    "detect_source",
    "open_reader",
]

#: ``e2ed2 precompute --source`` choices.
SOURCES = ("auto", "captions", "imagefolder", "hf", "webdataset")


def detect_source(root: str | os.PathLike) -> str:
    """The reader for what ``root`` holds (module docstring's order)."""
    folder = Path(root)
    if any((folder / name).is_file() for name in SAVED_DATASET_FILES):
        return "hf"
    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    if suffixes & set(DATA_FILE_SUFFIXES):
        return "hf"
    if ".tar" in suffixes:
        return "webdataset"
    if (folder / CAPTIONS_FILE).is_file():
        return "captions"
    if any(p.name in METADATA_FILES for p in folder.rglob("metadata.*")):
        return "imagefolder"
    return "captions"


def open_reader(
    source: str,
    root: str | os.PathLike,
    *,
    caption_column: str | None = None,
    image_column: str | None = None,
) -> Reader:
    """The reader ``source`` (one of :data:`SOURCES`) of the dataset at ``root``. The column
    names apply to the imagefolder, hf and webdataset readers; captions takes none."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {list(SOURCES)}")
    if source == "auto":
        source = detect_source(root)
    if source == "captions":
        if caption_column is not None or image_column is not None:
            raise ValueError(
                "--caption-column / --image-column name columns of a metadata file, a dataset "
                f"or tar members; the captions source ({CAPTIONS_FILE} / sidecars) has none"
            )
        return CaptionsReader(root)
    readers: dict[str, Callable[..., Reader]] = {
        "imagefolder": ImageFolderReader,
        "hf": HFDatasetReader,
        "webdataset": WebDatasetReader,
    }
    return readers[source](root, caption_column=caption_column, image_column=image_column)
