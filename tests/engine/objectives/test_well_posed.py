"""Well-posed objectives through the unroll: the energy score (m samples per prompt) and
noise-paired teacher targets."""

from __future__ import annotations

import math

import pytest
import torch

from e2ed2.engine import SamplerConfig, Trajectory, TrajectoryConfig, build_schedule
from e2ed2.engine.config import load_config
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.core.network import repeat_conditioning
from e2ed2.engine.objectives.energy import energy_score
from e2ed2.engine.objectives.losses import E2ED2Loss


def _closed_form_1d(mu: float, sigma: float, y: float, lam: float) -> float:
    """E|X - y| - lam/2 E|X - X'| for X, X' ~ N(mu, sigma^2) (beta = 1)."""
    z = (y - mu) / sigma
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    expected_abs = sigma * 2 * phi + (y - mu) * (2 * cdf - 1)
    return expected_abs - lam / 2 * (2 * sigma / math.sqrt(math.pi))


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_energy_score_estimator_equals_its_closed_form_on_gaussians(lam: float) -> None:
    """The U-statistic over m samples is unbiased: its mean over many prompts matches the closed
    form within 4 standard errors of that mean."""
    g = torch.Generator().manual_seed(0)
    mu, sigma, y, prompts, m = 0.3, 0.8, 1.1, 400, 8
    samples = mu + sigma * torch.randn(prompts, m, 1, generator=g)
    target = torch.full((prompts, 1), y)
    per_prompt = torch.stack(
        [energy_score(samples[i : i + 1], target[i : i + 1], lam=lam) for i in range(prompts)]
    )
    expected = _closed_form_1d(mu, sigma, y, lam)
    stderr = per_prompt.std().item() / math.sqrt(prompts)
    assert abs(per_prompt.mean().item() - expected) < 4 * stderr, (per_prompt.mean(), expected)
    assert abs(energy_score(samples, target, lam=lam).item() - per_prompt.mean().item()) < 1e-5


def test_energy_score_in_d_dims_uses_rms_distances() -> None:
    """In D dims the distance is ‖·‖ / sqrt(D): a sample repeated over D dims scores as in 1-D."""
    g = torch.Generator().manual_seed(1)
    one = torch.randn(3, 4, 1, generator=g)
    target = torch.randn(3, 1, generator=g)
    wide = one.expand(3, 4, 16)
    assert torch.allclose(
        energy_score(wide, target.expand(3, 16)), energy_score(one, target), atol=1e-6
    )


def _fit_location_scale(loss_name: str, steps: int = 600) -> tuple[float, float]:
    """Fits x = mu + s * eps to data y ~ N(2, 0.5^2) by SGD on the given loss (m = 4)."""
    g = torch.Generator().manual_seed(2)
    mu = torch.tensor(0.0, requires_grad=True)
    log_s = torch.tensor(0.0, requires_grad=True)
    optimizer = torch.optim.Adam([mu, log_s], lr=0.03)
    for _ in range(steps):
        y = 2.0 + 0.5 * torch.randn(64, 1, generator=g)
        eps = torch.randn(64, 4, 1, generator=g)
        x = mu + log_s.exp() * eps
        # Energy: the proper scoring rule. L2: the distance of every sample to the data point.
        loss = energy_score(x, y) if loss_name == "energy" else (x - y[:, None]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mu.item(), log_s.exp().item()


def test_energy_score_recovers_the_data_scale_where_l2_collapses_it() -> None:
    mu_energy, s_energy = _fit_location_scale("energy")
    mu_l2, s_l2 = _fit_location_scale("l2")
    assert abs(mu_energy - 2.0) < 0.1 and abs(s_energy - 0.5) < 0.08, (mu_energy, s_energy)
    assert abs(mu_l2 - 2.0) < 0.1, mu_l2
    # L2 drives the spread towards 0 (its minimiser is the point mass at the mean).
    assert s_l2 < 0.1, f"L2 should collapse the spread to the mean, got scale {s_l2}"


def test_energy_score_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="m >= 2"):
        energy_score(torch.zeros(2, 1, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"beta must be in \(0, 2\)"):
        energy_score(torch.zeros(2, 2, 3), torch.zeros(2, 3), beta=2.0)
    with pytest.raises(ValueError, match="do not match"):
        energy_score(torch.zeros(2, 2, 3), torch.zeros(2, 4))
    # Identical samples (zero distances) still give finite gradients.
    x = torch.zeros(2, 3, 5, requires_grad=True)
    energy_score(x, torch.ones(2, 5)).backward()
    assert torch.isfinite(x.grad).all()


def _m_trajectory_grads(model, policy: str, cond, clean, m: int) -> list[torch.Tensor]:
    num_steps = 3
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=num_steps, checkpoint=policy),
        build_schedule(SamplerConfig(), num_steps),
    )
    loss_fn = E2ED2Loss(ObjectiveConfig(l2_weight=0.5, energy_weight=1.0))
    model.zero_grad(set_to_none=True)
    rows = clean.repeat_interleave(m, dim=0)
    sample, _ = trajectory(
        model,
        repeat_conditioning(cond, m),
        clean=rows,
        generator=torch.Generator().manual_seed(3),
    )
    loss_fn(sample, rows, samples_per_prompt=m)["total"].backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", ["step", "block", "block_offload", "selective"])
