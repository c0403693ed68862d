"""``[gan]``: the optional adversarial term of the paper's eq. 8 (see objectives/gan.py)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from .base import check_fields, check_int
from .schedule import ScheduleKind, WeightSchedule

__all__ = [
    "DISCRIMINATORS",
    "FEATURE_HEADS",
    "GAN_LOSSES",
    "DiscriminatorKind",
    "FeatureHead",
    "GanConfig",
    "GanLoss",
]

GanLoss = Literal["bce", "hinge"]
GAN_LOSSES: tuple[str, ...] = typing.get_args(GanLoss)
DiscriminatorKind = Literal["conv4", "denoiser_features"]
DISCRIMINATORS: tuple[str, ...] = typing.get_args(DiscriminatorKind)
FeatureHead = Literal["conv", "token"]
FEATURE_HEADS: tuple[str, ...] = typing.get_args(FeatureHead)


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
    discriminator: DiscriminatorKind = "conv4"
    """``conv4``: the paper's 4-conv pixel discriminator (App. C.2). ``denoiser_features``: small
    trainable heads on the features of the frozen base denoiser at ``feature_blocks``, reading
    real and generated samples re-noised to a random timestep in [feature_t_min,
    feature_t_max], conditioned on that timestep and the prompt (LADD, Sauer et al. 2024;
    objectives/feature_discriminator.py). Needs a pixel-space model (no model.vae_path: the
    denoiser reads the samples themselves) and objective.pixel_rows_per_pass = 0.
    """
    feature_blocks: tuple[int, ...] = (1, 3)
    """denoiser_features: the 0-based indices of the transformer blocks whose outputs the heads
    read (one head per block; the logits of all heads are averaged)."""
    feature_t_min: int = 0
    """denoiser_features: the smallest timestep the samples are re-noised to."""
    feature_t_max: int = 250
    """denoiser_features: the largest timestep the samples are re-noised to (inclusive). 250: on
    the digits base, one batch of real vs the base's samples, the conv heads (block 3, 80 updates)
    reach BCE 0.68 with t in [0, 250] and 0.94 with [0, 500] (objectives/feature_discriminator.py).
    """
    head_channels: int = 64
    """denoiser_features: hidden width of each head."""
    feature_head: FeatureHead = "conv"
    """denoiser_features: ``conv`` reads a block's tokens jointly on their patch grid (two 3x3
    stride-2 convs, one logit per cell of the last map); ``token`` scores each token alone (one
    logit per token; it did not separate real digits from the base's samples, issue 25)."""
    weight_schedule: ScheduleKind = "constant"
    """The factor on ``weight`` by optimizer step: ``constant`` (1), or ``linear_warmup`` (0 for
    weight_start_step steps, then a linear ramp to 1 over weight_warmup_steps; config/schedule.py).
    The discriminator trains from the first step either way."""
    weight_start_step: int = 0
    """linear_warmup: optimizer steps with the generator's adversarial weight at 0."""
    weight_warmup_steps: int = 0
    """linear_warmup: optimizer steps of the linear ramp after weight_start_step."""

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
        check_int("gan.head_channels", self.head_channels, minimum=1)
        if not self.feature_blocks or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.feature_blocks
        ):
            raise ValueError(
                "gan.feature_blocks must be a non-empty list of block indices >= 0, got "
                f"{list(self.feature_blocks)}"
            )
        check_int("gan.feature_t_min", self.feature_t_min, minimum=0)
        check_int("gan.feature_t_max", self.feature_t_max, minimum=self.feature_t_min)
        _ = self.weight_factors  # validates the schedule keys (the message names them)

    @property
    def weight_factors(self) -> WeightSchedule:
        """The schedule of ``weight`` (its factor at each optimizer step)."""
        return WeightSchedule(
            self.weight_schedule, self.weight_start_step, self.weight_warmup_steps, "gan.weight"
        )

    def weight_at(self, step: int) -> float:
        """The generator's adversarial weight at 0-based optimizer step ``step``."""
        return self.weight * self.weight_factors.factor(step)
