"""The adversarial term of eq. 8 and its discriminator (paper App. C.2).

App. C.2: a discriminator of four convolutional layers, the first three halving the resolution;
real images are its positives and generated images its negatives; the adversarial loss enters
the generator's objective with weight 0.01 (eq. 8: ``L = L_rec + lambda * L_adv``); the
randomly initialised discriminator is updated five times per generator update.

The discriminator has its own optimizer and never receives the generator's gradients:
:func:`discriminator_loss` detaches the generated images, and :func:`generator_adversarial_loss`
runs the discriminator under :func:`frozen`, so gradients flow through it to the generated pixels
only. One generator step, with ``fake_px`` from ``E2ED2Loss.decode_sample`` (in the graph) and
``real_px`` from ``decode_target`` (or real images)::

    train_discriminator(disc, disc_opt, real_px, fake_px, gan)      # 5 updates, fake detached
    adv = generator_adversarial_loss(disc, fake_px, gan.loss)
    terms = with_adversarial_term(terms, adv, gan)                  # eq. 8
    terms["total"].backward()                                       # generator only

``gan.discriminator = "denoiser_features"`` swaps the discriminator for trainable heads on the
frozen base denoiser's features (LADD; objectives/feature_discriminator.py). It scores samples
with their prompts, so every function here takes the batch's ``cond`` (the 4-conv discriminator
ignores it) and :func:`discriminator_pieces` passes each pass its rows of it.

Keep that order: the adversarial forward saves the discriminator's weights for its backward, so
updating the discriminator between ``generator_adversarial_loss`` and ``backward`` fails autograd's
in-place check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config.gan import GAN_LOSSES, GanConfig, GanLoss
from ..config.sampler import SamplerConfig
from ..core.network import Conditioning
from ..core.step_cuts import row_slices
from .feature_discriminator import FeatureDiscriminator

__all__ = [
    "Discriminator",
    "GanConfig",
    "build_discriminator",
    "build_discriminator_optimizer",
    "discriminator_loss",
    "discriminator_pieces",
    "frozen",
    "generator_adversarial_loss",
    "train_discriminator",
    "with_adversarial_term",
]

MIN_SIZE_PX = 8  # three halvings leave a 1x1 logit map


class Discriminator(nn.Module):
    """App. C.2's patch discriminator: four convs, the first three stride 2, LeakyReLU between.

    (B, in_channels, H, W) images in [-1, 1], H and W >= 8 -> (B, 1, ~H/8, ~W/8) real-vs-fake
    logits (exactly H/8 x W/8 for multiples of 8). Kernels: 4x4 with padding 1 for the halving
    layers (as PatchGAN), 3x3 with padding 1 for the logit layer (keeps the map's size). Widths:
    ``base_channels`` x (1, 2, 4), then 1. No normalization layers, so real and fake batches can
    be scored in separate calls.
    """

    def __init__(
        self, in_channels: int, base_channels: int = 64, negative_slope: float = 0.2
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"discriminator in_channels must be 1 or 3, got {in_channels}")
        c = base_channels
        self.in_channels = in_channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, c, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(c, 2 * c, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(2 * c, 4 * c, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(4 * c, 1, kernel_size=3, stride=1, padding=1),
        )

    def forward(self, images: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """``cond``: accepted for the shared call signature and ignored (unconditional)."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"discriminator expects (B, {self.in_channels}, H, W) images, got "
                f"{tuple(images.shape)}"
            )
        if min(images.shape[-2:]) < MIN_SIZE_PX:
            raise ValueError(
                f"discriminator needs images of at least {MIN_SIZE_PX}x{MIN_SIZE_PX} pixels, got "
                f"{images.shape[-2]}x{images.shape[-1]}"
            )
        return self.layers(images)


def build_discriminator(
    config: GanConfig,
    in_channels: int,
    *,
    base: nn.Module | None = None,
    text_dim: int | None = None,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
) -> nn.Module:
    """``gan.discriminator``: the 4-conv :class:`Discriminator`, or the heads on the frozen
    ``base`` denoiser (``denoiser_features``: needs ``base``, ``text_dim`` and ``sampler``;
    ``seed`` seeds its re-noising)."""
    if config.discriminator == "conv4":
        return Discriminator(in_channels, base_channels=config.base_channels)
    if base is None or text_dim is None or sampler is None:
        raise ValueError(
            "gan.discriminator='denoiser_features' needs the frozen base denoiser, the text "
            "width and the sampler config"
        )
    return FeatureDiscriminator(config, base, text_dim=text_dim, sampler=sampler, seed=seed)


