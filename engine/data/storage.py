"""Leaf helpers of every file the data wing writes: atomic writes and the dtype names (storage,
and the compute dtype of each ``run.precision``).

A leaf (it imports nothing of the engine), so the shard format, the null condition, precompute and
the prompt folders can all use it without importing one another.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["COMPUTE_DTYPES", "STORAGE_DTYPES", "write_atomic"]

#: Tensor storage names (``--dtype``, ``--compute-dtype``, an index's ``text.dtype``).
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
#: ``run.precision`` -> the dtype the denoiser computes in (and frozen models run in).
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def write_atomic(path: Path, payload: bytes) -> None:
    """Writes ``payload`` to a temporary file beside ``path`` and renames it into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
