"""``[gan]``: the optional adversarial term of the paper's eq. 8 (see objectives/gan.py)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from .base import check_fields

__all__ = ["GAN_LOSSES", "GanConfig", "GanLoss"]

GanLoss = Literal["bce", "hinge"]
GAN_LOSSES: tuple[str, ...] = typing.get_args(GanLoss)


@dataclass(frozen=True)
class GanConfig:
    """The optional adversarial term. Paper values: ``weight`` 0.01, 5 discriminator steps.

    ``loss``: ``bce`` = the non-saturating GAN loss (softplus form), ``hinge`` = the hinge loss.
    ``lr`` / ``beta1`` / ``beta2`` / ``weight_decay``: the discriminator's own AdamW (the paper
    gives none; these are the DCGAN / pix2pix values). ``base_channels``: width of the first
    conv layer (doubling after each halving).
    """

    enabled: bool = False
    """Add the adversarial term of eq. 8 (its own discriminator and optimizer)."""
    weight: float = 0.01
    """Weight of the generator's adversarial loss in the total (the paper: 0.01)."""
    disc_steps_per_gen_step: int = 5
    """Discriminator updates per generator update (the paper: 5)."""
    base_channels: int = 64
    """Width of the discriminator's first conv layer (doubling after each halving)."""
    loss: GanLoss = "bce"
    """``bce``: the non-saturating GAN loss; ``hinge``: the hinge loss."""
    lr: float = 2e-4
    """The discriminator's AdamW learning rate."""
    beta1: float = 0.5
    """The discriminator's AdamW beta1."""
    beta2: float = 0.999
    """The discriminator's AdamW beta2."""
    weight_decay: float = 0.0
    """The discriminator's AdamW weight decay."""

    def __post_init__(self) -> None:
        check_fields("gan", self)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"gan.weight must be a finite number >= 0, got {self.weight}")
        if self.disc_steps_per_gen_step < 1:
            raise ValueError(
                f"gan.disc_steps_per_gen_step must be >= 1, got {self.disc_steps_per_gen_step}"
            )
        if self.base_channels < 1:
            raise ValueError(f"gan.base_channels must be >= 1, got {self.base_channels}")
        if not self.lr > 0:
            raise ValueError(f"gan.lr must be > 0, got {self.lr}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"gan.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay < 0:
            raise ValueError(f"gan.weight_decay must be >= 0, got {self.weight_decay}")

    def optimizer_kwargs(self) -> dict[str, object]:
        """Arguments of the discriminator's AdamW (``torch.optim.AdamW`` or a DeepSpeed config)."""
        return {"lr": self.lr, "betas": (self.beta1, self.beta2), "weight_decay": self.weight_decay}
