"""Every checkpoint policy gives the gradients of plain autograd; truncation and starts behave."""

from __future__ import annotations

import pytest
import torch

from e2ed2.engine import (
    SamplerConfig,
    Trajectory,
    TrajectoryConfig,
    TrajectoryPlan,
    build_schedule,
    per_step_networks,
    run_steps,
)

NUM_STEPS = 4
BATCH = 2
LATENT = (BATCH, 4, 8, 8)


def _grads(networks, policy: str, plan: TrajectoryPlan, cond, clean, seed: int = 0):
    """Loss gradients w.r.t. all parameters for one trajectory under ``policy``."""
    config = TrajectoryConfig(num_steps=NUM_STEPS, checkpoint=policy, start="noised_latent")
    trajectory = Trajectory(config, build_schedule(SamplerConfig(), NUM_STEPS))
    modules = networks if isinstance(networks, torch.nn.ModuleList) else [networks]
    for module in modules:
        module.zero_grad(set_to_none=True)
    sample, _ = trajectory(
        networks, cond, clean=clean, plan=plan, generator=torch.Generator().manual_seed(seed)
    )
    loss = (sample - clean).square().mean()
    loss.backward()
    params = [p for m in modules for p in m.parameters()]
    # Networks of steps that did not run (per-step nets, noised start) get no gradient.
    return loss.detach(), [None if p.grad is None else p.grad.detach().clone() for p in params]


def _max_relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        assert (g is None) == (r is None), "a policy changed which parameters get gradients"
        if r is None:
            continue
        scale = r.abs().max().clamp_min(1e-30)
        worst = max(worst, ((g - r).abs().max() / scale).item())
    return worst


