"""A local Hugging Face dataset (the ``datasets`` library): a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``,
memory-mapped), or ``.parquet`` / ``.arrow`` files under the root (read as a stream, nothing
copied into a cache).

Columns: ``--image-column`` (default ``image``): an ``Image`` feature (its bytes, or its path
relative to the root when it holds no bytes), raw bytes, or a path string; ``--caption-column``
(default ``text``): a string (or a list of strings: the first). A ``DatasetDict`` is read from
its ``train`` split, or from its only split. Rows are read in order and listed as ``row <n>``.

Every file the dataset reads must resolve inside the root: ``state.json``'s data files are
checked before ``load_from_disk`` opens them, data files linked from outside are skipped and
listed, and an image path pointing outside skips its row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet

from ..paths import ConfinedRoot, PathOutsideRoot
from .base import Record, Sample, Skipped, caption_text

__all__ = ["DATA_FILE_SUFFIXES", "SAVED_DATASET_FILES", "HFDatasetReader"]

#: Files that mark a ``save_to_disk`` folder.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
#: Data files read directly (``datasets``' packaged parquet / arrow builders).
DATA_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


class HFDatasetReader:
    """A local ``datasets`` dataset under ``root`` (module docstring)."""

    kind = "hf"

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        caption_column: str | None = None,
        image_column: str | None = None,
    ) -> None:
        self.confined = ConfinedRoot(root, "image_dir")
        self.caption_column = caption_column or "text"
        self.image_column = image_column or "image"
        self.total: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"captions": f"datasets columns {self.image_column} + {self.caption_column}"}

    def __iter__(self) -> Iterator[Record]:
        # lazy: datasets adds ~1.3 s; only Hugging Face dataset inputs need it
        import datasets

        root = Path(self.confined.given)
        skipped: list[Skipped] = []
        if any((root / name).is_file() for name in SAVED_DATASET_FILES):
            self._check_saved_files(root)
            dataset = _one_split(datasets.load_from_disk(os.fspath(self.confined.real)), root)
            self.total = len(dataset)
        else:
            files = self._data_files(root, skipped)
            yield from skipped
            if not files:
                raise FileNotFoundError(
                    f"image_dir {self.confined.given!r} holds no datasets folder "
                    f"({' / '.join(SAVED_DATASET_FILES)}) and no usable "
                    f"{' / '.join(DATA_FILE_SUFFIXES)} files"
                )
            builders = {DATA_FILE_SUFFIXES[Path(f).suffix] for f in files}
            if len(builders) > 1:
                raise ValueError(
                    f"image_dir {self.confined.given!r} mixes parquet and arrow files; keep one"
                )
            builder = builders.pop()
            dataset = datasets.load_dataset(
                builder, data_files=files, split="train", streaming=True
            )
            if builder == "parquet":  # row counts are in the files' footers
                self.total = sum(pyarrow.parquet.ParquetFile(f).metadata.num_rows for f in files)
        features = dataset.features or {}
        for column in (self.image_column, self.caption_column):
            if column not in features:
                flag = "--image-column" if column == self.image_column else "--caption-column"
                raise ValueError(
                    f"image_dir {self.confined.given!r}: the dataset has no column {column!r} "
                    f"({flag}); its columns: {sorted(features)}"
                )
        if isinstance(features[self.image_column], datasets.Image):
            # Bytes and path, not a decoded image: the path must be checked before it is read.
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        for number, row in enumerate(dataset):
            yield self._sample(f"row {number}", row)

    def _sample(self, name: str, row: dict[str, Any]) -> Record:
        value = row.get(self.image_column)
        if isinstance(value, dict):  # an Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            try:
                value = self.confined.resolve(value)
            except PathOutsideRoot as error:
                return Skipped(name, f"image path outside the dataset: {error}")
        if not isinstance(value, bytes | Path):
            return Skipped(name, f"no image in column {self.image_column!r}")
        caption = caption_text(row.get(self.caption_column))
        if caption is None:
            return Skipped(name, f"no caption (column {self.caption_column!r} missing or empty)")
        return Sample(name, value, caption)

    def _check_saved_files(self, root: Path) -> None:
        """Every data file a ``save_to_disk`` folder's ``state.json`` names lies inside."""
        for state in sorted(root.rglob("state.json")):
            relative = self.confined.relative(state)
            try:
                with open(self.confined.resolve(relative)) as f:
                    names = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                if isinstance(error, PathOutsideRoot):
                    raise
                raise ValueError(f"{state}: not a datasets state file ({error})") from None
            for name in names:
                self.confined.resolve(Path(relative).parent / name)

    def _data_files(self, root: Path, skipped: list[Skipped]) -> list[str]:
        """The parquet / arrow files under the root (sorted, resolved); files leading outside
        are appended to ``skipped``."""
        files = []
        for path in sorted(p for p in root.rglob("*") if p.suffix in DATA_FILE_SUFFIXES):
            relative = self.confined.relative(path)
            try:
                files.append(os.fspath(self.confined.resolve(relative)))
            except PathOutsideRoot as error:
                skipped.append(Skipped(relative, f"path outside the dataset: {error}", False))
        return files


def _one_split(dataset: Any, root: Path) -> Any:
    """A Dataset as is; a DatasetDict's ``train`` split, or its only one."""
    # lazy: datasets adds ~1.3 s; only Hugging Face dataset inputs need it
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return dataset
    splits = list(dataset.keys())
    if "train" in splits:
        return dataset["train"]
    if len(splits) == 1:
        return dataset[splits[0]]
    raise ValueError(f"{root}: a DatasetDict with splits {splits} and no 'train'; save one split")
