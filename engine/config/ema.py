"""``[ema]``: the sharded EMA of the trained weights (see train/ema.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_fields

__all__ = ["EmaConfig"]


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the trained weights (the paper: decay 0.95)."""

    enabled: bool = True
    """Keep an EMA of the trained weights; sample grids and exports use it."""
    decay: float = 0.95
    """EMA decay per optimizer step (the paper: 0.95)."""

    def __post_init__(self) -> None:
        check_fields("ema", self)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