@pytest.mark.parametrize("policy", ["step", "block", "offload", "block_offload"])
@pytest.mark.parametrize("start_index", [0, 1], ids=["from_noise", "from_noised_latent"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_step"])
def test_policies_match_plain_autograd(
    make_pixart, make_conditioning, policy: str, start_index: int, shared: bool
) -> None:
    model = make_pixart()
    networks = model if shared else per_step_networks(model, NUM_STEPS)
    if not shared:
        # Make the copies differ, so a step that used the wrong network would show.
        with torch.no_grad():
            for i, net in enumerate(networks):
                for p in net.parameters():
                    p.mul_(1.0 + 0.1 * i)
    cond = make_conditioning(BATCH)
    clean = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    plan = TrajectoryPlan(
        num_steps=NUM_STEPS, start_index=start_index, grad_start_index=start_index
    )

    ref_loss, ref = _grads(networks, "none", plan, cond, clean)
    loss, got = _grads(networks, policy, plan, cond, clean)
    assert torch.equal(loss, ref_loss) or abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    used = [r for r in ref if r is not None]
    assert len(used) >= len(ref) * (NUM_STEPS - start_index) // NUM_STEPS if not shared else used
    assert all(r.abs().sum() > 0 for r in used), "a parameter got a zero gradient: test is vacuous"
    err = _max_relative_error(got, ref)
    assert err <= 1e-5, f"{policy}: max relative gradient error {err:.3e} > 1e-5"


def test_block_policy_enables_and_restores_block_checkpointing(make_pixart, make_conditioning):
    model = make_pixart()
    schedule = build_schedule(SamplerConfig(kind="ddim"), 2)  # deterministic: no noise needed
    cond = make_conditioning(BATCH)
    run_steps(model, schedule, cond, torch.randn(LATENT), checkpoint_policy="block")
    assert model.is_gradient_checkpointing
    run_steps(model, schedule, cond, torch.randn(LATENT), checkpoint_policy="step")
    assert not model.is_gradient_checkpointing


def test_block_policy_rejects_model_without_block_checkpointing(make_conditioning) -> None:
    class Plain(torch.nn.Module):
        def forward(self, x, timestep, encoder_hidden_states, encoder_attention_mask=None):
            return x

    schedule = build_schedule(SamplerConfig(), 2)
    with pytest.raises(ValueError, match="checkpoint='block'"):
        run_steps(
            Plain(),
            schedule,
            make_conditioning(BATCH),
            torch.randn(LATENT),
            checkpoint_policy="block",
        )


@pytest.mark.parametrize("policy", ["none", "step"])
def test_last_k_truncation_equals_detached_prefix(make_pixart, make_conditioning, policy) -> None:
    """Gradients of last_k = gradients of the last k steps run from the detached prefix."""
    model = make_pixart()
    schedule = build_schedule(SamplerConfig(), NUM_STEPS)
    cond = make_conditioning(BATCH)
    g = torch.Generator().manual_seed(2)
    start = torch.randn(LATENT, generator=g)
    noises = [
        torch.randn(LATENT, generator=g) if schedule.takes_noise(i) else None
        for i in range(NUM_STEPS)
    ]
    target = torch.randn(LATENT, generator=g)

    out = run_steps(
        model, schedule, cond, start, noises=noises, grad_start_index=2, checkpoint_policy=policy
    )
    (out - target).square().mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        prefix = run_steps(model, schedule, cond, start, noises=noises, checkpoint_policy="none")
        # run only steps 0..1 by hand: the schedule's steps are pure, so re-running is exact
        x = start
        for i in range(2):
            from e2ed2.engine import denoise

            x = schedule.step(i, denoise(model, x, schedule.timestep(i), cond), x, noises[i])
    assert not torch.equal(prefix, x)  # the full run went further than the prefix
    out_ref = run_steps(
        model, schedule, cond, x, start_index=2, noises=noises, checkpoint_policy="none"
    )
    torch.testing.assert_close(out.detach(), out_ref.detach())
    (out_ref - target).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    assert _max_relative_error(got, ref) <= 1e-5


def test_plans() -> None:
    schedule = build_schedule(SamplerConfig(), NUM_STEPS)
    full = Trajectory(TrajectoryConfig(num_steps=NUM_STEPS), schedule).plan()
    assert (full.start_index, full.grad_start_index, full.num_grad_steps) == (0, 0, 4)

    last2 = Trajectory(
        TrajectoryConfig(num_steps=NUM_STEPS, truncation="last_k", grad_steps=2), schedule
    ).plan()
    assert (last2.grad_start_index, last2.num_grad_steps) == (2, 2)

    rand = Trajectory(
        TrajectoryConfig(
            num_steps=NUM_STEPS, truncation="random_k", grad_steps=3, start="noised_latent"
        ),
        schedule,
    )
    g = torch.Generator().manual_seed(0)
    plans = [rand.plan(g) for _ in range(400)]
    assert {p.start_index for p in plans} == {0, 1, 2, 3}
    for p in plans:
        assert p.start_index <= p.grad_start_index < NUM_STEPS
        assert 1 <= p.num_grad_steps <= min(3, NUM_STEPS - p.start_index)
    assert {p.num_grad_steps for p in plans if p.start_index == 0} == {1, 2, 3}


def test_noise_start_ignores_clean_latent_and_noised_start_uses_it() -> None:
    schedule = build_schedule(SamplerConfig(), NUM_STEPS)
    clean = torch.randn(LATENT)
    plan = TrajectoryPlan(num_steps=NUM_STEPS, start_index=3, grad_start_index=3)
    noised = Trajectory(TrajectoryConfig(num_steps=NUM_STEPS, start="noised_latent"), schedule)
    start, noises = noised.draw_noise(
        plan, LATENT, clean=clean, generator=torch.Generator().manual_seed(0)
    )
    eps = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(start, schedule.add_noise(clean, eps, 3))
    assert noises == [None, None, None, None]  # the last LCM step takes no noise

    pure = Trajectory(TrajectoryConfig(num_steps=NUM_STEPS), schedule)
    plan0 = pure.plan()
    start, noises = pure.draw_noise(plan0, LATENT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(start, eps)
    assert [n is not None for n in noises] == [True, True, True, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(checkpoint="full"), "trajectory.checkpoint"),
        (dict(truncation="last_k", grad_steps=5), "grad_steps"),
        (dict(start="image"), "trajectory.start"),
    ],
)
def test_config_rejects_bad_values(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrajectoryConfig(**kwargs)


def test_per_step_network_count_must_match(make_pixart, make_conditioning) -> None:
    schedule = build_schedule(SamplerConfig(), NUM_STEPS)
    nets = per_step_networks(make_pixart(), 3)
    with pytest.raises(ValueError, match="3 per-step networks for 4"):
        run_steps(nets, schedule, make_conditioning(BATCH), torch.randn(LATENT))


@pytest.mark.parametrize("start_index", [0, 1], ids=["from_noise", "from_noised_latent"])
def test_selective_policy_matches_plain_autograd(
    make_pixart, make_conditioning, start_index: int
) -> None:
    """`selective` (step checkpoints keeping matmul/attention outputs) = plain autograd."""
    model = make_pixart()
    cond = make_conditioning(BATCH)
    clean = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    plan = TrajectoryPlan(
        num_steps=NUM_STEPS, start_index=start_index, grad_start_index=start_index
    )
    ref_loss, ref = _grads(model, "none", plan, cond, clean)
    loss, got = _grads(model, "selective", plan, cond, clean)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert all(r.abs().sum() > 0 for r in ref if r is not None)
    err = _max_relative_error(got, ref)
    assert err <= 1e-5, f"selective: max relative gradient error {err:.3e} > 1e-5"


def test_selective_policy_recomputes_no_matmul(make_pixart, make_conditioning) -> None:
    """FLOPs (matmuls + attention) of `selective` equal plain autograd's: only elementwise ops
    are recomputed. (Its memory is measured by benchmarks/bench_selective_checkpointing.py: on a
    toy this small the gradient buffers, not activations, decide the peak.)"""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_pixart(sample_size=16, num_layers=2, heads=4, head_dim=16)
    cond = make_conditioning(2)
    clean = torch.randn(2, 4, 16, 16)
    flops = {}
    for policy in ("none", "step", "selective"):
        trajectory = Trajectory(
            TrajectoryConfig(num_steps=4, checkpoint=policy), build_schedule(SamplerConfig(), 4)
        )
        with FlopCounterMode(display=False) as counter:
            sample, _ = trajectory(model, cond, clean=clean)
            (sample - clean).square().mean().backward()
        model.zero_grad(set_to_none=True)
        flops[policy] = counter.get_total_flops()
    assert flops["selective"] == flops["none"] < flops["step"], flops


def test_selective_policy_rejects_a_second_context_fn(make_pixart, make_conditioning) -> None:
    schedule = build_schedule(SamplerConfig(), 2)
    with pytest.raises(ValueError, match="own context_fn"):
        run_steps(
            make_pixart(),
            schedule,
            make_conditioning(BATCH),
            torch.randn(LATENT),
            checkpoint_policy="selective",
            context_fn=lambda: None,
        )


def test_selective_policy_refuses_deepspeeds_in_place_linear(
    make_pixart, make_conditioning, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed ZeRO-3's memory_efficient_linear (process-wide F.linear replacement) adds the
    bias in place to the matmul output that `selective` keeps: wrong gradients without a word.
    `selective` refuses to run under it; the guard is not vacuous (bypassed, gradients break)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    import e2ed2.engine.core.trajectory as trajectory_module

    model = make_pixart()
    cond = make_conditioning(BATCH)
    clean = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    plan = TrajectoryPlan(num_steps=NUM_STEPS, start_index=0, grad_start_index=0)
    _, ref = _grads(model, "none", plan, cond, clean)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    with pytest.raises(RuntimeError, match="memory_efficient_linear"):
        _grads(model, "selective", plan, cond, clean)
    monkeypatch.setattr(trajectory_module, "_linear_mutates_its_matmul_output", lambda: False)
    _, got = _grads(model, "selective", plan, cond, clean)
    assert _max_relative_error(got, ref) > 1e-3
