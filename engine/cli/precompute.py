"""``e2ed2 precompute``: an image folder with captions -> latent shards (see data/precompute.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..data.buckets import BUCKET_TABLES
from ..data.precompute import STORAGE_DTYPES, precompute
from ..data.precompute_parallel import ChunkFailed, launcher_rank
from ..data.readers import SOURCES
from ..train.run_lock import FolderInUseError, lock_folder
from .args import device as device_arg
from .args import int_at_least
from .boundary import run_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 precompute IMAGE_DIR OUT_DIR --vae PATH --text-encoder PATH [...]``."""
    return run_command("e2ed2 precompute", _main, argv)


def _main(argv: Sequence[str]) -> int:
    """``e2ed2 precompute IMAGE_DIR OUT_DIR --vae PATH --text-encoder PATH [...]``."""
    parser = argparse.ArgumentParser(
        prog="e2ed2 precompute",
        description="Encode images with captions into latent shards for training.",
    )
    parser.add_argument(
        "image_dir",
        help="dataset folder: images with captions.jsonl or sidecar .txt captions, an "
        "imagefolder (metadata.jsonl / metadata.csv), a Hugging Face datasets folder or "
        "parquet / arrow files, or webdataset .tar shards (see --source)",
    )
    parser.add_argument("out_dir", help="shard folder to write (index.json + *.safetensors)")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    parser.add_argument(
        "--text-encoder",
        required=True,
        help="local transformers T5 folder, or an SD3 pipeline folder (its CLIP-L, CLIP-G and T5)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: T5's)")
    parser.add_argument(
        "--resolution",
        type=int_at_least(8),
        default=512,
        help="image side in pixels (with --buckets: the square the buckets' areas are about)",
    )
    parser.add_argument(
        "--buckets",
        choices=list(BUCKET_TABLES),
        default="none",
        help="none: square center crops; pixart: crop each image to its nearest aspect-ratio "
        "bucket (PixArt's table around --resolution); train with the same data.buckets",
    )
    parser.add_argument(
        "--max-tokens",
        type=int_at_least(1),
        default=120,
        help="caption length in T5 tokens (PixArt-α: 120; SD3: 256, after CLIP's 77)",
    )
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=8, help="images per encoder call"
    )
    parser.add_argument(
        "--shard-size", type=int_at_least(1), default=1024, help="samples per shard file"
    )
    parser.add_argument(
        "--source",
        choices=list(SOURCES),
        default="auto",
        help="reader of IMAGE_DIR (auto: by what it holds: a datasets folder or parquet/arrow "
        "files, .tar shards, captions.jsonl, metadata.jsonl/csv, else sidecars)",
    )
    parser.add_argument(
        "--caption-column",
        default=None,
        help="caption column of metadata.jsonl/csv or a dataset (default: text), or the tar "
        "member holding it (default: txt, else the .json's text)",
    )
    parser.add_argument(
        "--image-column",
        default=None,
        help="image column (imagefolder default: file_name; dataset default: image) or tar "
        "member extension (default: the first image member)",
    )
    parser.add_argument(
        "--num-processes",
        type=int_at_least(1),
        default=1,
        help="worker processes on this machine, each encoding its own chunks of --shard-size "
        "inputs (with --device cuda: one GPU each); under torchrun / deepspeed each rank is one "
        "instead. A rerun of an interrupted run resumes it",
    )
    # The deepspeed launcher passes --local_rank to every rank (LOCAL_RANK says the same).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", type=device_arg, default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float16", help="storage")
    parser.add_argument("--compute-dtype", choices=list(STORAGE_DTYPES), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    launcher = launcher_rank()
    try:
        # One run per shard folder, held until this process ends (train/run_lock.py); under a
        # launcher rank 0 holds it for all ranks (they share the folder by chunks).
        lock = (
            None if launcher and launcher[0] else lock_folder(args.out_dir, "OUT_DIR", parser.prog)
        )
    except (FolderInUseError, NotADirectoryError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    try:
        index = precompute(
            args.image_dir,
            args.out_dir,
            vae_path=args.vae,
            text_encoder_path=args.text_encoder,
            tokenizer_path=args.tokenizer,
            resolution=args.resolution,
            buckets=args.buckets,
            caption_max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            device=args.device,
            dtype=STORAGE_DTYPES[args.dtype],
            compute_dtype=STORAGE_DTYPES[args.compute_dtype],
            overwrite=args.overwrite,
            progress=not args.no_progress,
            source=args.source,
            caption_column=args.caption_column,
            image_column=args.image_column,
            num_processes=args.num_processes,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except ChunkFailed as error:  # a worker died: what is finished is kept for a rerun
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    print(
        f"wrote {index['num_samples']} samples in {len(index['shards'])} shards to "
        f"{args.out_dir} ({len(index['buckets'])} of {args.buckets!r} buckets used, "
        f"{len(index['skipped'])} inputs skipped, listed in index.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