def _logits(disc: nn.Module, images: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
    return (disc(images) if cond is None else disc(images, cond)).float()


def build_discriminator_optimizer(config: GanConfig, disc: nn.Module) -> torch.optim.AdamW:
    """The discriminator's AdamW with the [gan] section's lr, betas and weight decay."""
    return torch.optim.AdamW(
        disc.parameters(),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        weight_decay=config.weight_decay,
    )


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily sets ``requires_grad=False`` on the module's trainable parameters.

    A forward run inside records no gradient edges to those parameters, so a later backward
    (even after the flags are restored on exit) leaves their ``.grad`` untouched, while gradients
    still flow through the module to its inputs.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def discriminator_loss(
    disc: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    loss: GanLoss = "bce",
    *,
    cond: Conditioning | None = None,
) -> torch.Tensor:
    """The discriminator's loss (App. C.2): real images positive, generated negative.

    ``bce``: ``softplus(-D(real)) + softplus(D(fake))`` (= BCE with labels 1 / 0);
    ``hinge``: ``relu(1 - D(real)) + relu(1 + D(fake))``; each a mean over the logit map and
    batch. Both inputs are detached: no gradient reaches the generator. ``cond``: the prompts
    of the rows (real row i and generated row i share prompt i), for a conditional discriminator.
    """
    if loss not in GAN_LOSSES:
        raise ValueError(f"gan.loss={loss!r} is not one of {list(GAN_LOSSES)}")
    real_logits = _logits(disc, real.detach(), cond)
    fake_logits = _logits(disc, fake.detach(), cond)
    if loss == "bce":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def discriminator_pieces(
    disc: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    loss: GanLoss = "bce",
    *,
    rows_per_pass: int = 0,
    cond: Conditioning | None = None,
) -> Iterator[torch.Tensor]:
    """:func:`discriminator_loss` of the whole batch as passes of at most ``rows_per_pass``
    rows (0: one pass), each weighted by its share of the rows: both halves of the loss are
    means over rows of equal-size logit maps, so the pieces' sum is the batch's loss and their
    gradients sum to its gradient. Backpropagate each piece before asking for the next: one
    pass's discriminator activations are alive at a time."""
    rows = real.shape[0]
    for where in row_slices(rows, rows_per_pass):
        share = (where.stop - where.start) / rows
        prompts = None if cond is None else cond.select(where)
        yield share * discriminator_loss(disc, real[where], fake[where], loss, cond=prompts)


def generator_adversarial_loss(
    disc: nn.Module,
    fake: torch.Tensor,
    loss: GanLoss = "bce",
    *,
    cond: Conditioning | None = None,
) -> torch.Tensor:
    """L_adv of eq. 8 for the generator: ``bce`` = ``softplus(-D(fake))`` (non-saturating),
    ``hinge`` = ``-D(fake)``; a mean. The discriminator runs :func:`frozen`: its parameters get
    no gradient, ``fake`` (generated pixels with their graph) does.
    """
    if loss not in GAN_LOSSES:
        raise ValueError(f"gan.loss={loss!r} is not one of {list(GAN_LOSSES)}")
    with frozen(disc):
        logits = _logits(disc, fake, cond)
    if loss == "bce":
        return F.softplus(-logits).mean()
    return -logits.mean()


def with_adversarial_term(
    terms: Mapping[str, torch.Tensor], adversarial: torch.Tensor, config: GanConfig
) -> dict[str, torch.Tensor]:
    """Eq. 8: adds ``"adversarial"`` (unweighted) and ``total += config.weight * adversarial``."""
    if "total" not in terms:
        raise ValueError(f"terms need a 'total' entry, got {sorted(terms)}")
    out = dict(terms)
    out["adversarial"] = adversarial
    out["total"] = terms["total"] + config.weight * adversarial
    return out


def train_discriminator(
    disc: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    config: GanConfig,
    *,
    rows_per_pass: int = 0,
    cond: Conditioning | None = None,
) -> list[torch.Tensor]:
    """App. C.2's asymmetric schedule: ``disc_steps_per_gen_step`` discriminator updates on one
    real / generated batch (generated detached). Returns each update's loss (detached).
    ``rows_per_pass``: each update's loss in passes of rows (:func:`discriminator_pieces`).

    For a DeepSpeed-wrapped discriminator, run the same loop with ``engine.backward`` /
    ``engine.step`` around :func:`discriminator_loss`.
    """
    fake = fake.detach()
    losses = []
    for _ in range(config.disc_steps_per_gen_step):
        optimizer.zero_grad(set_to_none=True)
        pieces = discriminator_pieces(
            disc, real, fake, config.loss, rows_per_pass=rows_per_pass, cond=cond
        )
        values = []
        for piece in pieces:
            piece.backward()
            values.append(piece.detach())
        optimizer.step()
        losses.append(torch.stack(values).sum())
    return losses