def test_m_trajectories_per_prompt_give_the_gradients_of_plain_autograd(
    make_pixart, make_conditioning, policy: str
) -> None:
    model = make_pixart()
    cond = make_conditioning(2)
    clean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    reference = _m_trajectory_grads(model, "none", cond, clean, m=3)
    got = _m_trajectory_grads(model, policy, cond, clean, m=3)
    assert all(r.abs().sum() > 0 for r in reference), "a zero gradient makes the test vacuous"
    worst = max(
        ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for g, r in zip(got, reference, strict=True)
    )
    assert worst <= 1e-5, f"{policy}: max relative gradient error {worst:.3e}"


_TEACHER_RUN = [
    "run.max_steps=1",
    "run.batch_per_rank=2",
    "run.num_sample_images=0",
    "run.export_at_end=false",
    "run.deepspeed_config=none",
    "model.num_layers=1",
    "data.resolution=8",
    "trajectory.num_steps=2",
    "trajectory.samples_per_prompt=2",
    "objective.l2_weight=0",
    "objective.teacher_weight=1",
    "objective.teacher_sampler=lcm",
]


def test_teacher_equal_to_the_student_with_k_steps_gives_exactly_zero(tmp_path) -> None:
    """Teacher = the initial student, its own sampler (LCM) and teacher_steps = K: the teacher
    walks the student's path from the same noise, so the first step's teacher loss is 0.0; with
    more teacher steps the target differs and the loss is positive."""
    from e2ed2.engine.train.trainer import Trainer

    same = Trainer(
        load_config(
            None,
            [f"run.output_dir={tmp_path / 'same'}", *_TEACHER_RUN, "objective.teacher_steps=2"],
        )
    )
    assert same.teacher.walks_student_path(same.schedule)
    assert same.train_step(iter(same.loader))["teacher"] == 0.0
    more = Trainer(
        load_config(
            None,
            [f"run.output_dir={tmp_path / 'more'}", *_TEACHER_RUN, "objective.teacher_steps=8"],
        )
    )
    assert not more.teacher.walks_student_path(more.schedule)
    assert more.train_step(iter(more.loader))["teacher"] > 0


def test_a_mix_of_step_counts_trains_each_k_and_stays_in_sync(tmp_path) -> None:
    """trajectory.num_steps_choices: the step's K is drawn from the plan seed (every rank
    alike); over a few steps more than one K is used, each with its own schedule."""
    from e2ed2.engine.train.trainer import Trainer

    trainer = Trainer(
        load_config(
            None,
            [
                f"run.output_dir={tmp_path}",
                *[o for o in _TEACHER_RUN if not o.startswith("trajectory.num_steps")],
                "trajectory.num_steps=2",
                "trajectory.num_steps_choices=[1, 2, 4]",
                "objective.teacher_sampler=ddim",
                "objective.teacher_steps=8",
            ],
        )
    )
    used = set()
    for step in range(6):
        trainer.step = step
        trajectory, plan = trainer._plan()
        assert trajectory.schedule.num_steps == plan.num_steps
        used.add(plan.num_steps)
    assert used <= {1, 2, 4} and len(used) >= 2, used
    trainer.step = 0
    assert trainer.train_step(iter(trainer.loader))["teacher"] > 0
