"""Aspect-ratio buckets: the (height, width) sizes images are cropped to by ``e2ed2 precompute``.

PixArt-α trains on buckets instead of square crops: each image is resized to cover, then center
cropped to the bucket whose aspect ratio is nearest its own, so a 3:1 panorama stays 3:1 instead
of losing two thirds of its width. A table maps an aspect-ratio label (height / width, as a
string: ``"0.33"``) to a bucket's ``(height, width)`` in pixels, all of about ``resolution²``
pixels.

* ``"pixart"``: PixArt's own tables at 256 / 512 / 1024 / 2048 px, imported from diffusers
  (``ASPECT_RATIO_{256,512,1024}_BIN`` of the PixArt-α pipeline, ``ASPECT_RATIO_2048_BIN`` of
  PixArt-Σ); at any other resolution the 512 table scaled by ``resolution / 512``. Every side is
  rounded to a multiple of ``multiple`` pixels (VAE factor 8 x patch size 2 = 16 for PixArt, so
  every bucket's latent splits into whole patches; the diffusers tables already are).
* ``"none"``: one square bucket ``resolution x resolution`` (the center crop of a square).

:func:`nearest_bucket` picks a bucket as diffusers' ``PixArtImageProcessor.classify_height_width_bin``
does: the label nearest to the image's height / width (the first one on a tie).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

__all__ = [
    "BUCKET_TABLES",
    "PIXART_RESOLUTIONS",
    "bucket_table",
    "largest_bucket",
    "nearest_bucket",
    "pixart_table",
]

#: ``data.buckets`` / ``--buckets`` names.
BUCKET_TABLES = ("none", "pixart")
#: Resolutions with a PixArt table of their own (others scale the 512 one).
PIXART_RESOLUTIONS = (256, 512, 1024, 2048)

BucketTable = Mapping[str, tuple[int, int]]


@functools.cache
def pixart_table(resolution: int) -> dict[str, tuple[int, int]]:
    """PixArt's table at ``resolution`` (one of :data:`PIXART_RESOLUTIONS`), from diffusers:
    ``{aspect ratio label: (height, width)}`` in pixels."""
    if resolution not in PIXART_RESOLUTIONS:
        raise ValueError(
            f"PixArt has aspect-ratio tables at {list(PIXART_RESOLUTIONS)} px, not {resolution}"
        )
    if resolution == 2048:
        # lazy: diffusers adds ~3 s over torch; only PixArt's own bucket tables come from it
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import (
            ASPECT_RATIO_2048_BIN as table,
        )
    else:
        # lazy: diffusers adds ~3 s over torch; only PixArt's own bucket tables come from it
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha

        table = getattr(pipeline_pixart_alpha, f"ASPECT_RATIO_{resolution}_BIN")
    return {label: (int(height), int(width)) for label, (height, width) in table.items()}


def bucket_table(name: str, resolution: int, multiple: int = 16) -> dict[str, tuple[int, int]]:
    """The buckets of table ``name`` (:data:`BUCKET_TABLES`) around ``resolution`` px, every side
    a multiple of ``multiple`` px (rounded to the nearest, at least ``multiple``)."""
    for key, value in (("resolution", resolution), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if name == "none":
        if resolution % multiple:
            raise ValueError(f"resolution={resolution} is not a multiple of {multiple} px")
        return {"1.0": (resolution, resolution)}
    if name != "pixart":
        raise ValueError(f"bucket table {name!r} is not one of {list(BUCKET_TABLES)}")
    if resolution in PIXART_RESOLUTIONS:
        base, scale = pixart_table(resolution), 1.0
    else:
        base, scale = pixart_table(512), resolution / 512

    def side(pixels: float) -> int:  # the nearest multiple, halves rounded up
        return max(multiple, multiple * math.floor(pixels * scale / multiple + 0.5))

    return {label: (side(height), side(width)) for label, (height, width) in base.items()}


def nearest_bucket(height: int, width: int, table: BucketTable) -> tuple[int, int]:
    """The ``(height, width)`` bucket of ``table`` whose label is nearest ``height / width``."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = height / width
    label = min(table, key=lambda key: abs(float(key) - ratio))
    return table[label]


def largest_bucket(table: BucketTable) -> tuple[int, int]:
    """The ``(height, width)`` of ``table`` with the most pixels (a bucketed run's memory peak:
    the longest token sequence); on a tie the one listed first."""
    return max(table.values(), key=lambda size: size[0] * size[1])
