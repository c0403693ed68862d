"""``e2ed2 encode-prompts PROMPTS OUT_DIR``: encode a prompt list (.txt, one a line, or .jsonl)
into a prompt-only data folder for ``data.source = "prompts"`` (data/prompts_source.py): the text
states, masks or pooled projections and the null condition, as ``e2ed2 precompute`` stores them
for captions, without any image."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .args import device as device_arg
from .args import int_at_least
from .boundary import run_command

__all__ = ["main"]

_DTYPES = ("float16", "bfloat16", "float32")


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 encode-prompts PROMPTS OUT_DIR --text-encoder PATH --vae PATH [...]``."""
    return run_command("e2ed2 encode-prompts", _main, argv)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="e2ed2 encode-prompts",
        description="Encode a prompt file into a folder for prompt-only training "
        "(data.source='prompts', data.prompt_dir=OUT_DIR): teacher and reward objectives.",
    )
    parser.add_argument("prompts", help=".txt (one prompt a line) or .jsonl ({'prompt': ...})")
    parser.add_argument("out_dir", help="the folder to write (index.json + prompts-*.safetensors)")
    parser.add_argument(
        "--text-encoder",
        required=True,
        help="a T5 folder, a pipeline folder with text_encoder/, or an SD3 pipeline folder",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: beside it)")
    parser.add_argument(
        "--vae",
        required=True,
        help="the run's AutoencoderKL (or pipeline) folder: its config.json gives the latent "
        "channels and downsampling (no weights are loaded)",
    )
    parser.add_argument(
        "--max-tokens", type=int_at_least(1), default=120, help="T5 tokens (PixArt: 120)"
    )
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--dtype", choices=_DTYPES, default="float16", help="storage dtype")
    parser.add_argument("--compute-dtype", choices=_DTYPES, default="float32")
    parser.add_argument("--device", type=device_arg, default="cpu", help="torch device")
    parser.add_argument("--overwrite", action="store_true", help="replace an encoded folder")
    args = parser.parse_args(argv)

    # lazy: pulls in torch (~4 s); --help and argument errors return before it
    from ..data.prompts_source import encode_prompt_folder
    from ..data.storage import STORAGE_DTYPES

    try:
        index = encode_prompt_folder(
            args.prompts,
            args.out_dir,
            text_encoder_path=args.text_encoder,
            tokenizer_path=args.tokenizer,
            vae_path=args.vae,
            caption_max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            dtype=STORAGE_DTYPES[args.dtype],
            compute_dtype=STORAGE_DTYPES[args.compute_dtype],
            device=args.device,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"encoded {index['num_samples']} prompts into {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
