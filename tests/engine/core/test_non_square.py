"""Non-square latents (aspect-ratio buckets) through the differentiable unroll: every checkpoint
policy gives plain autograd's gradients, those gradients match finite differences, and the
memory estimate takes a (height, width)."""

from __future__ import annotations

import pytest
import torch

from e2ed2.engine import SamplerConfig, Trajectory, TrajectoryConfig, TrajectoryPlan, build_schedule
from e2ed2.engine.core.estimate import DenoiserShape, step_peak_bytes

NUM_STEPS = 2
LATENT = (2, 4, 6, 10)  # a wide bucket: 3 x 5 patches of 2 x 2


def _loss(model, policy: str, cond, clean: torch.Tensor) -> torch.Tensor:
    config = TrajectoryConfig(num_steps=NUM_STEPS, checkpoint=policy)
    trajectory = Trajectory(config, build_schedule(SamplerConfig(), NUM_STEPS))
    plan = TrajectoryPlan(num_steps=NUM_STEPS, start_index=0, grad_start_index=0)
    sample, _ = trajectory(
        model, cond, clean=clean, plan=plan, generator=torch.Generator().manual_seed(3)
    )
    assert sample.shape == clean.shape
    return (sample - clean).square().mean()


def test_non_square_unroll_gradients_match_across_policies(make_pixart, make_conditioning):
    model = make_pixart(sample_size=8)  # built for 8 x 8, run at 6 x 10 (pos-embed recomputed)
    cond = make_conditioning(LATENT[0])
    clean = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    grads = {}
    for policy in ("none", "step", "block"):
        model.zero_grad(set_to_none=True)
        _loss(model, policy, cond, clean).backward()
        grads[policy] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads["none"])
    for policy in ("step", "block"):
        for got, ref in zip(grads[policy], grads["none"], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_non_square_unroll_gradient_matches_finite_differences(make_pixart, make_conditioning):
    """In float64: the directional derivative of the K-step loss along a random direction of
    all weights equals the central difference (under the step checkpoint's recompute)."""
    model = make_pixart(sample_size=8, num_layers=1).double()
    cond = make_conditioning(LATENT[0])
    cond = type(cond)(cond.encoder_hidden_states.double(), cond.encoder_attention_mask)
    clean = torch.randn(LATENT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(11)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    _loss(model, "step", cond, clean).backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction, strict=True))
    eps = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            values.append(_loss(model, "none", cond, clean))
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert float(analytic) == pytest.approx(float(numeric), rel=1e-5)


def test_the_estimate_takes_a_bucket_and_grows_with_its_tokens() -> None:
    toy = DenoiserShape(
        num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_channels=16
    )
    kwargs = dict(policy="step", num_steps=2, dtype=torch.float32)
    wide = step_peak_bytes(toy, resolution_px=(64, 192), **kwargs)  # 8 x 24 latents
    assert wide == step_peak_bytes(toy, resolution_px=(64, 192), fake=False, **kwargs)
    square = step_peak_bytes(toy, resolution_px=64, **kwargs)
    assert wide > square  # three times the image tokens (text and weights stay)
