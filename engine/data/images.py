"""Image files decoded to the pixels a viewer shows, then cropped for the VAE (precompute).

Cameras, phones and image tools write more than 8-bit RGB: palettes with and without a
transparent index, gray + alpha, 16-bit gray (PNG, TIFF), 32-bit integer and float TIFFs, CMYK
JPEGs, 1-bit scans, EXIF orientation tags (a phone's portrait photo is stored sideways), and
animations. Pillow reads them all, but its plain ``convert("RGB")`` shows some of them wrongly:
16-bit gray is clipped at 255 (almost every pixel white) and transparency outside RGBA/LA/P is
dropped. :func:`viewer_rgb` converts each mode as an image viewer displays it:

* transparency of any kind (alpha band, a transparent palette index, a ``tRNS`` gray level or
  color): composited onto white;
* ``I;16*`` (16-bit gray): scaled by 255 / 65535 and rounded; ``I`` (32-bit int): the same
  when its values lie in 0..65535 (how 16-bit PNGs are decoded as ``I``), refused otherwise
  (no range a viewer agrees on);
* ``F`` (32-bit float): 0..1 is black..white, values beyond are clipped (as GIMP shows float
  TIFFs); NaN/Inf is refused;
* ``CMYK``: Pillow's uncalibrated conversion, R = 255 (1 - C)(1 - K) per channel;
* ``1``, ``L``, ``P``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's own conversion to RGB;
* the EXIF orientation tag applied (``PIL.ImageOps.exif_transpose``), so ``original_size`` is
  the (height, width) the user sees;
* animations (GIF, APNG, WebP) and multi-page TIFFs: the first frame.

Files are refused (:class:`UnreadableImage`, the caller skips and lists them) when Pillow cannot
decode them whole (truncated, corrupt), when they declare more than :data:`MAX_IMAGE_PIXELS`
pixels (a decompression bomb: checked from the header, before any pixel is decoded), or when
their values have no display range. Embedded ICC color profiles are not applied: pixels are taken
as sRGB (a wide-gamut photo, e.g. Display P3, loses some saturation).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import BucketTable, nearest_bucket

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "UnreadableImage",
    "load_image",
    "load_image_and_size",
    "open_viewer_rgb",
    "viewer_rgb",
]

#: File name endings precompute reads as images (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
#: The largest image accepted, in pixels (Pillow's own default warning limit, about 89.5
#: megapixels = 1024 * 1024 * 1024 // 4 // 3); larger files are refused as decompression bombs.
MAX_IMAGE_PIXELS = 89_478_485
#: Pixel value scale of 16-bit samples to 8 bits (65535 -> 255).
_SIXTEEN_TO_EIGHT = 255.0 / 65535.0
#: Pillow modes with an alpha band (lowercase a: premultiplied).
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class UnreadableImage(ValueError):
    """An image file that is not decoded (message: why), skipped and listed by precompute."""


def open_viewer_rgb(source: str | os.PathLike | bytes | Any) -> Any:
    """A file path, the file's bytes or an opened ``PIL.Image.Image`` -> the RGB ``PIL`` image a
    viewer shows (see the module docstring); raises UnreadableImage."""
    if isinstance(source, Image.Image):
        return viewer_rgb(source)
    handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else Path(source)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and decodes) between its limit and twice it: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as opened:
                _check_pixels(opened)
                opened.seek(0)  # animations and multi-page files: the first frame
                opened.load()  # decode now: truncated files fail here, not later
                return viewer_rgb(opened)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"decompression bomb suspected ({error})") from None
    except Exception as error:  # Pillow raises many types for malformed files
        raise UnreadableImage(f"unreadable image ({type(error).__name__}: {error})") from None


def viewer_rgb(image: Any) -> Any:
    """A decoded ``PIL`` image of any mode -> RGB as a viewer shows it (orientation applied)."""
    _check_pixels(image)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a malformed EXIF block: the orientation is unknown
        raise UnreadableImage(f"unreadable EXIF orientation ({type(error).__name__})") from None
    mode = image.mode
    if mode.startswith("I;16"):
        gray = np.asarray(image).astype(np.float64) * _SIXTEEN_TO_EIGHT
        image = Image.fromarray(np.rint(gray).astype(np.uint8), mode="L")
    elif mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnreadableImage(
                f"32-bit integer image with values {values.min()}..{values.max()} (only "
                "0..65535, 16-bit data, has a display range)"
            )
        gray = values.astype(np.float64) * _SIXTEEN_TO_EIGHT
        image = Image.fromarray(np.rint(gray).astype(np.uint8), mode="L")
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UnreadableImage("float image with NaN/Inf values")
        gray = np.clip(values, 0.0, 1.0) * 255.0
        image = Image.fromarray(np.rint(gray).astype(np.uint8), mode="L")
    transparent = mode in _ALPHA_MODES or "transparency" in image.info
    if transparent:  # alpha band, transparent palette index, tRNS gray level or color
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise UnreadableImage(f"image mode {mode!r} has no RGB conversion ({error})") from None


def load_image(path: str | os.PathLike | bytes, resolution: int) -> torch.Tensor:
    """An image file -> (3, resolution, resolution) float32 in [-1, 1].

    Decoded as a viewer shows it (:func:`open_viewer_rgb`). The shorter side is resized to
    ``resolution`` (bicubic; PIL antialiases when shrinking), then the center is cropped.
    """
    return load_image_and_size(path, resolution)[0]


def load_image_and_size(
    source: str | os.PathLike | bytes | Any, resolution: int, buckets: BucketTable | None = None
) -> tuple[torch.Tensor, tuple]:
    """:func:`load_image` of a path, the file's bytes or an opened ``PIL`` image, and its
    original ``(height, width)`` in pixels as a viewer shows it (PixArt-MS's ``resolution``
    condition is the source image's size, not the crop's).

    ``buckets``: a table of :func:`~e2ed2.engine.data.buckets.bucket_table`; the image is then
    resized to cover its nearest bucket and center-cropped to it, (3, height, width), instead of
    the ``resolution`` square. Raises UnreadableImage.
    """
    image = open_viewer_rgb(source)
    width, height = image.size
    if min(width, height) < 1:
        raise UnreadableImage(f"empty image ({width}x{height})")
    crop_h, crop_w = (
        (resolution, resolution) if buckets is None else nearest_bucket(height, width, buckets)
    )
    # Cover: the smallest scale at which the image holds the crop, then its center.
    scale = max(crop_h / height, crop_w / width)
    size = (max(crop_w, round(width * scale)), max(crop_h, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - crop_w) // 2, (size[1] - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0, (height, width)


def _check_pixels(image: Any) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableImage(
            f"decompression bomb suspected: {width}x{height} = {width * height} pixels, over "
            f"the limit of {MAX_IMAGE_PIXELS}"
        )
