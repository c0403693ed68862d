"""Fused timestep embedding vs diffusers' Timesteps + TimestepEmbedding: outputs and weight grads."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch._subclasses.fake_tensor import FakeTensorMode

from e2ed2.kernels import FusedTimestepEmbedding, timestep_embedding, timestep_embedding_reference

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 1e-2)}


def _diffusers_pair(
    out_dim: int, dtype: torch.dtype, device: str, *, flip: bool = True, shift: float = 0.0
) -> tuple[Timesteps, TimestepEmbedding]:
    torch.manual_seed(0)
    proj = Timesteps(256, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    return proj, TimestepEmbedding(256, out_dim).to(device, dtype)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 8, 37])
def test_fused_matches_diffusers(batch, dtype, device):
    proj, embedder = _diffusers_pair(48, dtype, device)
    timesteps = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(batch))
    timesteps = timesteps.to(device)
    # PixArt: the sinusoid is cast to the hidden dtype, then the embedder runs.
    expected = embedder(proj(timesteps).to(dtype))
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2)).to(
        device, dtype
    )
    expected.backward(grad_out)
    expected_grads = _grads(embedder)

    fused = FusedTimestepEmbedding.from_diffusers(proj, embedder, backend="triton")
    out = fused(timesteps)
    out.backward(grad_out)
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.detach(), atol=atol, rtol=rtol)
    for name, grad in _grads(embedder).items():  # the fused module trains the same Linears
        torch.testing.assert_close(grad, expected_grads[name], atol=atol, rtol=rtol, msg=name)


def test_other_sinusoid_settings_and_float_timesteps(device):
    """``flip_sin_to_cos=False``, a frequency shift, and non-integer timesteps near 1000."""
    proj, embedder = _diffusers_pair(40, torch.float32, device, flip=False, shift=1.0)
    timesteps = torch.tensor([0.0, 0.5, 17.25, 999.0, 999.75, 512.125], device=device)
    expected = embedder(proj(timesteps))
    expected.square().sum().backward()
    expected_grads = _grads(embedder)
    fused = FusedTimestepEmbedding.from_diffusers(proj, embedder, backend="triton")
    out = fused(timesteps)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    for name, grad in _grads(embedder).items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_reference_is_diffusers():
    """The torch backend / reference restates diffusers' ops exactly (bitwise on CPU)."""
    proj, embedder = _diffusers_pair(32, torch.float32, "cpu")
    timesteps = torch.arange(0, 1000, 111)
    expected = embedder(proj(timesteps))
    weights = (embedder.linear_1.weight, embedder.linear_1.bias)
    weights += (embedder.linear_2.weight, embedder.linear_2.bias)
    assert torch.equal(timestep_embedding_reference(timesteps, *weights), expected)
    assert torch.equal(timestep_embedding(timesteps, *weights, backend="torch"), expected)


def test_fake_tensors_trace_with_auto_backend():
    proj, embedder = _diffusers_pair(32, torch.float32, "cpu")
    fused = FusedTimestepEmbedding.from_diffusers(proj, embedder)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = fused(torch.zeros(3, dtype=torch.long))
        assert out.shape == (3, 32)
    assert not fused._freqs  # nothing fake was cached for later real calls


def test_state_dict_compatible_and_zero3_external_parameters():
    proj, embedder = _diffusers_pair(32, torch.float32, "cpu")
    fused = FusedTimestepEmbedding.from_diffusers(proj, embedder)
    assert fused.state_dict().keys() == embedder.state_dict().keys()
    assert fused.linear_1 is embedder.linear_1 and fused.linear_2 is embedder.linear_2
    other = TimestepEmbedding(256, 32)
    fused.load_state_dict(other.state_dict())
    assert torch.equal(fused.linear_2.weight, other.linear_2.weight)
    # DeepSpeed ZeRO-3 gathers parameters per module; the fused forward reads its children's
    # weights without calling them, so they are registered as its external parameters (not as a
    # leaf module, whose once-per-call gradient hook breaks under K calls per iteration; the
    # 2-rank ZeRO-3 launcher test trains with the fused kernels).
    external = {id(p) for _, p in fused.ds_external_parameters()}
    assert external == {id(p) for p in embedder.parameters()}
    assert not getattr(fused, "_z3_leaf", False)


def test_errors(device):
    proj, embedder = _diffusers_pair(32, torch.float32, device)
    weights = [p.detach() for p in embedder.parameters()]
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 1, device=device), *weights, backend="triton")
    with pytest.raises(ValueError, match="not differentiate"):
        timestep_embedding(torch.zeros(2, device=device, requires_grad=True), *weights)
    small = TimestepEmbedding(48, 32).to(device)  # 24 frequencies: not a power of two
    with pytest.raises(ValueError, match="power of two"):
        timestep_embedding(
            torch.zeros(2, device=device),
            *[p.detach() for p in small.parameters()],
            backend="triton",
        )
    with pytest.raises(ValueError, match="only SiLU"):
        FusedTimestepEmbedding.from_diffusers(proj, TimestepEmbedding(256, 32, act_fn="mish"))
    with pytest.raises(ValueError, match="channels"):
        FusedTimestepEmbedding.from_diffusers(Timesteps(128, True, 0), embedder)


def test_hidden_size_not_a_multiple_of_8_and_unaligned_weight(device):
    """D = 36: ``h`` / ``dh`` rows are padded to 40 for the kernels' alignment contract; a W1
    view at an odd offset is copied. Outputs and gradients still match diffusers."""
    proj, embedder = _diffusers_pair(36, torch.float32, device)
    timesteps = torch.tensor([3.0, 999.0, 500.0], device=device)
    expected = embedder(proj(timesteps))
    expected.square().sum().backward()
    expected_grads = _grads(embedder)
    fused = FusedTimestepEmbedding.from_diffusers(proj, embedder, backend="triton")
    out = fused(timesteps)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    for name, grad in _grads(embedder).items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # A W1 that lives 1 element into a flat buffer (16-byte misaligned).
    flat = torch.zeros(embedder.linear_1.weight.numel() + 1, device=device)
    flat[1:] = embedder.linear_1.weight.detach().flatten()
    w1 = flat[1:].view_as(embedder.linear_1.weight)
    weights = (w1, embedder.linear_1.bias, embedder.linear_2.weight, embedder.linear_2.bias)
    out = timestep_embedding(timesteps, *[w.detach() for w in weights], backend="triton")
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)


def test_torch_backend_module_runs_its_linear_modules():
    """The torch fallback is diffusers' module structure (hooks on the Linears fire), not the
    test reference, and it matches diffusers bitwise on CPU."""
    proj, embedder = _diffusers_pair(32, torch.float32, "cpu")
    fused = FusedTimestepEmbedding.from_diffusers(proj, embedder, backend="torch")
    calls = []
    for linear in (fused.linear_1, fused.linear_2):
        linear.register_forward_hook(lambda module, args, out: calls.append(module))
    timesteps = torch.arange(0, 1000, 97)
    out = fused(timesteps)
    assert calls == [fused.linear_1, fused.linear_2]
    calls.clear()
    assert torch.equal(out, embedder(proj(timesteps)))
