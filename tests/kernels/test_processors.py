"""A tiny PixArt with the fused kernels installed equals the stock diffusers model, grads included."""

from __future__ import annotations

import copy

import pytest
import torch

from e2ed2.kernels import (
    FlashAttnProcessor,
    FusedPixArtTimestepEmbeddings,
    install_fused_kernels,
    key_padding_mask_from_attention_mask,
)


def _forward(model, latents, text, mask, timesteps, added_cond_kwargs=None):
    out = model(
        latents,
        encoder_hidden_states=text,
        timestep=timesteps,
        encoder_attention_mask=mask,
        added_cond_kwargs=added_cond_kwargs or {"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    return out


def _output_and_grads(model, *inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    out = _forward(model, *inputs, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same(model, fused, *inputs, **kwargs):
    out, grads = _output_and_grads(model, *inputs, **kwargs)
    fused_out, fused_grads = _output_and_grads(fused, *inputs, **kwargs)
    torch.testing.assert_close(fused_out, out, atol=1e-5, rtol=1e-4)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None and fused_grads[name] is not None, name
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _inputs(batch, tokens, channels, device, sample_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, sample_size, sample_size, generator=g).to(device)
    text = torch.randn(batch, tokens, channels, generator=g).to(device)
    mask = torch.ones(batch, tokens, dtype=torch.long, device=device)
    mask[-1, -3:] = 0  # the last sample's text is padded
    timesteps = torch.tensor([999, 3, 500][:batch], device=device)
    return latents, text, mask, timesteps


def test_installed_pixart_matches_diffusers(make_pixart, device):
    model = make_pixart(heads=2, head_dim=40, num_layers=2).to(device)
    fused = copy.deepcopy(model)
    installed = install_fused_kernels(fused, backend="triton")
    assert installed == {"attention": 4, "timestep_embedding": 1}
    assert all(isinstance(p, FlashAttnProcessor) for p in fused.attn_processors.values())
    assert isinstance(fused.adaln_single.emb, FusedPixArtTimestepEmbeddings)
    _assert_same(model, fused, *_inputs(3, 7, 24, device))


def test_installed_pixart_with_additional_conditions(device):
    """PixArt-1024's resolution / aspect-ratio embedders are fused too."""
    torch.manual_seed(0)
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=48,
        sample_size=8,
        caption_channels=24,
        norm_num_groups=1,
        use_additional_conditions=True,
    ).to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    fused = copy.deepcopy(model)
    assert install_fused_kernels(fused, backend="triton") == {
        "attention": 2,
        "timestep_embedding": 3,
    }
    cond = {
        "resolution": torch.tensor([[512.0, 512.0], [1024.0, 768.0]], device=device),
        "aspect_ratio": torch.tensor([[1.0], [0.75]], device=device),
    }
    _assert_same(model, fused, *_inputs(2, 5, 24, device, seed=1), added_cond_kwargs=cond)


def test_state_dict_unchanged_and_reinstall(make_pixart):
    model = make_pixart(heads=2, head_dim=16, num_layers=1)
    keys = set(model.state_dict())
    fused = copy.deepcopy(model)
    first = install_fused_kernels(fused, backend="torch")
    assert install_fused_kernels(fused, backend="torch") == first
    assert set(fused.state_dict()) == keys
    fused.load_state_dict(model.state_dict(), strict=True)
    # Same Parameter objects as before the swap: an optimizer built earlier would still see them.
    before = make_pixart(heads=2, head_dim=16, num_layers=1)
    params = {id(p) for p in before.parameters()}
    install_fused_kernels(before, backend="torch")
    assert {id(p) for p in before.parameters()} == params
    # The torch backend (what "auto" picks on CPU) matches diffusers too.
    _assert_same(model, fused, *_inputs(2, 7, 24, "cpu"))


def test_install_errors(make_pixart):
    with pytest.raises(ValueError, match="head dim 12"):
        install_fused_kernels(make_pixart(heads=2, head_dim=12, num_layers=1))
    # The torch backend has no head-dim restriction.
    install_fused_kernels(make_pixart(heads=2, head_dim=12, num_layers=1), backend="torch")
    with pytest.raises(TypeError, match="set_attn_processor"):
        install_fused_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="adaln_single"):
        install_fused_kernels(torch.nn.Linear(2, 2), attention=False)
    with pytest.raises(ValueError, match="backend"):
        install_fused_kernels(make_pixart(num_layers=1), backend="cuda")


def test_key_padding_mask_from_attention_mask():
    tokens = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bias = ((1 - tokens.float()) * -10000.0).unsqueeze(1)  # what PixArt passes: (B, 1, L)
    expected = tokens.bool()
    assert torch.equal(key_padding_mask_from_attention_mask(bias, 2, 3), expected)
    assert torch.equal(key_padding_mask_from_attention_mask(bias.half()[:, 0], 2, 3), expected)
    assert torch.equal(key_padding_mask_from_attention_mask(expected, 2, 3), expected)
    assert key_padding_mask_from_attention_mask(None, 2, 3) is None
    with pytest.raises(ValueError, match="key padding"):
        key_padding_mask_from_attention_mask(torch.zeros(2, 4, 3), 2, 3)
    with pytest.raises(ValueError, match="does not match"):
        key_padding_mask_from_attention_mask(bias, 2, 4)


def test_installed_pixart_on_non_square_latents(make_pixart, device):
    """An aspect-ratio bucket: 6 x 10 latents (15 tokens, a sequence no tile divides)."""
    model = make_pixart(heads=2, head_dim=40, num_layers=1).to(device)
    fused = copy.deepcopy(model)
    install_fused_kernels(fused, backend="triton")
    latents, text, mask, timesteps = _inputs(2, 5, 24, device, seed=2)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 6, 10, generator=g).to(device)
    _assert_same(model, fused, latents, text, mask, timesteps)
