"""The commands' package takes *every* e2ed2 checkout off sys.path, not only its own root.

With e2ed2 installed non-editable (or editable from another clone), ``deepspeed --module
e2ed2.engine.cli.train`` run from a checkout's root puts that root first on sys.path, and its
``kernels/`` folder would shadow the PyPI ``kernels`` package transformers imports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

_PROBE = (
    "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
    "import e2ed2.engine.cli; import importlib.util as u; s = u.find_spec('kernels');"
    "print(s and s.origin); print(sys.argv[2] in sys.path)"
)


def test_another_checkouts_kernels_folder_is_taken_off_sys_path(tmp_path: Path) -> None:
    """A second clone (its kernels/__init__.py copied, nothing else) and an unrelated folder
    with a ``kernels`` package of its own: the clone goes, the other folder stays."""
    clone = tmp_path / "other-clone"
    (clone / "kernels").mkdir(parents=True)
    shutil.copy(ROOT / "kernels" / "__init__.py", clone / "kernels" / "__init__.py")
    unrelated = tmp_path / "unrelated"
    (unrelated / "kernels").mkdir(parents=True)
    (unrelated / "kernels" / "__init__.py").write_text('"""Some other kernels package."""\n')
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(unrelated), str(clone)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    origin, clone_kept = done.stdout.split()
    assert clone_kept == "False"
    # The unrelated package is still found (first on sys.path now the clone is gone).
    assert origin == str(unrelated / "kernels" / "__init__.py"), origin
