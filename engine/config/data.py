"""``[data]``: where training samples come from (see data/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import check_fields, check_int

__all__ = ["DIGITS_TEXT_HEADS", "BucketTable", "DataConfig", "DataSource"]

DataSource = Literal["digits", "shards", "prompts"]
#: Aspect-ratio bucket tables (data/buckets.py).
BucketTable = Literal["none", "pixart"]
#: Attention heads of the embedded digits' tiny T5 text encoder (data.text_dim is a multiple).
DIGITS_TEXT_HEADS = 4


@dataclass(frozen=True)
class DataConfig:
    """Where training samples come from (the ``[data]`` table of a run config)."""

    source: DataSource = "digits"
    """"digits": scikit-learn's 8x8 digits, upscaled, one channel, pixel space (no autoencoder).
    "shards": latents + text embeddings precomputed by ``e2ed2 precompute`` into shard_dir.
    "prompts": prompt-only, text embeddings encoded by ``e2ed2 encode-prompts`` into prompt_dir
    (no image: for teacher targets and rewards; the latent side is resolution / the VAE's
    downsampling).
    """
    shard_dir: str | None = None
    """Shards: the folder ``e2ed2 precompute`` wrote (index.json + shard-*.safetensors)."""
    prompt_dir: str | None = None
    """Prompts: the folder ``e2ed2 encode-prompts`` wrote (index.json + prompts-*.safetensors)."""
    buckets: BucketTable = "none"
    """Shards: the aspect-ratio bucket table the folder was precomputed with (``e2ed2 precompute
    --buckets``; checked against its index.json at launch). "none": square center crops, one
    latent shape. "pixart": PixArt's aspect-ratio buckets (each image cropped to the nearest
    bucket's height x width, one latent shape per bucket); every global batch (all ranks' micro-
    batches of one micro-step) is drawn from one bucket, a bucket's leftover samples that do not
    fill a global batch are left out of that epoch (data/batching.py BucketBatchSampler).
    """
    resolution: int = 16
    """Digits: side of the upscaled images in pixels (>= 8; the 8x8 originals are only upscaled).
    Prompts: the side of the generated square images in pixels (a multiple of the VAE's
    downsampling)."""
    caption_max_tokens: int = 32
    """Digits: text length in ByT5 tokens (bytes + EOS); captions are padded / truncated to it."""
    text_dim: int = 64
    """Digits: hidden size D of the tiny text encoder (a multiple of its 4 heads)."""
    holdout_fraction: float = 0.2
    """Digits: fraction of each class held out of training (for evaluation); 0 = no holdout."""
    seed: int = 0
    """Seed of the data's own draws (split, captions, latent posterior noise, permutations)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    shard_cache_size: int = 4
    """Shards: how many shard files one process keeps open (memory-mapped) at a time."""
    max_bad_sample_fraction: float = 0.01
    """Shards: the largest tolerated share (0..1) of bad samples (unreadable shard, wrong shape or
    dtype, NaN/Inf values), as bad samples drawn / max(samples drawn, dataset size). Bad samples
    are skipped, counted and logged; past this share the run stops with an error.
    """

    def __post_init__(self) -> None:
        check_fields("data", self)
        if self.source == "shards" and not self.shard_dir:
            raise ValueError(
                "data.shard_dir is required for data.source='shards' (a folder made by "
                "`e2ed2 precompute`, with index.json)"
            )
        if self.source == "prompts" and not self.prompt_dir:
            raise ValueError(
                "data.prompt_dir is required for data.source='prompts' (a folder made by "
                "`e2ed2 encode-prompts`, with index.json)"
            )
        if self.buckets != "none" and self.source != "shards":
            raise ValueError(
                f"data.buckets={self.buckets!r} needs data.source='shards' (aspect-ratio buckets "
                f"are made by `e2ed2 precompute --buckets`; {self.source!r} images are square)"
            )
        if self.shard_dir is not None and not isinstance(self.shard_dir, str):
            raise ValueError(f"data.shard_dir must be a path string, got {self.shard_dir!r}")
        check_int("data.resolution", self.resolution, minimum=8)
        check_int("data.caption_max_tokens", self.caption_max_tokens, minimum=1)
        check_int("data.text_dim", self.text_dim, minimum=DIGITS_TEXT_HEADS)
        if self.text_dim % DIGITS_TEXT_HEADS:
            raise ValueError(
                f"data.text_dim must be a multiple of {DIGITS_TEXT_HEADS} (the digits text "
                f"encoder's heads), got {self.text_dim}"
            )
        if (
            isinstance(self.holdout_fraction, bool)
            or not isinstance(self.holdout_fraction, int | float)
            or not 0.0 <= self.holdout_fraction < 1.0
        ):
            raise ValueError(
                f"data.holdout_fraction must be a number in [0, 1), got {self.holdout_fraction!r}"
            )
        check_int("data.seed", self.seed, minimum=0)
        if self.seed >= 2**63:
            raise ValueError(f"data.seed must be < 2**63, got {self.seed}")
        check_int("data.num_workers", self.num_workers, minimum=0)
        check_int("data.shard_cache_size", self.shard_cache_size, minimum=1)
        if (
            isinstance(self.max_bad_sample_fraction, bool)
            or not isinstance(self.max_bad_sample_fraction, int | float)
            or not 0.0 <= self.max_bad_sample_fraction <= 1.0
        ):
            raise ValueError(
                "data.max_bad_sample_fraction must be a number in [0, 1], got "
                f"{self.max_bad_sample_fraction!r}"
            )
