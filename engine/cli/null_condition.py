"""``e2ed2 null-condition SHARD_DIR``: add classifier-free guidance's null conditioning (the
empty prompt, encoded as the captions) to a shard folder precomputed before precompute stored it
(see data/null_condition.py); folders written by ``e2ed2 precompute`` have it already."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..data.null_condition_add import add_null_condition
from ..data.precompute import STORAGE_DTYPES
from .args import device as device_arg
from .boundary import run_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 null-condition SHARD_DIR [--text-encoder PATH] [--tokenizer PATH]``."""
    return run_command("e2ed2 null-condition", _main, argv)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="e2ed2 null-condition",
        description="Encode the empty prompt into SHARD_DIR/null_condition.safetensors, the "
        "unconditional half of classifier-free guidance (sampler.guidance_scale > 1).",
    )
    parser.add_argument("shard_dir", help="a shard folder (index.json) of `e2ed2 precompute`")
    parser.add_argument(
        "--text-encoder", default=None, help="T5 folder (default: the one index.json records)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: recorded)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="torch device")
    parser.add_argument("--compute-dtype", choices=list(STORAGE_DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        path = add_null_condition(
            args.shard_dir,
            text_encoder_path=args.text_encoder,
            tokenizer_path=args.tokenizer,
            device=args.device,
            compute_dtype=STORAGE_DTYPES[args.compute_dtype],
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
