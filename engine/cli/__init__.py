"""The ``e2ed2`` commands (thin: each parses, calls a library, maps errors to exit codes).

Run as modules too (``python -m e2ed2.engine.cli.train``: what ``deepspeed --module`` does).
From a checkout's root, ``python -m`` puts the root first on ``sys.path``, and there this
project's top-level ``kernels/`` folder shadows the PyPI ``kernels`` package that transformers
imports when it is installed (``from kernels import CUDAProperties``: every diffusers model
import then fails). The project itself is imported through its installed mapping
(``e2ed2.kernels``), never as bare ``kernels``, so the root is taken off ``sys.path`` here,
before any model library is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _unshadow_pypi_kernels() -> None:
    root = Path(__file__).resolve().parents[2]  # engine/cli/__init__.py -> the checkout
    if not ((root / "kernels" / "__init__.py").is_file() and (root / "engine").is_dir()):
        return  # an installed (non-editable) copy: no top-level kernels/ folder to shadow
    shadowed = sys.modules.get("kernels")
    if shadowed is not None and Path(getattr(shadowed, "__file__", "") or "").parent.parent == root:
        del sys.modules["kernels"]  # imported from the checkout by mistake: forget it
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]


_unshadow_pypi_kernels()
