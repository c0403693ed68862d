"""Exports are diffusers pipeline folders; the embedded digits' one loads without e2ed2."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from e2ed2.engine.config import load_config
from e2ed2.engine.core.models import build_denoiser
from e2ed2.engine.train.export import load_exported_networks, write_export


def test_digits_export_is_a_pipeline_with_its_text_encoder(tmp_path: Path) -> None:
    from diffusers import PixArtAlphaPipeline

    config = load_config(None, ["model.num_layers=1", "trajectory.num_steps=2"])
    torch.manual_seed(0)
    model = build_denoiser(config.model, latent_channels=1, latent_size=16, text_dim=64)
    export = write_export(tmp_path / "export", config, model, model.state_dict())
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline" and index["vae"] == [None, None]
    assert index["tokenizer"] == ["transformers", "ByT5Tokenizer"]
    # Pixel space: no VAE; the "latents" the pipeline returns are the 1-channel images.
    pipe = PixArtAlphaPipeline.from_pretrained(export, vae=None)
    images = pipe(
        "a handwritten digit three",
        num_inference_steps=2,
        guidance_scale=0.0,
        height=8 * 16,  # the pipeline assumes an 8x VAE
        width=8 * 16,
        use_resolution_binning=False,
        output_type="latent",
    ).images
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()
    # e2ed2's own loader reads the same folder (and an old export without model_index.json).
    (export / "model_index.json").unlink()
    loaded = load_exported_networks(export, 2)
    assert torch.equal(
        loaded.state_dict()["proj_out.weight"], model.state_dict()["proj_out.weight"]
    )
