"""``[optim]``: the denoiser's AdamW and learning-rate warmup (DeepSpeed builds both)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_fields

__all__ = ["OptimConfig"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to a fixed learning rate (the paper: fixed LR, weight decay)."""

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
