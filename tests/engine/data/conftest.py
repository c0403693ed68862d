"""Fixtures of the data tests: a tiny local VAE and T5 (+ ByT5 tokenizer) for precompute."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

#: The tiny VAE's sample size (it downsamples x2 into 4 latent channels).
TINY_RESOLUTION = 16


def _save_models(root: Path, *, pipeline_layout: bool = False) -> tuple[Path, Path]:
    """A tiny AutoencoderKL (x2 downsampling, 4 latent channels) and a tiny T5 + ByT5 tokenizer."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
    )
    tokenizer = ByT5Tokenizer()
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            dropout_rate=0.0,
        )
    )
    if pipeline_layout:  # PixArt's folder layout: vae/, text_encoder/, tokenizer/
        vae.save_pretrained(root / "vae")
        encoder.save_pretrained(root / "text_encoder")
        tokenizer.save_pretrained(root / "tokenizer")
        return root, root
    vae.save_pretrained(root / "vae")
    encoder.save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    return root / "vae", root / "t5"


@pytest.fixture(scope="session")
def save_tiny_models() -> Callable[..., tuple[Path, Path]]:
    """``save(root, pipeline_layout=False) -> (vae path, text encoder path)``."""
    return _save_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(vae folder, T5 folder with its ByT5 tokenizer), written once per session."""
    return _save_models(tmp_path_factory.mktemp("tiny_models"))
