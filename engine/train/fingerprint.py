"""What a checkpoint must agree with to be resumed: the parts of the config that change what
its weights and optimizer state mean."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import TrainConfig

__all__ = [
    "CheckpointMismatchError",
    "check_fingerprint",
    "fingerprint_differences",
    "run_fingerprint",
]


class CheckpointMismatchError(ValueError):
    """The checkpoint to resume was written with a config this run cannot continue."""


def run_fingerprint(config: TrainConfig, zero_stage: int) -> dict[str, Any]:
    """The config parts a checkpoint must agree with to be resumed (saved in every checkpoint):
    everything that changes what its weights or optimizer state mean.

    The model (architecture, freezing, and any adapter layout it gains), the sampler and K
    (what the network was trained to do at each step), the objective (what it was trained
    towards; local paths and the memory-only checkpoint switches excluded, they change nothing
    learned), the data source and its bucketing (the saved data position), the discriminator's
    shape and loss, EMA, the precision (mixed precision keeps fp32 master weights and a loss
    scale in the optimizer state) and the ZeRO stage (the optimizer state is partitioned per
    stage).
    """
    objective = {
        key: value
        for key, value in dataclasses.asdict(config.objective).items()
        if not key.endswith(("_path", "_checkpoint"))
    }
    return {
        "model": dataclasses.asdict(config.model),
        "sampler": dataclasses.asdict(config.sampler),
        "trajectory.num_steps": config.trajectory.num_steps,
        "objective": objective,
        "data.source": config.data.source,
        # Bucketed or not: the sampler's saved position means a different batch order.
        "data.buckets": config.data.buckets,
        "gan.enabled": config.gan.enabled,
        "gan.base_channels": config.gan.base_channels,
        "gan.loss": config.gan.loss,
        "ema.enabled": config.ema.enabled,
        "run.precision": config.run.precision,
        "zero_optimization.stage": zero_stage,
    }


def fingerprint_differences(ours: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """``"key: checkpoint X, config Y"`` for every key where ``saved`` differs from ``ours``.

    A key the checkpoint lacks is a config field added after it was written; it is accepted
    while this config leaves it at its default (new fields default to the old behaviour).
    """
    # Through JSON: tuples in the config are lists in the saved state.
    mine = _flat("", json.loads(json.dumps(ours)))
    theirs = _flat("", saved)
    defaults = _flat("", json.loads(json.dumps(run_fingerprint(TrainConfig(), 0))))
    return [
        f"{key[1:]}: checkpoint {theirs.get(key, '(absent)')!r}, config {mine[key]!r}"
        for key in mine
        if theirs.get(key, "(absent)") != mine[key]
        and not (key not in theirs and key in defaults and defaults[key] == mine[key])
    ]


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {
            k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}", sub).items()
        }
    return {prefix: value}


def check_fingerprint(path: Path, ours: dict[str, Any], saved: dict[str, Any]) -> None:
    """Raises :class:`CheckpointMismatchError` naming every key where ``saved`` differs."""
    differ = fingerprint_differences(ours, saved)
    if differ:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written with a different config: {'; '.join(differ)} "
            "(start a new run.output_dir, or set run.overwrite=true to move this run aside)"
        )
