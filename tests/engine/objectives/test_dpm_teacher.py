"""The DPM-Solver++(2M) teacher (objective.teacher_sampler = "dpm_solver"): diffusers' multistep
solver from the student's start noise, in place of the DDIM teacher."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from e2ed2.engine import SamplerConfig, Trajectory, TrajectoryConfig, build_schedule
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.core.sampling import generate_pixels
from e2ed2.engine.objectives.teacher import (
    NoisePairedTeacher,
    dpm_solver_sample,
    teacher_sampler_config,
)

_V = {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}


def _objective(steps: int, solver: str = "dpm_solver") -> ObjectiveConfig:
    return ObjectiveConfig(
        l2_weight=0.0, teacher_weight=1.0, teacher_steps=steps, teacher_sampler=solver
    )


def _start(batch: int, seed: int = 5) -> torch.Tensor:
    # An odd batch and an 8x8 latent of 4 channels (the tiny PixArt's).
    return torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_steps", [1, 2])
def test_one_or_two_steps_equal_the_ddim_teacher(make_pixart, make_conditioning, num_steps):
    """DPM-Solver++'s first step and (lower_order_final) its last are first order, which is
    DDIM's step: with one or two steps the two teachers give the same target."""
    model = make_pixart().eval()
    cond = make_conditioning(3)
    student = build_schedule(SamplerConfig(kind="lcm", **_V), 2)
    start = _start(3)
    dpm = NoisePairedTeacher(model, _objective(num_steps), student.config)
    ddim = NoisePairedTeacher(model, _objective(num_steps, "ddim"), student.config)
    got = dpm.sample(cond, start, student, [None, None], generators=[])
    want = ddim.sample(cond, start, student, [None, None], generators=[])
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_second_order_is_closer_to_the_ode_solution_than_ddim(make_pixart, make_conditioning):
    """At 6 network calls the 2M solver lands clearly nearer the 200-step DDIM solution (the ODE's
    solution, to within its own error) than 6-step DDIM does, and it differs from DDIM: the
    teacher is a second-order solver, not DDIM under another name."""
    model = make_pixart().eval()
    cond = make_conditioning(3)
    ddim = teacher_sampler_config(_objective(6), SamplerConfig(kind="ddim", **_V))
    start = _start(3)

    def ddim_sample(steps: int) -> torch.Tensor:
        schedule = build_schedule(ddim, steps)
        trajectory = Trajectory(TrajectoryConfig(num_steps=steps, checkpoint="none"), schedule)
        with torch.no_grad():
            return trajectory.run(model, cond, start, [None] * steps, trajectory.plan())

    reference = ddim_sample(200)
    dpm_error = (dpm_solver_sample(model, ddim, 6, cond, start) - reference).pow(2).mean()
    ddim_error = (ddim_sample(6) - reference).pow(2).mean()
    assert dpm_error < 0.7 * ddim_error
    assert (dpm_solver_sample(model, ddim, 6, cond, start) - ddim_sample(6)).abs().max() > 1e-3


def test_scoring_with_the_solver_draws_the_start_noise_of_the_deterministic_schedule(
    make_pixart, make_conditioning
):
    """generate_pixels with a solver runs it from the start noise the schedule itself would
    use: with the two-step DDIM schedule and the two-step DPM teacher the pixels agree."""
    model = make_pixart().eval()
    cond = make_conditioning(3)
    ddim = teacher_sampler_config(_objective(2), SamplerConfig(kind="ddim", **_V))
    schedule = build_schedule(ddim, 2)

    def solver(c, start):
        return dpm_solver_sample(model, ddim, 2, c, start)

    def pixels(**kwargs):
        return generate_pixels(
            model, schedule, lambda x: x, cond, (4, 8, 8), seed=7, device="cpu", **kwargs
        )

    torch.testing.assert_close(pixels(solver=solver), pixels(), rtol=1e-4, atol=1e-5)


def test_configs_the_solver_cannot_follow_are_refused() -> None:
    with pytest.raises(ValueError, match="teacher_path='student'.*teacher_sampler='ddim'"):
        dataclasses.replace(_objective(8), teacher_path="student")
    flow = SamplerConfig(kind="flow_euler", prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="cannot sample a sampler.kind='flow_euler'"):
        teacher_sampler_config(_objective(8), flow)
    clipped = SamplerConfig(kind="lcm", clip_sample=True, **_V)
    with pytest.raises(ValueError, match="clip_sample"):
        NoisePairedTeacher(torch.nn.Linear(1, 1), _objective(8), clipped)


def test_the_trainer_runs_a_step_with_the_dpm_teacher(tiny_run) -> None:
    """Through the trainer and the config loader: a finite, positive teacher loss."""
    from e2ed2.engine.config import load_config
    from e2ed2.engine.train.trainer import Trainer

    trainer = Trainer(
        load_config(
            None,
            [
                *tiny_run,
                "run.max_steps=1",
                "sampler.kind=ddim",
                "sampler.prediction_type=v_prediction",
                "trajectory.num_steps=1",
                "objective.l2_weight=0",
                "objective.teacher_weight=1",
                "objective.teacher_sampler=dpm_solver",
                "objective.teacher_steps=4",
            ],
        )
    )
    loss = trainer.train_step(iter(trainer.loader))["teacher"]
    assert 0 < loss < float("inf")
