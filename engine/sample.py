"""K-step sampling to PNG grids: used by the trainer and by ``e2ed2 sample``.

Prompts come from the run's data so that no text encoder is needed at sampling time: for the
embedded digits, "a handwritten digit <word>" for each digit in turn (encoded by the dataset's
own frozen text encoder); for latent shards, the stored text embeddings of the first samples.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .data import DIGIT_WORDS, DigitsDataset, build_dataset
from .network import Conditioning
from .sampler import SamplerSchedule, build_schedule
from .trajectory import run_steps

__all__ = ["sample_conditioning", "generate_pixels", "save_grid", "main"]


def sample_conditioning(dataset, count: int) -> tuple[Conditioning, list[str]]:
    """``count`` prompts as conditioning (CPU, float32) and their captions."""
    if isinstance(dataset, DigitsDataset):
        captions = [f"a handwritten digit {DIGIT_WORDS[i % 10]}" for i in range(count)]
        states, mask = dataset.encode(captions)
    else:
        items = [dataset[i] for i in range(min(count, len(dataset)))]
        states = torch.stack([it["encoder_hidden_states"] for it in items])
        mask = torch.stack([it["encoder_attention_mask"] for it in items])
        captions = [dataset.captions[i] for i in range(len(items))]
    return Conditioning(states, mask), captions


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
    shape = (batch, *latent_shape)
    g = torch.Generator(device=device).manual_seed(seed)
    start = torch.randn(shape, generator=g, device=device, dtype=dtype)
    noises = [
        torch.randn(shape, generator=g, device=device, dtype=dtype)
        if schedule.takes_noise(i)
        else None
        for i in range(schedule.num_steps)
    ]
    cond = Conditioning(
        cond.encoder_hidden_states.to(device, dtype),
        None if cond.encoder_attention_mask is None else cond.encoder_attention_mask.to(device),
    )
    sample = run_steps(networks, schedule, cond, start, noises=noises, checkpoint_policy="none")
    return decode(sample).float().clamp(-1, 1)


def save_grid(pixels: torch.Tensor, path: str | Path, nrow: int = 10) -> torch.Tensor:
    """Writes a PNG grid of [-1, 1] images; returns the grid (C, H, W) in [0, 1]."""
    import torchvision

    grid = torchvision.utils.make_grid((pixels + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, str(path))
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 sample EXPORT_OR_RUN_DIR``: a PNG grid from an export or a run's output folder."""
    from .config import ConfigError, load_config
    from .export import CONFIG_NAME, load_exported_networks
    from .models import build_autoencoder

    parser = argparse.ArgumentParser(prog="e2ed2 sample", description=main.__doc__)
    parser.add_argument(
        "path",
        help="an export folder (e2ed2_config.toml + transformer/), a run output_dir (uses its "
        "export/), or a checkpoint folder (uses its export/)",
    )
    parser.add_argument("--num-steps", type=int, default=None, help="K (default: the run's)")
    parser.add_argument("--num-images", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default: PATH/samples_K<k>.png)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    root = Path(args.path)
    export = root if (root / CONFIG_NAME).is_file() else root / "export"
    if not (export / CONFIG_NAME).is_file():
        print(f"e2ed2 sample: no {CONFIG_NAME} in {root} or {root / 'export'}", file=sys.stderr)
        return 2
    try:
        config = load_config(str(export / CONFIG_NAME))
    except ConfigError as err:
        print(f"e2ed2 sample: {err}", file=sys.stderr)
        return 2
    trained_steps = config.trajectory.num_steps
    num_steps = args.num_steps or trained_steps
    if not config.model.share_across_steps and num_steps != trained_steps:
        print(
            f"e2ed2 sample: per-step networks were trained for K={trained_steps}; "
            f"--num-steps {num_steps} is not possible",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    networks = load_exported_networks(export, trained_steps).to(device).eval()
    autoencoder = build_autoencoder(config.model).to(device)
    dataset = build_dataset(config.data, "train")
    cond, captions = sample_conditioning(dataset, args.num_images)
    pixels = generate_pixels(
        networks,
        build_schedule(config.sampler, num_steps),
        autoencoder.decode,
        cond,
        dataset.latent_shape,
        seed=args.seed,
        device=device,
    )
    out = Path(args.out) if args.out else export / f"samples_K{num_steps}.png"
    save_grid(pixels, out)
    print(f"wrote {len(captions)} samples (K={num_steps}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
