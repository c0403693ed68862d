"""The ``e2ed2`` commands (thin: each parses, calls a library, maps errors to exit codes).

Run as modules too (``python -m e2ed2.engine.cli.train``: what ``deepspeed --module`` does).
From a checkout's root, ``python -m`` puts the root first on ``sys.path``, and there this
project's top-level ``kernels/`` folder shadows the PyPI ``kernels`` package that transformers
imports when it is installed (``from kernels import CUDAProperties``: every diffusers model
import then fails). The project itself is imported through its installed mapping
(``e2ed2.kernels``), never as bare ``kernels``, so every path entry holding this project's
``kernels/`` (recognised by its content: any checkout, not only the one e2ed2 was imported from)
is taken off ``sys.path`` here, before any model library is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: How this project's ``kernels/__init__.py`` begins (its docstring): the folder is recognised by
#: its content, whichever checkout or copy it sits in.
_KERNELS_MARKER = b'"""e2ed2.kernels:'


def _is_project_kernels(entry: str) -> bool:
    """Whether ``entry`` (a sys.path entry; "" = the working folder) holds this project's
    top-level ``kernels/`` package: a checkout of e2ed2, this one or another clone."""
    init = Path(entry or ".") / "kernels" / "__init__.py"
    try:
        with open(init, "rb") as handle:
            return handle.read(len(_KERNELS_MARKER)) == _KERNELS_MARKER
    except OSError:
        return False


def _unshadow_pypi_kernels() -> None:
    """Takes every e2ed2 checkout off ``sys.path`` (and forgets a ``kernels`` module already
    imported from one). Not only the checkout this package was imported from: with e2ed2
    installed non-editable, or editable from another clone, ``python -m`` run from a checkout's
    root puts that root first, and its ``kernels/`` would shadow the PyPI package."""
    shadowed = sys.modules.get("kernels")
    origin = getattr(shadowed, "__file__", None) if shadowed is not None else None
    if origin and _is_project_kernels(str(Path(origin).parent.parent)):
        del sys.modules["kernels"]  # imported from a checkout by mistake: forget it
    sys.path[:] = [entry for entry in sys.path if not _is_project_kernels(entry)]


_unshadow_pypi_kernels()
