"""``[optim]``: the denoiser's AdamW and learning-rate warmup (DeepSpeed builds both)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from .base import check_fields

__all__ = ["LR_SCHEDULES", "LrSchedule", "OptimConfig"]

LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrSchedule)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to ``lr``, then that fixed learning rate (the paper: fixed LR,
    weight decay) or a cosine decay to ``min_lr_ratio`` x ``lr`` at the run's last step."""

    lr: float = 2e-4
    """Learning rate after warmup (fixed)."""
    weight_decay: float = 0.03
    """AdamW's decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr (0 = none)."""
    grad_clip: float = 1.0
    """max global grad norm; 0 = off"""
    lr_schedule: LrSchedule = "constant"
    """After the warmup: ``constant`` (lr to the end), or ``cosine``: a half cosine from lr down
    to min_lr_ratio x lr at step run.max_steps (DeepSpeed's WarmupCosineLR)."""
    min_lr_ratio: float = 0.0
    """cosine: the learning rate at the run's last step, as a fraction of lr."""

    def __post_init__(self) -> None:
        check_fields("optim", self)
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        for key in ("weight_decay", "eps", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"optim.lr_schedule={self.lr_schedule!r} is not one of {list(LR_SCHEDULES)}"
            )
        if not (math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_schedule == "constant" and self.min_lr_ratio != 0:
            raise ValueError(
                "optim.min_lr_ratio applies to lr_schedule='cosine'; with 'constant' leave it 0, "
                f"got {self.min_lr_ratio}"
            )
