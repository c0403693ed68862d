"""PixArt-Σ end to end through its family record: a PixArtSigmaPipeline-structured folder
(SDXL-scaled VAE, T5, no size conditions at sample_size 128) -> precompute -> ``e2ed2 train
--config pixart_sigma_1024`` in the preset's own precision (bf16, ZeRO-3, guided teacher) ->
the export is a PixArtSigmaPipeline that diffusers loads and that generates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from e2ed2.engine.cli.train import main as train_main


def test_sigma_preset_trains_and_exports_a_sigma_pipeline(
    pixart_sigma_folder: Path, shards_sigma: Path, tmp_path: Path, capsys
) -> None:
    from diffusers import DiffusionPipeline, PixArtSigmaPipeline

    out = tmp_path / "run"
    args = [
        "--config",
        "pixart_sigma_1024",
        f"model.pretrained_path={pixart_sigma_folder}",
        f"model.vae_path={pixart_sigma_folder}",
        f"data.shard_dir={shards_sigma}",
        f"run.output_dir={out}",
        "run.max_steps=2",
        "run.batch_per_rank=2",
        "run.num_sample_images=2",
        "data.num_workers=0",
        "objective.teacher_steps=4",
    ]
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    export = out / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert (export / "vae").is_symlink() and (export / "text_encoder").is_symlink()
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, PixArtSigmaPipeline)
    assert pipe.vae.config.scaling_factor == 0.13025
    images = pipe(
        "a photo of a cat sitting on a red sofa",
        num_inference_steps=2,
        guidance_scale=4.5,
        height=64,
        width=64,
        max_sequence_length=16,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
