"""``e2ed2 sample``: a PNG grid of K-step samples from an export, a run or a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import ConfigError, load_config
from ..config.sampler import check_num_steps
from ..core.layout import NetworkLayout
from ..core.models import build_autoencoder
from ..core.sampler import build_schedule
from ..core.sampling import generate_pixels, save_grid
from ..data import build_dataset, null_conditioning, sample_conditioning
from ..train.export import CONFIG_NAME, load_exported_networks
from .args import device as device_arg
from .args import int_at_least
from .boundary import run_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 sample EXPORT_OR_RUN_DIR``: a PNG grid from an export or a run's output folder."""
    return run_command("e2ed2 sample", _main, argv)


def _main(argv: Sequence[str]) -> int:
    """``e2ed2 sample EXPORT_OR_RUN_DIR``: a PNG grid from an export or a run's output folder."""
    parser = argparse.ArgumentParser(prog="e2ed2 sample", description=main.__doc__)
    parser.add_argument(
        "path",
        help="an export folder (e2ed2_config.toml + transformer/), a run output_dir (uses its "
        "export/), or a checkpoint folder (uses its export/)",
    )
    parser.add_argument(
        "--num-steps", type=int_at_least(1), default=None, help="K (default: the run's)"
    )
    parser.add_argument("--num-images", type=int_at_least(1), default=20)
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance weight (default: the run's sampler.guidance_scale; 1 = off)",
    )
    parser.add_argument("--out", default=None, help="PNG path (default: PATH/samples_K<k>.png)")
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
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
    # `is None`, not `or`: --num-steps 0 must never quietly become the run's K (argparse
    # refuses it; this keeps the default apart from a value).
    num_steps = trained_steps if args.num_steps is None else args.num_steps
    try:
        check_num_steps(config.sampler, num_steps, "--num-steps")
    except ValueError as err:
        print(f"e2ed2 sample: {err}", file=sys.stderr)
        return 2
    layout_error = NetworkLayout(config.model).sampling_steps_error(num_steps, trained_steps)
    if layout_error is not None:
        print(
            f"e2ed2 sample: {layout_error}; --num-steps {num_steps} is not possible",
            file=sys.stderr,
        )
        return 2
    sampler = config.sampler
    if args.guidance_scale is not None:
        try:
            sampler = dataclasses.replace(sampler, guidance_scale=args.guidance_scale)
        except ValueError as err:
            print(f"e2ed2 sample: --guidance-scale: {err}", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    networks = load_exported_networks(export, trained_steps).to(device).eval()
    autoencoder = build_autoencoder(config.model).to(device)
    dataset = build_dataset(config.data, "train")
    cond, captions = sample_conditioning(dataset, args.num_images)
    try:
        cond = cond.with_unconditional(null_conditioning(dataset, sampler.guidance_scale))
    except ValueError as err:
        print(f"e2ed2 sample: {err}", file=sys.stderr)
        return 2
    pixels = generate_pixels(
        networks,
        build_schedule(sampler, num_steps),
        autoencoder.decode,
        cond,
        dataset.latent_shape,
        seed=args.seed,
        device=device,
    )
    out = Path(args.out) if args.out else export / f"samples_K{num_steps}.png"
    save_grid(pixels, out)
    guided = f", guidance_scale={sampler.guidance_scale:g}" if sampler.guidance_scale > 1 else ""
    print(f"wrote {len(captions)} samples (K={num_steps}{guided}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
