"""What a checkpoint must agree with to be resumed: the parts of the config that change what
its weights and optimizer state mean."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import TrainConfig

__all__ = ["CheckpointMismatchError", "check_fingerprint", "run_fingerprint"]


class CheckpointMismatchError(ValueError):
    """The checkpoint to resume was written with a config this run cannot continue."""


def run_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The config parts a checkpoint must agree with to be resumed (saved in every checkpoint)."""
    return {
        "model": dataclasses.asdict(config.model),
        "trajectory.num_steps": config.trajectory.num_steps,
        "data.source": config.data.source,
        "gan.enabled": config.gan.enabled,
        "ema.enabled": config.ema.enabled,
    }


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {
            k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}", sub).items()
        }
    return {prefix: value}


def check_fingerprint(path: Path, ours: dict[str, Any], saved: dict[str, Any]) -> None:
    """Raises :class:`CheckpointMismatchError` naming every key where ``saved`` differs."""
    # Through JSON: tuples in the config are lists in the saved state.
    mine = _flat("", json.loads(json.dumps(ours)))
    theirs = _flat("", saved)
    differ = [
        f"{key[1:]}: checkpoint {theirs.get(key, '(absent)')!r}, config {mine[key]!r}"
        for key in mine
        if theirs.get(key, "(absent)") != mine[key]
    ]
    if differ:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written with a different config: {'; '.join(differ)} "
            "(start a new run.output_dir or set run.resume=false)"
        )
