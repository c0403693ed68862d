"""A backward one sampler step at a time (core/step_cuts.py) gives plain autograd's gradients
under every checkpoint policy, and it removes the shared weights' full-size gradient sum."""

from __future__ import annotations

import pytest
import torch

from e2ed2.engine import (
    CHECKPOINT_POLICIES,
    LiveTensorTracker,
    SamplerConfig,
    Trajectory,
    TrajectoryConfig,
    TrajectoryPlan,
    build_schedule,
)
from e2ed2.engine.core.estimate import drop_full_grads
from e2ed2.engine.core.step_cuts import StepCuts

NUM_STEPS = 4
LATENT = (2, 4, 8, 8)


def _run(model, cond, clean, plan, policy: str, *, per_step: bool, guidance_scale: float = 1.0):
    """Loss, parameter gradients and the number of backward calls of one unroll."""
    config = TrajectoryConfig(num_steps=NUM_STEPS, checkpoint=policy, start="noised_latent")
    schedule = build_schedule(SamplerConfig(guidance_scale=guidance_scale), NUM_STEPS)
    trajectory = Trajectory(config, schedule)
    model.zero_grad(set_to_none=True)
    start, noises = trajectory.draw_noise(
        plan, clean.shape, clean=clean, generator=torch.Generator().manual_seed(3)
    )
    cuts = StepCuts() if per_step else None
    sample = trajectory.run(model, cond, start, noises, plan, cuts=cuts)
    loss = (sample - clean).square().mean()
    calls = 0
    for piece in cuts.pieces(loss) if per_step else [loss]:
        piece.backward()
        calls += 1
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return loss.detach(), grads, calls


@pytest.mark.parametrize("policy", CHECKPOINT_POLICIES)
@pytest.mark.parametrize(
    "start_index, grad_start_index",
    [(0, 0), (1, 1), (0, 2)],
    ids=["from_noise", "from_noised_latent", "last_2"],
)
def test_per_step_backward_matches_plain_autograd(
    make_pixart, make_conditioning, policy: str, start_index: int, grad_start_index: int
) -> None:
    model = make_pixart()
    cond = make_conditioning(LATENT[0])
    clean = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    plan = TrajectoryPlan(NUM_STEPS, start_index, grad_start_index)
    ref_loss, ref, ref_calls = _run(model, cond, clean, plan, "none", per_step=False)
    loss, got, calls = _run(model, cond, clean, plan, policy, per_step=True)
    assert (ref_calls, calls) == (1, plan.num_grad_steps)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert all(r.abs().sum() > 0 for r in ref), "a parameter got a zero gradient: test is vacuous"
    worst = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref, strict=True))
    assert worst <= 1e-5, f"{policy}: max relative gradient error {worst:.3e}"


def test_per_step_backward_with_guidance(make_pixart, make_conditioning) -> None:
    """Classifier-free guidance: each step's doubled batch is one piece's graph."""
    model = make_pixart()
    null = make_conditioning(1, seed=2, padded=False)
    cond = make_conditioning(LATENT[0]).with_unconditional(null)
    clean = torch.randn(LATENT, generator=torch.Generator().manual_seed(6))
    plan = TrajectoryPlan(NUM_STEPS, 0, 0)
    _, ref, _ = _run(model, cond, clean, plan, "none", per_step=False, guidance_scale=3.0)
    _, got, calls = _run(model, cond, clean, plan, "block", per_step=True, guidance_scale=3.0)
    assert calls == NUM_STEPS
    worst = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref, strict=True))
    assert worst <= 1e-5, f"max relative gradient error {worst:.3e}"


def test_pieces_run_once_and_need_the_previous_backward(make_pixart, make_conditioning) -> None:
    model = make_pixart()
    cond = make_conditioning(LATENT[0])
    trajectory = Trajectory(TrajectoryConfig(num_steps=2), build_schedule(SamplerConfig(), 2))
    cuts = StepCuts()
    sample, _ = trajectory(model, cond, shape=LATENT, cuts=cuts)
    pieces = cuts.pieces(sample.square().mean())
    next(pieces)  # the loss, not backpropagated
    with pytest.raises(RuntimeError, match="did not reach the cut"):
        next(pieces)
    with pytest.raises(RuntimeError, match="already run"):
        next(cuts.pieces(sample.sum()))


def _peak_bytes(model, cond, clean, num_steps: int, *, per_step: bool) -> int:
    """Device peak of one forward+backward under `block_offload`, every full gradient dropped
    once accumulated (what ZeRO-3's reduce-scatter hooks do)."""
    config = TrajectoryConfig(num_steps=num_steps, checkpoint="block_offload")
    trajectory = Trajectory(config, build_schedule(SamplerConfig(), num_steps))
    plan = trajectory.plan()
    start, noises = trajectory.draw_noise(
        plan, clean.shape, clean=clean, generator=torch.Generator().manual_seed(0)
    )
    with drop_full_grads(model), LiveTensorTracker(track_cuda=False) as tracker:
        cuts = StepCuts() if per_step else None
        sample = trajectory.run(model, cond, start, noises, plan, cuts=cuts)
        loss = (sample - clean).square().mean()
        for piece in cuts.pieces(loss) if per_step else [loss]:
            piece.backward()
    return tracker.report().peak_bytes


def test_per_step_backward_holds_no_gradient_sum(make_pixart, make_conditioning) -> None:
    """From K = 1 to 4, one backward grows the device peak by the shared weights' gradient sum
    (one full gradient of every parameter); a backward per step does not grow at all beyond the
    kept step inputs."""
    model = make_pixart(num_layers=3, heads=4, head_dim=16)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cond = make_conditioning(1)
    clean = torch.randn(1, 4, 8, 8)
    latent_bytes = clean.numel() * clean.element_size()
    whole = [_peak_bytes(model, cond, clean, k, per_step=False) for k in (1, 4)]
    stepwise = [_peak_bytes(model, cond, clean, k, per_step=True) for k in (1, 4)]
    assert stepwise[0] == whole[0]  # K = 1: one piece, nothing to cut
    growth_whole, growth_stepwise = whole[1] - whole[0], stepwise[1] - stepwise[0]
    assert growth_whole >= 0.9 * param_bytes, (whole, param_bytes)
    # The cut leaves (and their float32 gradients) are a few latents, never a gradient.
    assert growth_stepwise <= 16 * latent_bytes, (stepwise, latent_bytes)
    print(
        f"params {param_bytes / 2**20:.2f} MiB; K=1->4 growth: one backward "
        f"{growth_whole / 2**20:.2f} MiB, per step {growth_stepwise / 2**20:.3f} MiB"
    )
