"""``RunConfig``: what one training run does (length, batch, precision, outputs, cadence)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/e2ed2"
    max_steps: int = 400  # optimizer steps
    batch_per_rank: int = 8  # micro-batch per rank (the paper: 8 per GPU)
    grad_accum_steps: int = 1
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # A shipped DeepSpeed config by name (ds_configs/<name>.json) or a path to a JSON file.
    deepspeed_config: str = "zero2"
    log_every_steps: int = 10
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 2
    sample_every_steps: int = 200
    num_sample_images: int = 20
    # Resume from the newest complete checkpoint in output_dir, if there is one.
    resume: bool = True
    # Write the EMA (or, with ema disabled, the trained) weights as a diffusers folder at the end.
    export_at_end: bool = True
    # Optimizer steps in a row whose loss or gradient is NaN/Inf (each one skipped) after which
    # the run writes a checkpoint and stops. fp16's dynamic loss scale also skips steps while
    # it calibrates (one per halving of its initial scale, 2**16 by default), which count too.
    max_consecutive_nonfinite_steps: int = 25

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "batch_per_rank",
            "grad_accum_steps",
            "log_every_steps",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "sample_every_steps",
            "max_consecutive_nonfinite_steps",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_sample_images < 0:
            raise ValueError(f"run.num_sample_images must be >= 0, got {self.num_sample_images}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(
                f"run.precision={self.precision!r} is not one of ['fp32', 'bf16', 'fp16']"
            )
        if not self.output_dir:
            raise ValueError("run.output_dir must not be empty")
