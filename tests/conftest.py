"""Shared fixtures: tiny diffusers denoisers built from configs (no downloads)."""

from __future__ import annotations

import os
import shutil
import subprocess

# Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. Triton picks
# compiled vs interpreted when `@triton.jit` runs, including for its own standard library at
# `import triton` (which torch/diffusers trigger below), so this must come before those imports.
# nvidia-smi is the check because asking torch would import triton first.
if "TRITON_INTERPRET" not in os.environ:
    _has_gpu = shutil.which("nvidia-smi") is not None and (
        subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )
    if not _has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import PixArtTransformer2DModel  # noqa: E402

from e2ed2.engine import Conditioning  # noqa: E402
from e2ed2.engine.core.models import pixart_transformer  # noqa: E402


def tiny_pixart(
    *,
    sample_size: int = 8,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    caption_channels: int = 24,
    seed: int = 0,
    reinit_zeros: bool = True,
) -> PixArtTransformer2DModel:
    """A PixArt-α-shaped transformer (adaLN-single, cross-attention, learned sigma), tiny."""
    torch.manual_seed(seed)
    model = pixart_transformer(
        num_layers=num_layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        sample_size=sample_size,
        caption_channels=caption_channels,
    )
    # diffusers zero-initialises the output projection and adaLN; random weights make the
    # gradient comparisons meaningful (a zero layer would hide errors behind zero gradients).
    # (Off under fake tensors, whose values cannot be read.)
    if not reinit_zeros:
        return model
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def text_conditioning(
    batch: int, *, tokens: int = 7, channels: int = 24, seed: int = 1, padded: bool = True
) -> Conditioning:
    """Random text embeddings; with ``padded`` the last sample has 3 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, tokens, channels, generator=g)
    mask = None
    if padded:
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[-1, -3:] = 0
    return Conditioning(encoder_hidden_states=states, encoder_attention_mask=mask)


@pytest.fixture
def make_pixart():
    """Factory for tiny PixArt models (tests pass their own sizes)."""
    return tiny_pixart


@pytest.fixture
def make_conditioning():
    return text_conditioning
