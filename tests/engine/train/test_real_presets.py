"""The shipped PixArt presets end to end on folders with the real checkpoints' structure:
precompute (3:1, 1:1 and 3:4 images into PixArt aspect-ratio buckets) -> ``e2ed2 train --config
<preset>`` with only paths, budget and ``data.buckets`` overridden, in the preset's own precision
(bf16, ZeRO-3, fused kernels, LPIPS) on batches of non-square latents -> export -> a stock
diffusers pipeline generates a non-square image from a prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from e2ed2.engine.cli.train import main as train_main

PRESETS = {  # preset -> (pipeline folder fixture, bucketed shards fixture)
    "pixart_alpha_512": ("pixart_512_folder", "bucket_shards_512"),
    "pixart_alpha_1024": ("pixart_1024_ms_folder", "bucket_shards_1024"),
}


def _overrides(
    folder: Path, shards: Path, vgg: Path, out: Path, buckets: str = "none"
) -> list[str]:
    return [
        # paths
        f"model.pretrained_path={folder}",
        f"model.vae_path={folder}",
        f"data.shard_dir={shards}",
        f"data.buckets={buckets}",
        f"objective.lpips_backbone_path={vgg}",
        f"run.output_dir={out}",
        # budget: 2 steps of batch 2, a 2-image grid, no loader worker processes
        "run.max_steps=2",
        "run.batch_per_rank=2",
        "run.num_sample_images=2",
        "data.num_workers=0",
    ]


def _generate(export: Path, *, expect_size_conditions: bool) -> np.ndarray:
    from diffusers import DiffusionPipeline, PixArtAlphaPipeline

    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, PixArtAlphaPipeline)
    assert pipe.transformer.use_additional_conditions is expect_size_conditions
    images = pipe(
        "a photo of a cat sitting on a red sofa",
        num_inference_steps=2,
        guidance_scale=0.0,  # LCM: guidance is distilled in
        height=80,  # a 3:4 bucket's size (64 px table), non-square
        width=64,
        max_sequence_length=16,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert images.shape == (1, 80, 64, 3) and np.isfinite(images).all()
    return images


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_trains_exports_and_generates(
    preset: str, request: pytest.FixtureRequest, vgg16_features_path: Path, tmp_path: Path, capsys
) -> None:
    folder, shards = (request.getfixturevalue(name) for name in PRESETS[preset])
    out = tmp_path / "run"
    overrides = _overrides(folder, shards, vgg16_features_path, out, buckets="pixart")
    args = ["--config", preset, *overrides]
    assert train_main([*args, "--dry-run"]) == 0
    # The fake forward runs at the largest bucket (80x64 px: latents 10x8).
    assert "dry run: denoiser forward (2, 4, 10, 8)" in capsys.readouterr().out
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    # Each of the three buckets holds one batch of 2 per epoch: the 2 steps ran two shapes.
    export = out / "export"
    assert (export / "model_index.json").is_file() and (export / "vae").is_symlink()
    assert (out / "samples").is_dir()
    _generate(export, expect_size_conditions=preset == "pixart_alpha_1024")


def test_dry_run_catches_missing_size_conditions(
    pixart_1024_ms_folder, shards_1024, vgg16_features_path, tmp_path, monkeypatch, capsys
) -> None:
    """The crash the 1024 preset had at step 1 (no size conditions in the batch) now fails the
    dry run, naming them."""
    from e2ed2.engine.core.network import Conditioning
    from e2ed2.engine.train import dry_run

    def text_only(batch):
        return Conditioning(batch.encoder_hidden_states, batch.encoder_attention_mask)

    monkeypatch.setattr(dry_run, "batch_conditioning", text_only)
    overrides = _overrides(pixart_1024_ms_folder, shards_1024, vgg16_features_path, tmp_path)
    assert train_main(["--config", "pixart_alpha_1024", *overrides, "--dry-run"]) == 2
    assert "uses additional conditions" in capsys.readouterr().err


@pytest.mark.slow
def test_preset_1024_on_two_launcher_ranks(
    pixart_1024_ms_folder,
    bucket_shards_1024,
    vgg16_features_path,
    tmp_path,
    run_checked,
    deepspeed_command,
) -> None:
    """Two ranks, one sample each: every global batch is one bucket, split across the ranks."""
    out = tmp_path / "run"
    overrides = _overrides(
        pixart_1024_ms_folder, bucket_shards_1024, vgg16_features_path, out, buckets="pixart"
    )
    overrides[overrides.index("run.batch_per_rank=2")] = "run.batch_per_rank=1"
    run_checked(
        deepspeed_command(
            "--module",
            "e2ed2.engine.cli.train",
            "--config",
            "pixart_alpha_1024",
            *overrides,
        )
    )
    _generate(out / "export", expect_size_conditions=True)
