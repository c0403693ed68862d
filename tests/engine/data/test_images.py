"""Images decoded as a viewer shows them (data/images.py): files written by Pillow in each mode
and variant cameras, phones and tools produce; precompute stores those pixels and sizes, skips
and lists the rest, and a caption file's bad line costs only that line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from e2ed2.engine.data import images as images_module
from e2ed2.engine.data.images import UnreadableImage, load_image_and_size
from e2ed2.engine.data.precompute import precompute

SIDE = 4  # loaded at their own size: no resampling, the stored pixels are the decoded ones


def _viewer_pixels(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 as precompute encodes them, and the original (height, width)."""
    pixels, size = load_image_and_size(path, SIDE)
    values = ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return values, size


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2).astype(np.uint8)


def _grid(values: list[float], dtype: type) -> np.ndarray:
    """A SIDE x SIDE image whose columns hold ``values`` (one value per column)."""
    return np.tile(np.asarray(values, dtype=dtype), (SIDE, 1))


def test_each_mode_gives_the_pixels_a_viewer_shows(tmp_path: Path) -> None:
    expected: dict[str, np.ndarray] = {}

    # 16-bit gray (PNG and TIFF both decode as I;16): scaled, not clipped at 255.
    sixteen = _grid([0, 257 * 100, 40000, 65535], np.uint16)
    for suffix in ("png", "tif"):
        Image.fromarray(sixteen).save(tmp_path / f"gray16.{suffix}")
        assert Image.open(tmp_path / f"gray16.{suffix}").mode == "I;16"
        expected[f"gray16.{suffix}"] = _gray(_grid([0, 100, 156, 255], np.uint8))
    # 32-bit int with 16-bit values; float 0..1 (beyond: clipped).
    Image.fromarray(_grid([0, 257 * 100, 40000, 65535], np.int32)).save(tmp_path / "int32.tif")
    expected["int32.tif"] = _gray(_grid([0, 100, 156, 255], np.uint8))
    Image.fromarray(_grid([0.0, 0.5, 1.0, 2.5], np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    expected["float.tif"] = _gray(_grid([0, 128, 255, 255], np.uint8))
    # CMYK (a print workflow's TIFF): R = 255 (1 - C)(1 - K).
    cmyk = Image.new("CMYK", (SIDE, SIDE), (128, 0, 0, 128))
    cmyk.save(tmp_path / "cmyk.tif")
    expected["cmyk.tif"] = np.full((SIDE, SIDE, 3), (63, 127, 127), np.uint8)
    # 1-bit and plain gray.
    Image.fromarray(_grid([0, 255, 0, 255], np.uint8)).convert("1").save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    expected["bits.png"] = _gray(_grid([0, 255, 0, 255], np.uint8))
    Image.fromarray(_grid([3, 60, 120, 250], np.uint8)).save(tmp_path / "gray.png")
    expected["gray.png"] = _gray(_grid([3, 60, 120, 250], np.uint8))
    # Gray + alpha and RGBA: alpha 0 is white, 255 the color, 128 half way.
    alpha = _grid([0, 255, 128, 255], np.uint8)
    la = np.stack([_grid([100] * SIDE, np.uint8), alpha], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    half = round(100 * 128 / 255 + 255 * 127 / 255)
    expected["la.png"] = _gray(_grid([255, 100, half, 100], np.uint8))
    rgba = np.concatenate([np.full((SIDE, SIDE, 3), (10, 20, 30), np.uint8), alpha[..., None]], 2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    mixed = [round(c * 128 / 255 + 255 * 127 / 255) for c in (10, 20, 30)]
    expected["rgba.png"] = np.array(
        [[(255, 255, 255), (10, 20, 30), mixed, (10, 20, 30)]] * SIDE, np.uint8
    )
    # Palettes: without transparency, and with a transparent index (PNG tRNS, GIF).
    palette = Image.fromarray(_grid([0, 1, 2, 1], np.uint8), mode="P")
    palette.putpalette([200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (0, 200, 0)]
    expected["palette.png"] = np.array([colors] * SIDE, np.uint8)
    for suffix in ("png", "gif"):
        palette.save(tmp_path / f"palette_clear.{suffix}", transparency=1)
        assert "transparency" in Image.open(tmp_path / f"palette_clear.{suffix}").info
        clear = [(200, 0, 0), (255, 255, 255), (0, 0, 200), (255, 255, 255)]
        expected[f"palette_clear.{suffix}"] = np.array([clear] * SIDE, np.uint8)
    # tRNS on gray and on RGB: one value / color is transparent.
    Image.fromarray(_grid([0, 50, 0, 50], np.uint8)).save(
        tmp_path / "gray_trns.png", transparency=0
    )
    expected["gray_trns.png"] = _gray(_grid([255, 50, 255, 50], np.uint8))
    rgb = np.array([[(1, 2, 3), (9, 9, 9)] * (SIDE // 2)] * SIDE, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb_trns.png", transparency=(1, 2, 3))
    expected["rgb_trns.png"] = np.array([[(255, 255, 255), (9, 9, 9)] * (SIDE // 2)] * SIDE)

    for name, want in expected.items():
        got, size = _viewer_pixels(tmp_path / name)
        assert size == (SIDE, SIDE), name
        np.testing.assert_array_equal(got, want.astype(np.uint8), err_msg=name)


def _halves(width: int, height: int) -> Image.Image:
    """Left half black, right half white."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, width // 2 :] = 255
    return Image.fromarray(pixels)


def test_orientation_first_frame_and_refusals(tmp_path: Path, monkeypatch) -> None:
    # A phone's portrait photo: stored 16 wide x 8 tall, EXIF orientation 6 (rotate 90° clockwise
    # to view): the viewer sees 8 wide x 16 tall, black on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves(16, 8).save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    pixels, size = load_image_and_size(tmp_path / "portrait.jpg", 8)
    assert size == (16, 8)
    # (the 8 x 8 center crop of the 8 x 16 view: rows 0..3 black, 4..7 white)
    assert float(pixels[:, :3].mean()) < -0.9 and float(pixels[:, 5:].mean()) > 0.9
    # Orientation 3 (upside down) in a PNG's eXIf chunk: same size, the halves swapped.
    exif[0x0112] = 3
    _halves(8, 8).save(tmp_path / "flipped.png", exif=exif)
    pixels, size = load_image_and_size(tmp_path / "flipped.png", 8)
    assert size == (8, 8) and float(pixels[:, :, :4].mean()) == 1.0

    # Animations: the first frame.
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    for suffix in ("gif", "png", "webp"):
        red.save(tmp_path / f"anim.{suffix}", save_all=True, append_images=[blue], lossless=True)
        assert Image.open(tmp_path / f"anim.{suffix}").n_frames == 2
        got, _ = _viewer_pixels(tmp_path / f"anim.{suffix}")
        assert (got == (255, 0, 0)).all(), suffix

    # Refused: truncated, over the pixel limit, 32-bit values without a range, NaN floats.
    buffer = io.BytesIO()
    _halves(32, 32).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-60])
    with pytest.raises(UnreadableImage, match=r"unreadable image \(OSError"):
        load_image_and_size(tmp_path / "cut.png", 8)
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    with pytest.raises(UnreadableImage, match=r"decompression bomb suspected: 32x32 = 1024"):
        load_image_and_size(buffer.getvalue(), 8)  # bytes, as the dataset readers pass them
    monkeypatch.undo()
    Image.fromarray(_grid([0, 70000, 0, 0], np.int32)).save(tmp_path / "wide_int.tif")
    with pytest.raises(UnreadableImage, match=r"values 0\.\.70000"):
        load_image_and_size(tmp_path / "wide_int.tif", SIDE)
    Image.fromarray(_grid([0.0, float("nan"), 0, 0], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(UnreadableImage, match="NaN"):
        load_image_and_size(tmp_path / "nan.tif", SIDE)


def test_precompute_stores_viewer_pixels_and_lists_bad_files_and_lines(
    tmp_path: Path, tiny_models, monkeypatch
) -> None:
    vae, t5 = tiny_models
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to view
    _halves(24, 12).save(images / "phone.jpg", exif=exif)
    Image.fromarray(_grid([0, 65535, 0, 65535], np.uint16)).save(images / "scan16.png")
    _halves(40, 40).save(images / "huge.png")
    buffer = io.BytesIO()
    _halves(32, 32).save(buffer, format="TIFF")
    (images / "cut.tif").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    lines = [
        json.dumps({"file": "phone.jpg", "caption": "a phone photo"}).encode(),
        b'{"file": "scan16.png", "caption": "bad \xff\xfe bytes"}',
        json.dumps({"file": "scan16.png", "caption": "a 16-bit scan"}).encode(),
        b'{"file": "huge.png", "caption": ',
        json.dumps({"file": "huge.png", "caption": "too many pixels"}).encode(),
        json.dumps({"file": "cut.tif", "caption": "half a file"}).encode(),
    ]
    (images / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 39 * 40)
    index = precompute(
        images,
        tmp_path / "out",
        vae_path=vae,
        text_encoder_path=t5,
        resolution=SIDE,
        caption_max_tokens=8,
        progress=False,
    )
    skipped = {entry["path"]: entry["reason"] for entry in index["skipped"]}
    assert set(skipped) == {"captions.jsonl:2", "captions.jsonl:4", "huge.png", "cut.tif"}
    assert skipped["captions.jsonl:2"].startswith("not UTF-8 text")
    assert skipped["captions.jsonl:4"].startswith("not JSON")
    assert "decompression bomb suspected: 40x40" in skipped["huge.png"]
    assert "unreadable image" in skipped["cut.tif"]
    shard = load_file(str(tmp_path / "out" / index["shards"][0]["file"]))
    # phone.jpg then scan16.png (sorted): the size a viewer shows, (height, width).
    assert shard["original_size"].tolist() == [[24, 12], [4, 4]]
    # The stored latent of the 16-bit scan is the VAE's encoding of its viewer pixels: black
    # and white columns (Pillow's convert("L") would have made it all white).
    viewer = torch.tensor([-1.0, 1.0, -1.0, 1.0]).expand(3, SIDE, SIDE)
    with torch.no_grad():
        mean = AutoencoderKL.from_pretrained(vae).encode(viewer[None]).latent_dist.mean[0]
    torch.testing.assert_close(shard["latent_mean"][1].float(), mean, atol=2e-3, rtol=2e-3)
