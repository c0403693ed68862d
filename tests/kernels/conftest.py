"""Kernel tests run the Triton backend on the GPU when there is one, else on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before triton is imported).
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the Triton backend runs: the GPU if there is one, else CPU under the interpreter."""
    return DEVICE
