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
from e2ed2.engine.core.step_cuts import CutUnroll, StepCuts

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


def _coupled_loss(sample: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """L2 to the target plus a term coupling each pair of rows (as the energy score couples a
    prompt's m samples), so that passes splitting a pair must still get its gradient right."""
    pairs = (sample[0::2] - sample[1::2]).flatten(1).norm(dim=1).mean()
    return (sample - clean).square().mean() - 0.1 * pairs


def _unroll_grads(model, cond, clean, policy: str, unroll: CutUnroll | None):
    schedule = build_schedule(SamplerConfig(), NUM_STEPS)
    trajectory = Trajectory(TrajectoryConfig(num_steps=NUM_STEPS, checkpoint=policy), schedule)
    plan = trajectory.plan()
    start, noises = trajectory.draw_noise(
        plan, clean.shape, clean=clean, generator=torch.Generator().manual_seed(4)
    )
    model.zero_grad(set_to_none=True)
    if unroll is None:
        sample = trajectory.run(model, cond, start, noises, plan)
        loss = _coupled_loss(sample, clean)
        loss.backward()
        calls = 1
    else:
        sample = unroll.run(trajectory, model, cond, start, noises, plan)
        loss = _coupled_loss(sample, clean)
        calls = 0
        for piece in unroll.pieces(loss, loss_divisor=2):
            piece.backward()
            calls += 1
        assert calls == unroll.num_pieces
        for p in model.parameters():
            p.grad.mul_(2)  # undo the loss divisor (gradient accumulation steps)
    return sample.detach(), [p.grad.clone() for p in model.parameters()], calls


@pytest.mark.parametrize("policy", ["step", "block_offload"])
@pytest.mark.parametrize("rows_per_pass", [0, 1, 3])
@pytest.mark.parametrize("per_step", [False, True], ids=["whole", "per_step"])
def test_passes_match_one_batch(
    make_pixart, make_conditioning, policy: str, rows_per_pass: int, per_step: bool
) -> None:
    """4 rows in passes of 1 or 3 (the last pass shorter), with or without the step cuts: the
    same final samples and the gradients of one plain unroll, under a loss coupling the rows."""
    model = make_pixart()
    rows = 4
    cond = make_conditioning(rows)
    clean = torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ref_sample, ref, _ = _unroll_grads(model, cond, clean, "none", None)
    unroll = CutUnroll(per_step=per_step, rows_per_pass=rows_per_pass)
    sample, got, calls = _unroll_grads(model, cond, clean, policy, unroll)
    passes = -(-rows // (rows_per_pass or rows))
    assert calls == passes * (NUM_STEPS if per_step else 1)
    # Row counts change the matmul blocking: float32 rounding differs, nothing more.
    torch.testing.assert_close(sample, ref_sample, rtol=1e-4, atol=1e-4)
    # Relative to the largest gradient element: the attention key biases' gradients are zero in
    # exact arithmetic (softmax ignores a per-row shift), ~1e-6 of rounding noise here, and
    # other row counts give other noise.
    scale = max(r.abs().max() for r in ref)
    worst = max(((g - r).abs().max() / scale).item() for g, r in zip(got, ref, strict=True))
    assert worst <= 1e-5, f"max relative gradient error {worst:.3e}"


def test_passes_bound_the_activation_peak(make_pixart, make_conditioning) -> None:
    """`step` policy, 8 rows: passes of 2 rows hold about a quarter of one batch's activations
    (the 8 rows' kept step inputs and final samples aside)."""
    model = make_pixart(num_layers=2, heads=4, head_dim=16)
    rows = 8
    cond = make_conditioning(rows)
    clean = torch.randn(rows, 4, 8, 8)
    schedule = build_schedule(SamplerConfig(), NUM_STEPS)
    trajectory = Trajectory(TrajectoryConfig(num_steps=NUM_STEPS), schedule)
    plan = trajectory.plan()
    start, noises = trajectory.draw_noise(plan, clean.shape, clean=clean)
    peaks = {}
    for rows_per_pass in (0, 2):
        unroll = CutUnroll(per_step=True, rows_per_pass=rows_per_pass)
        with drop_full_grads(model), LiveTensorTracker(track_cuda=False) as tracker:
            sample = unroll.run(trajectory, model, cond, start, noises, plan)
            for piece in unroll.pieces((sample - clean).square().mean()):
                piece.backward()
        peaks[rows_per_pass] = tracker.report().peak_bytes
    assert peaks[2] <= 0.45 * peaks[0], peaks
    print(f"8 rows, one pass {peaks[0] / 2**20:.2f} MiB, passes of 2: {peaks[2] / 2**20:.2f} MiB")
