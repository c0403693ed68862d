"""K-step sampling without gradients, to pixels and PNG grids: the trainer's sample and
validation grids, ``e2ed2 sample`` and ``e2ed2 evaluate`` all draw through
:func:`generate_pixels`; :func:`save_captioned_grid` writes each image with its prompt under it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..config.trajectory import TrajectoryConfig
from .network import Conditioning
from .sampler import SamplerSchedule
from .trajectory import Trajectory

__all__ = ["generate_pixels", "save_captioned_grid", "save_grid"]


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
    solver: Callable[[Conditioning, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pixels in [-1, 1], (B, C, H, W): K sampler steps from pure noise, then ``decode``.

    ``solver(cond, start)``: a deterministic sampler run from the same start noise in place of
    ``schedule``'s steps (the DPM-Solver teacher: objectives/teacher.py); ``schedule`` then only
    draws the start, so a deterministic ``schedule`` and a solver see identical noise.
    """
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
    if solver is not None:
        sample = solver(cond, start)
    else:
        sample = trajectory.run(networks, cond, start, noises, plan)
    return decode(sample).float().clamp(-1, 1)


def save_grid(
    pixels: torch.Tensor, path: str | Path, nrow: int = 10, *, min_side_px: int = 64
) -> torch.Tensor:
    """Writes a PNG grid of [-1, 1] images; returns the grid (C, H, W) in [0, 1].

    Images smaller than ``min_side_px`` (the 16-px digits) are upscaled by an integer factor
    with nearest-neighbour first, so the grid shows sharp, readable pixels.
    """
    # lazy: torchvision adds ~2 s over torch; only image grids need it
    import torchvision

    side = min(pixels.shape[-2:])
    if side < min_side_px:
        pixels = F.interpolate(pixels.float(), scale_factor=-(-min_side_px // side), mode="nearest")
    grid = torchvision.utils.make_grid((pixels + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, str(path))
    return grid


def save_captioned_grid(
    pixels: torch.Tensor,
    captions: Sequence[str],
    path: str | Path,
    *,
    ncol: int = 4,
    min_side_px: int = 192,
    font_px: int = 14,
    caption_lines: int = 3,
) -> np.ndarray:
    """Writes a PNG grid of [-1, 1] images with each caption drawn under its image; returns the
    grid as an (H, W, 3) uint8 array (what the trackers log).

    Each cell is the image, upscaled by an integer factor (nearest-neighbour) to at least
    ``min_side_px`` on its short side so the caption has room at a readable size, above a white
    band of ``caption_lines`` lines of ``font_px`` text (the caption word-wrapped to the cell's
    width, an ellipsis where it is cut). PIL draws the text; its default font is scalable
    (FreeType) since Pillow 10.1.
    """
    if len(captions) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    side = min(pixels.shape[-2:])
    if side < min_side_px:
        pixels = F.interpolate(pixels.float(), scale_factor=-(-min_side_px // side), mode="nearest")
    images = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if images.shape[1] == 1:  # grey (the digits)
        images = images.expand(-1, 3, -1, -1)
    height, width = images.shape[-2:]
    font = ImageFont.load_default(size=font_px)
    line_px = font_px + 4
    band = caption_lines * line_px + 6
    pad = 4
    ncol = max(1, min(ncol, len(images)))
    nrow = -(-len(images) // ncol)
    grid = Image.new(
        "RGB", (ncol * (width + pad) + pad, nrow * (height + band + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(grid)
    for number, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x = pad + (number % ncol) * (width + pad)
        y = pad + (number // ncol) * (height + band + pad)
        grid.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (x, y))
        for line_number, line in enumerate(_wrap(caption, font, width - 4, caption_lines)):
            draw.text(
                (x + 2, y + height + 3 + line_number * line_px), line, fill="black", font=font
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return np.asarray(grid)


def _wrap(text: str, font, width_px: int, max_lines: int) -> list[str]:
    """Word-wraps ``text`` to ``width_px`` (a word wider than a line is cut), at most
    ``max_lines`` lines, the last one ending in an ellipsis where text is left out."""
    lines: list[str] = []
    words = text.split()
    current = ""
    while words:
        candidate = f"{current} {words[0]}".strip()
        if font.getlength(candidate) <= width_px:
            current = candidate
            words.pop(0)
            continue
        if not current:  # one word wider than the cell: cut it
            cut = len(words[0])
            while cut > 1 and font.getlength(words[0][:cut]) > width_px:
                cut -= 1
            current, words[0] = words[0][:cut], words[0][cut:]
        lines.append(current)
        current = ""
        if len(lines) == max_lines:
            break
    if current and len(lines) < max_lines:
        lines.append(current)
    elif words and lines:  # text left out: end the last line in an ellipsis
        last = lines[-1]
        while last and font.getlength(last + "...") > width_px:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines
