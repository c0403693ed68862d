"""PixArt-MS's size conditions through the network seam, and frozen decoders under bf16."""

from __future__ import annotations

import pytest
import torch

from e2ed2.engine.core.models import FrozenVAE
from e2ed2.engine.core.network import (
    Conditioning,
    denoise,
    pixart_size_conditions,
    uses_size_conditions,
)


def _text(batch: int) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    return Conditioning(
        torch.randn(batch, 5, 24, generator=g), torch.ones(batch, 5, dtype=torch.long)
    )


def test_pixart_ms_needs_and_uses_size_conditions(real_models) -> None:
    model = real_models.tiny_pixart_real(128)  # sample_size 128 -> diffusers turns them on
    assert uses_size_conditions(model) and not uses_size_conditions(
        real_models.tiny_pixart_real(64)
    )
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="additional conditions.*resolution"):
        denoise(model, x, 500, _text(2))
    sizes = pixart_size_conditions([1024, 768], [1024, 1344])
    assert sizes["resolution"].tolist() == [[1024.0, 1024.0], [768.0, 1344.0]]
    assert sizes["aspect_ratio"][:, 0].tolist() == pytest.approx([1.0, 768 / 1344])
    cond = Conditioning(_text(2).encoder_hidden_states, None, sizes)
    with torch.no_grad():
        out = denoise(model, x, 500, cond)
        # The conditions reach the model: another size gives another prediction.
        other = denoise(
            model,
            x,
            500,
            Conditioning(
                cond.encoder_hidden_states, None, pixart_size_conditions([512, 512], [512, 256])
            ),
        )
    assert out.shape == x.shape and not torch.allclose(out, other)
    # .to() keeps them, in float32 whatever the text dtype.
    moved = cond.to("cpu", torch.bfloat16)
    assert moved.encoder_hidden_states.dtype == torch.bfloat16
    assert moved.added_cond_kwargs["aspect_ratio"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"added_cond_kwargs\['resolution'\] must be \(2, 2\)"):
        Conditioning(cond.encoder_hidden_states, None, {"resolution": torch.ones(2, 3)})


def test_frozen_vae_decodes_a_bf16_sample(real_models) -> None:
    vae = FrozenVAE(real_models.tiny_sd_vae())  # fp32 weights, as loaded
    sample = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    pixels = vae.decode(sample)  # used to fail: "Input type (c10::BFloat16) and bias type (float)"
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    pixels.float().mean().backward()
    assert sample.grad is not None and sample.grad.dtype == torch.bfloat16
    assert vae.scaling_factor == pytest.approx(0.18215)
