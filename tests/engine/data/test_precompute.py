"""``e2ed2 precompute``: a tiny local VAE and T5 turn an image folder into loadable shards."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import ByT5Tokenizer, T5EncoderModel

from e2ed2.engine.cli.precompute import main
from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data.batching import build_dataloader
from e2ed2.engine.data.precompute import load_image, precompute
from e2ed2.engine.data.shards import LatentShardDataset
from e2ed2.engine.data.text import encode_text

RESOLUTION = 16
MAX_TOKENS = 20


def _image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    channels = len(mode)
    pixels = torch.randint(0, 256, (height, width, channels), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode=mode)


def _make_image_folder(root: Path) -> dict[str, str]:
    """Six images: four usable (jsonl / sidecar captions), one truncated, one uncaptioned."""
    (root / "sub").mkdir(parents=True)
    _image(24, 18, 0).save(root / "a.png")
    _image(16, 30, 1).save(root / "sub" / "b.jpg")
    _image(20, 20, 2, "RGBA").save(root / "d.png")
    _image(19, 17, 3).save(root / "c.webp")
    (root / "c.txt").write_text("a sidecar caption\n")
    buffer = io.BytesIO()
    _image(32, 32, 4).save(buffer, format="PNG")
    (root / "broken.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _image(16, 16, 5).save(root / "nocaption.png")
    captions = {
        "a.png": "a red square",
        "sub/b.jpg": "a tall picture of noise",
        "d.png": "a transparent thing",
        "broken.png": "never decoded",
    }
    lines = [json.dumps({"file": f, "caption": c}) for f, c in captions.items()]
    lines.insert(2, "{not json")
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return {**captions, "c.webp": "a sidecar caption"}


@pytest.fixture
def workspace(tmp_path: Path, tiny_models) -> tuple[Path, Path, Path, dict[str, str]]:
    vae_path, t5_path = tiny_models
    captions = _make_image_folder(tmp_path / "images")
    return tmp_path, vae_path, t5_path, captions


def test_precompute_end_to_end(workspace, caplog) -> None:
    tmp_path, vae_path, t5_path, captions = workspace
    out = tmp_path / "shards"
    caplog.set_level(logging.WARNING, logger="e2ed2.engine.data.precompute")
    index = precompute(
        tmp_path / "images",
        out,
        vae_path=vae_path,
        text_encoder_path=t5_path,
        resolution=RESOLUTION,
        caption_max_tokens=MAX_TOKENS,
        batch_size=2,
        shard_size=3,
        progress=False,
    )
    # Four usable images in sorted order. Shards hold chunks of shard_size = 3 records (the
    # reader's 7: 4 usable images, 2 unusable, 1 bad metadata line), one file per chunk.
    expected_files = ["a.png", "c.webp", "d.png", "sub/b.jpg"]
    assert index["num_samples"] == 4
    assert [s["num_samples"] for s in index["shards"]] == [1, 2, 1]
    skipped = {entry["path"]: entry["reason"] for entry in index["skipped"]}
    assert set(skipped) == {"broken.png", "nocaption.png", "captions.jsonl:3"}
    assert "unreadable image" in skipped["broken.png"]
    assert "no caption" in skipped["nocaption.png"]
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping broken.png" in warned and "skipping nocaption.png" in warned
    assert index["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert index["latent"] == {"kind": "distribution", "shape": [4, 8, 8], "dtype": "float16"}
    assert index["text"]["shape"] == [MAX_TOKENS, 16]
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["num_samples"] == 4 and on_disk["skipped"] == index["skipped"]
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "null_condition.safetensors",  # the empty prompt, for classifier-free guidance
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]

    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(out)))
    assert len(dataset) == 4
    assert dataset.files == expected_files
    assert dataset.captions == [captions[f] for f in expected_files]
    item = dataset[3]
    assert item["latents"].shape == (4, 8, 8) and item["latents"].dtype == torch.float32
    assert item["encoder_hidden_states"].shape == (MAX_TOKENS, 16)
    assert item["encoder_attention_mask"].tolist() == [1] * MAX_TOKENS  # 23 bytes, truncated
    assert int(dataset[1]["encoder_attention_mask"].sum()) == len("a sidecar caption") + 1

    # The stored values are the encoders' outputs for that image and caption.
    vae = AutoencoderKL.from_pretrained(vae_path)
    encoder = T5EncoderModel.from_pretrained(t5_path)
    pixels = load_image(tmp_path / "images" / "sub" / "b.jpg", RESOLUTION)
    with torch.no_grad():
        posterior = vae.encode(pixels[None]).latent_dist
    states, _ = encode_text(ByT5Tokenizer(), encoder, [captions["sub/b.jpg"]], MAX_TOKENS)
    from safetensors.torch import load_file

    shard = load_file(str(out / "shard-00002.safetensors"))
    torch.testing.assert_close(
        shard["latent_mean"][0].float(), posterior.mean[0], atol=2e-3, rtol=2e-3
    )
    torch.testing.assert_close(
        shard["latent_std"][0].float(), posterior.std[0], atol=2e-3, rtol=2e-3
    )
    torch.testing.assert_close(item["encoder_hidden_states"], states[0], atol=5e-3, rtol=5e-3)
    # latent = scaling_factor * (mean + std * eps): within a few stds of the scaled mean.
    deviation = (item["latents"] / 0.18215 - posterior.mean[0]) / posterior.std[0]
    assert float(deviation.abs().max()) < 6.0

    loader, _ = build_dataloader(DataConfig(source="shards", shard_dir=str(out)), batch_per_rank=2)
    batch = next(iter(loader))
    assert batch.latents.shape == (2, 4, 8, 8)


def test_pipeline_layout_overwrite_and_cli(tmp_path: Path, capsys, save_tiny_models) -> None:
    pipeline, _ = save_tiny_models(tmp_path / "pixart", pipeline_layout=True)
    _make_image_folder(tmp_path / "images")
    out = tmp_path / "shards"
    argv = [
        str(tmp_path / "images"),
        str(out),
        "--vae",
        str(pipeline),
        "--text-encoder",
        str(pipeline),
        "--resolution",
        "8",
        "--max-tokens",
        "12",
        "--shard-size",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    # One shard per chunk of 2 records (7 records, each chunk with a usable image).
    assert "wrote 4 samples in 4 shards" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["latent"]["shape"] == [4, 4, 4]
    assert index["text_encoder"]["tokenizer"].endswith("tokenizer")

    # An existing folder is kept unless --overwrite; overwriting drops the old shards.
    assert main(argv) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert main([*argv[:-3], "--shard-size", "4", "--overwrite", "--no-progress"]) == 0
    # (dot files aside: the CLI keeps its one-writer lock file in the folder)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "index.json",
        "null_condition.safetensors",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert [s["num_samples"] for s in json.loads((out / "index.json").read_text())["shards"]] == [
        2,
        2,
    ]


def test_missing_models_name_the_path_and_what_belongs_there(workspace) -> None:
    tmp_path, vae_path, t5_path, _ = workspace
    common = dict(resolution=RESOLUTION, progress=False)
    missing = tmp_path / "no-vae"
    with pytest.raises(FileNotFoundError, match=rf"vae_path '{missing}'.*AutoencoderKL"):
        precompute(
            tmp_path / "images",
            tmp_path / "o",
            vae_path=missing,
            text_encoder_path=t5_path,
            **common,
        )
    with pytest.raises(FileNotFoundError, match=r"text_encoder_path .*no config\.json.*T5"):
        precompute(
            tmp_path / "images",
            tmp_path / "o",
            vae_path=vae_path,
            text_encoder_path=tmp_path / "images",
            **common,
        )
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        precompute(
            tmp_path / "images",
            tmp_path / "o",
            vae_path=vae_path,
            text_encoder_path=t5_path,
            resolution=15,
            progress=False,
        )
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1"):
        precompute(
            tmp_path / "images",
            tmp_path / "o",
            vae_path=vae_path,
            text_encoder_path=t5_path,
            shard_size=0,
            **common,
        )


def test_load_image_resizes_the_shorter_side_and_center_crops(tmp_path: Path) -> None:
    pixels = torch.zeros(10, 40, 3, dtype=torch.uint8)
    pixels[:, 10:30] = 255  # white middle half of a wide image
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 8)  # -> 32x8, crop columns 12..20
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert float(image.min()) > 0.95  # only the white middle survives the crop
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert torch.equal(load_image(tmp_path / "clear.png", 8), torch.ones(3, 8, 8))
