"""K-step sampling without gradients, to pixels and PNG grids: the trainer's sample grids,
``e2ed2 sample`` and ``e2ed2 evaluate`` all draw through :func:`generate_pixels`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config.trajectory import TrajectoryConfig
from .network import Conditioning
from .sampler import SamplerSchedule
from .trajectory import Trajectory

__all__ = ["generate_pixels", "save_grid"]


@torch.no_grad()
def generate_pixels(
    networks: nn.Module,
    schedule: SamplerSchedule,
    decode,
    cond: Conditioning,
    latent_shape: Sequence[int],
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pixels in [-1, 1], (B, C, H, W): K sampler steps from pure noise, then ``decode``."""
    batch = cond.encoder_hidden_states.shape[0]
    # No graph: plain autograd ("none") costs nothing here and checkpointing would only add work.
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=schedule.num_steps, checkpoint="none"), schedule
    )
    plan = trajectory.plan()
    g = torch.Generator(device=device).manual_seed(seed)
    start, noises = trajectory.draw_noise(
        plan, (batch, *latent_shape), generator=g, device=device, dtype=dtype
    )
    # Keeps PixArt-MS's size conditions (added_cond_kwargs) with the text.
    cond = cond.to(device, dtype)
    sample = trajectory.run(networks, cond, start, noises, plan)
    return decode(sample).float().clamp(-1, 1)


def save_grid(
    pixels: torch.Tensor, path: str | Path, nrow: int = 10, *, min_side_px: int = 64
) -> torch.Tensor:
    """Writes a PNG grid of [-1, 1] images; returns the grid (C, H, W) in [0, 1].

    Images smaller than ``min_side_px`` (the 16-px digits) are upscaled by an integer factor
    with nearest-neighbour first, so the grid shows sharp, readable pixels.
    """
    import torch.nn.functional as F
    import torchvision

    side = min(pixels.shape[-2:])
    if side < min_side_px:
        pixels = F.interpolate(pixels.float(), scale_factor=-(-min_side_px // side), mode="nearest")
    grid = torchvision.utils.make_grid((pixels + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, str(path))
    return grid
