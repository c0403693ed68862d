"""Bytes per image of a shard folder: text states padded to L vs trimmed to each caption's tokens
(issue 23, item 2).

Question: what does one precomputed image cost on disk, and how much of it is T5's padding?
Precompute stores T5's states (L x 4096, float16) per image; before index version 3 every image
paid for all L tokens (PixArt-α: L = 120, 0.94 MiB), since version 3 a masked text encoder's
states are stored trimmed to the caption's tokens (``text.packed``). This writes real shard
files with ``ShardWriter`` (the writer precompute uses), padded and packed, for captions of
several token counts, and divides each file's size by its images. Each row also holds a 512 px
latent posterior (4 x 64 x 64 mean + std, float16), so the totals are what a folder costs.

SD3 is measured as it is stored: CLIP-L/G's 77 tokens + T5's 256 (L = 333, 4096 wide) and the
pooled projections (2048), never packed, because SD3's transformer takes no mask and attends to
the padding (its values are part of the condition). The token counts are inputs, not a caption
distribution: no tokenizer of the real T5 is available here.

    python benchmarks/bench_text_storage.py          # writes results/text_storage.json + .png
    python benchmarks/bench_text_storage.py --smoke  # 4-wide states, seconds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from e2ed2.engine.data.shards import ShardWriter  # noqa: E402

#: (name, tokens L, width D, pooled width or None, masked)
FORMATS = {
    "pixart": (120, 4096, None, True),
    "sd3": (77 + 256, 4096, 2048, False),
}
TOKEN_COUNTS = (8, 16, 32, 64, 120)
LATENT_SHAPE = (4, 64, 64)  # 512 px through the 8x VAE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths, for the tests")
    parser.add_argument("--images", type=int, default=16, help="images per measured shard")
    return parser.parse_args(argv)


def shard_bytes_per_image(
    folder: Path,
    images: int,
    tokens: int,
    length: int,
    width: int,
    pooled: int | None,
    *,
    pack: bool,
    latent_shape: tuple[int, ...],
) -> float:
    """The size of one shard file of ``images`` rows whose captions have ``tokens`` tokens,
    divided by ``images``."""
    generator = torch.Generator().manual_seed(tokens)
    mask = (torch.arange(length) < tokens).expand(images, length)
    rows = {
        "latent_mean": torch.randn(images, *latent_shape, generator=generator),
        "latent_std": torch.rand(images, *latent_shape, generator=generator),
        "encoder_hidden_states": torch.randn(images, length, width, generator=generator),
        "encoder_attention_mask": mask,
        "original_size": torch.full((images, 2), 512, dtype=torch.int32),
        "crop_size": torch.full((images, 2), 512, dtype=torch.int32),
    }
    if pooled is not None:
        rows["pooled_projections"] = torch.randn(images, pooled, generator=generator)
        del rows["encoder_attention_mask"]
    out = folder / f"{tokens}-{int(pack)}"
    out.mkdir()
    writer = ShardWriter(out, images, torch.float16, pack_text=pack)
    captions = ["x" * tokens] * images
    writer.add(rows, captions, [f"{n}.png" for n in range(images)])
    writer.close()
    return sum(p.stat().st_size for p in out.glob("shard-*.safetensors")) / images


def run(args: argparse.Namespace, name: str = "text_storage") -> dict:
    formats = dict(FORMATS)
    counts, latent_shape = TOKEN_COUNTS, LATENT_SHAPE
    if args.smoke:
        formats = {"pixart": (12, 4, None, True), "sd3": (20, 4, 8, False)}
        counts, latent_shape = (2, 12), (4, 4, 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, (length, width, pooled, masked) in formats.items():
            # SD3's bytes do not depend on the caption (never packed): one row says so.
            fitting = [c for c in counts if c <= length]
            for tokens in fitting if masked else fitting[-1:]:
                measured = {}
                for pack in (False, True) if masked else (False,):
                    folder = Path(tmp) / fmt
                    folder.mkdir(exist_ok=True)
                    measured[pack] = shard_bytes_per_image(
                        folder,
                        args.images,
                        tokens,
                        length,
                        width,
                        pooled,
                        pack=pack,
                        latent_shape=latent_shape,
                    )
                before, after = measured[False], measured.get(True, measured[False])
                rows.append(
                    {
                        "format": fmt,
                        "caption_tokens": tokens,
                        "max_tokens": length,
                        "width": width,
                        "packed": masked,
                        "bytes_per_image_padded": before,
                        "bytes_per_image_stored": after,
                        "ratio_stored_to_padded": after / before,
                    }
                )
                print(
                    f"{fmt:7s} {tokens:4d}/{length} tokens: padded {before / 2**20:.3f} MiB, "
                    f"stored {after / 2**20:.3f} MiB per image ({after / before:.2f}x)"
                )
    fig, ax = plt.subplots(figsize=(7, 4))
    for fmt in formats:
        mine = [r for r in rows if r["format"] == fmt]
        tokens = [r["caption_tokens"] for r in mine]
        ax.plot(
            tokens, [r["bytes_per_image_padded"] / 2**20 for r in mine], "--", label=f"{fmt} padded"
        )
        ax.plot(
            tokens, [r["bytes_per_image_stored"] / 2**20 for r in mine], "o-", label=f"{fmt} stored"
        )
    ax.set_xlabel("caption tokens")
    ax.set_ylabel("MiB per image (shard file / images)")
    ax.set_title("Shard bytes per image, 512 px latents + text states (float16)")
    ax.legend()
    payload = {
        "question": "shard bytes per image, text states padded vs trimmed to the caption",
        "covers": "safetensors shard file size / images: latent mean + std, text states "
        "(+ mask or lengths, SD3 pooled), size conditions, caption metadata",
        "images_per_shard": args.images,
        "rows": rows,
    }
    _common.write_result(name, payload, fig, smoke=args.smoke)
    return payload


if __name__ == "__main__":
    run(parse_args())
