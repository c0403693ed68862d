"""Leaf helpers of every file the data wing writes: atomic writes and the storage dtype names.

A leaf (it imports nothing of the engine), so the shard format, the null condition, precompute and
the prompt folders can all use it without importing one another.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["STORAGE_DTYPES", "write_atomic"]

#: Tensor storage names (``--dtype``, ``--compute-dtype``, an index's ``text.dtype``).
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def write_atomic(path: Path, payload: bytes) -> None:
    """Writes ``payload`` to a temporary file beside ``path`` and renames it into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
