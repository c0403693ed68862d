"""The presets and DeepSpeed JSONs that ship with the package (``configs/``, ``ds_configs/``).

Both folders install as package data (``e2ed2.configs``, ``e2ed2.ds_configs``) and are read
through :mod:`importlib.resources`, so a non-editable ``pip install .`` finds them from any
working directory.
"""

from __future__ import annotations

import os
from importlib import resources

from .base import ConfigError

__all__ = ["resolve_preset", "shipped_ds_configs", "shipped_presets"]

_PRESETS = "e2ed2.configs"
_DS_CONFIGS = "e2ed2.ds_configs"


def _shipped(package: str, suffix: str) -> dict[str, str]:
    root = resources.files(package)
    return {
        entry.name[: -len(suffix)]: str(entry)
        for entry in root.iterdir()
        if entry.name.endswith(suffix) and entry.is_file()
    }


def shipped_presets() -> dict[str, str]:
    """``{name: path}`` of the run presets shipped in ``configs/`` (``embedded``, ...)."""
    return _shipped(_PRESETS, ".toml")


def shipped_ds_configs() -> dict[str, str]:
    """``{name: path}`` of the DeepSpeed JSONs shipped in ``ds_configs/`` (``zero3``, ...)."""
    return _shipped(_DS_CONFIGS, ".json")


def resolve_preset(path: str) -> str:
    """``path`` if it is a file, else the shipped preset of that name (``pixart_alpha_512`` or
    ``configs/pixart_alpha_512.toml`` from any directory)."""
    if os.path.isfile(path):
        return path
    name = os.path.basename(path)
    name = name[: -len(".toml")] if name.endswith(".toml") else name
    presets = shipped_presets()
    if name in presets and (os.path.dirname(path) in ("", "configs") or path == name):
        return presets[name]
    raise ConfigError(
        f"config file {path!r} does not exist (shipped presets: {', '.join(sorted(presets))})"
    )
