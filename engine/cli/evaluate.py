"""``e2ed2 evaluate``: score an export's samples at several K (see eval/)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import ConfigError, load_config
from ..config.sampler import check_num_steps
from ..eval.digits import DigitEvaluator, evaluate_export
from ..eval.real_data import check_metric_paths, evaluate_shard_export
from ..train.export import CONFIG_NAME
from .args import device as device_arg
from .args import int_at_least
from .boundary import run_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 evaluate EXPORT_OR_RUN_DIR``: scores at several K, as JSON.

    data.source='digits' exports: digit FD / accuracy (offline, nothing to download).
    data.source='shards' exports: FID (and CLIP score with --clip-model) of images generated for
    the first --num-images shard prompts, against those samples' latents decoded by the export's
    VAE (VAE reconstructions of the real images); weights from local paths only.
    """
    return run_command("e2ed2 evaluate", _main, argv)


def _main(argv: Sequence[str]) -> int:
    """``e2ed2 evaluate EXPORT_OR_RUN_DIR``: scores at several K, as JSON.

    data.source='digits' exports: digit FD / accuracy (offline, nothing to download).
    data.source='shards' exports: FID (and CLIP score with --clip-model) of images generated for
    the first --num-images shard prompts, against those samples' latents decoded by the export's
    VAE (VAE reconstructions of the real images); weights from local paths only.
    """
    parser = argparse.ArgumentParser(
        prog="e2ed2 evaluate",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="an export folder, or a run output_dir (uses its export/)")
    parser.add_argument(
        "--num-steps", type=int_at_least(1), nargs="+", default=[1, 2, 4], help="K values"
    )
    parser.add_argument(
        "--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2], help="sampling seeds"
    )
    parser.add_argument("--out", default=None, help="JSON path (default: stdout)")
    parser.add_argument("--grid-dir", default=None, help="also write a sample grid per K here")
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    digits = parser.add_argument_group("digits exports (data.source='digits')")
    digits.add_argument(
        "--classifier-cache", default=None, help="folder caching the digit classifier's weights"
    )
    digits.add_argument(
        "--noise-floor", action="store_true", help="also report real-vs-real reference scores"
    )
    real = parser.add_argument_group(
        "latent-shard exports (data.source='shards'): FID against VAE reconstructions of the "
        "prompts' real images, CLIP score against their captions"
    )
    real.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help="required: torch-fidelity's InceptionV3 FID weights file "
        "(pt_inception-2015-12-05-6726825d.pth)",
    )
    real.add_argument(
        "--clip-model",
        metavar="DIR",
        default=None,
        help="a local transformers CLIP folder (config.json, weights, processor); adds clip_score",
    )
    real.add_argument(
        "--shard-dir",
        metavar="DIR",
        default=None,
        help="shard folder with the prompts and reference latents (default: the export "
        "config's data.shard_dir)",
    )
    real.add_argument(
        "--num-images",
        metavar="N",
        type=int_at_least(2),
        default=1000,
        help="prompts / reference images: the first N samples (capped at the dataset size)",
    )
    real.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=32,
        help="images generated and scored at a time",
    )
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"e2ed2 evaluate: {message}", file=sys.stderr)
        return 2

    root = Path(args.path)
    export = root if (root / CONFIG_NAME).is_file() else root / "export"
    if not (export / CONFIG_NAME).is_file():
        return fail(f"no {CONFIG_NAME} in {root} or {root / 'export'}")
    try:
        config = load_config(str(export / CONFIG_NAME))
    except ConfigError as err:
        return fail(str(err))
    for k in args.num_steps:
        try:
            check_num_steps(config.sampler, k, "--num-steps")
        except ValueError as err:
            return fail(str(err))
    if config.data.source == "shards":
        if args.inception_weights is None:
            return fail(
                "--inception-weights PATH is required for data.source='shards' exports "
                "(torch-fidelity's InceptionV3 FID weights, pt_inception-2015-12-05-6726825d.pth)"
            )
        if args.num_images < 2 or args.batch_size < 1:
            return fail("--num-images must be >= 2 and --batch-size >= 1")
        try:
            check_metric_paths(args.inception_weights, args.clip_model)
        except FileNotFoundError as err:
            return fail(str(err))
        shard_dir = args.shard_dir or config.data.shard_dir
        assert shard_dir is not None  # DataConfig requires data.shard_dir for shards
        option = "--shard-dir" if args.shard_dir else "data.shard_dir (from the export config)"
        if not (Path(shard_dir) / "index.json").is_file():
            hint = "" if args.shard_dir else "; pass --shard-dir to use another folder"
            return fail(
                f"{option} {shard_dir!r} has no index.json (make it with `e2ed2 precompute`)" + hint
            )
        try:
            results = evaluate_shard_export(
                export,
                inception_weights=args.inception_weights,
                clip_model=args.clip_model,
                shard_dir=shard_dir,
                num_images=args.num_images,
                num_steps=args.num_steps,
                seeds=args.seeds,
                batch_size=args.batch_size,
                grid_dir=args.grid_dir,
                device=args.device,
            )
        except ImportError as err:
            return fail(str(err))
    else:
        evaluator = DigitEvaluator(config.data, cache_dir=args.classifier_cache)
        results = evaluate_export(
            export,
            num_steps=args.num_steps,
            seeds=args.seeds,
            evaluator=evaluator,
            grid_dir=args.grid_dir,
            device=args.device,
        )
        if args.noise_floor:
            results["noise_floor"] = evaluator.noise_floor()
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
