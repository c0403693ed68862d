"""Files of an export folder that both the shared-network and the LoRA exports write: the run
config's name, linked frozen folders, and tolerant JSON reads of the folders it points at.

A leaf module, so that export.py and lora_export.py can both build on it without importing each
other."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_NAME", "link_folder", "read_json"]

#: The run's resolved config inside every export (`e2ed2 sample` / `evaluate` read it).
CONFIG_NAME = "e2ed2_config.toml"


def link_folder(path: Path, target: str) -> None:
    """``path`` -> ``target`` as a symlink (a copy where the filesystem has none)."""
    # Absolute: the export is renamed into place and lives in checkpoints/stepN/ too.
    try:
        os.symlink(os.path.abspath(target), path, target_is_directory=True)
    except OSError:
        shutil.copytree(target, path)


def read_json(folder: str | os.PathLike, name: str) -> dict[str, Any]:
    """``folder/name`` parsed, or {} when it is missing or not JSON (optional metadata)."""
    try:
        return json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return {}
