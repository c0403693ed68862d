"""The LCM-path teacher (objective.teacher_path = "student"): it walks the student's own path with
the same start and injected noises, each x0 prediction replaced by a deterministic DDIM solve."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from e2ed2.engine import SamplerConfig, Trajectory, TrajectoryConfig, build_schedule
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.core.network import denoise
from e2ed2.engine.objectives.losses import E2ED2Loss
from e2ed2.engine.objectives.teacher import NoisePairedTeacher, solve_schedule, solve_steps

_V = {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}


def _objective(steps: int, path: str = "student") -> ObjectiveConfig:
    return ObjectiveConfig(
        l2_weight=0.0, teacher_weight=1.0, teacher_steps=steps, teacher_path=path
    )


def _draw(schedule, batch: int, seed: int = 3):
    trajectory = Trajectory(TrajectoryConfig(num_steps=schedule.num_steps), schedule)
    plan = trajectory.plan()
    g = torch.Generator().manual_seed(seed)
    start, noises = trajectory.draw_noise(plan, (batch, 4, 8, 8), generator=g)
    return trajectory, plan, start, noises


def _student_states(model, schedule, cond, start, noises):
    """s_0 .. s_{K-1} and the final sample of the student's own sampler, step by step."""
    states, x = [], start
    with torch.no_grad():
        for i in range(schedule.num_steps):
            states.append(x)
            out = denoise(model, x, schedule.timestep(i), cond)
            x = schedule.step(i, out, x, noises[i])
    return states, x


@pytest.mark.parametrize(("kind", "num_steps"), [("lcm", 4), ("ddim", 2)])
def test_teacher_equal_to_the_student_walks_its_states_and_gives_loss_zero(
    make_pixart, make_conditioning, kind: str, num_steps: int
) -> None:
    """The student's own weights and one solve step per state (teacher_steps = 1: the solve is
    the network's x0 prediction): the teacher's state sequence is the student's, its target the
    student's K-step sample, and the teacher loss is 0 (up to float32 rounding of the x0 -> output
    -> x0 round trip); with 8 solve steps the target differs."""
    model = make_pixart().eval()
    cond = make_conditioning(2)
    schedule = build_schedule(SamplerConfig(kind=kind, **_V), num_steps)
    trajectory, plan, start, noises = _draw(schedule, 2)
    assert kind == "ddim" or all(n is not None for n in noises[:-1])
    teacher = NoisePairedTeacher(model, _objective(1), schedule.config)
    assert [teacher.solve(int(t)).num_steps for t in schedule.timesteps] == [1] * num_steps
    states: list[torch.Tensor] = []
    target = teacher.path_sample(cond, start, schedule, noises, states=states)
    want_states, want_final = _student_states(model, schedule, cond, start, noises)
    assert len(states) == num_steps
    for got, want in zip(states, want_states, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target, want_final, rtol=1e-5, atol=1e-5)
    sample = trajectory.run(model, cond, start, noises, plan)  # with its graph, "step" policy
    loss = E2ED2Loss(_objective(1))(sample, torch.zeros_like(sample), teacher_sample=target)
    assert loss["teacher"].item() < 1e-10
    further = NoisePairedTeacher(model, _objective(8), schedule.config)
    other = further.sample(cond, start, schedule, noises, generators=[])
    assert (other - want_final).pow(2).mean() > 1e-4


def test_solves_shrink_with_the_noise_level_and_start_on_diffusers_grid() -> None:
    """teacher_steps = 16 on LCM's K = 4 grid (t = 999/759/499/259): 16, 12, 8, 4 DDIM steps;
    from t = 999 the grid is DDIMScheduler's trailing one, and every solve ends at x0."""
    lcm = build_schedule(SamplerConfig(kind="lcm", **_V), 4)
    assert lcm.timesteps == (999, 759, 499, 259)
    assert [solve_steps(16, int(t), 1000) for t in lcm.timesteps] == [16, 12, 8, 4]
    ddim = SamplerConfig(kind="ddim", eta=0.0, **_V)
    full = solve_schedule(ddim, 999, 16)
    assert full.timesteps == build_schedule(ddim, 16).timesteps
    low = solve_schedule(ddim, 259, 4)
    assert low.timesteps[0] == 259 and len(low.timesteps) == 4
    assert list(low.timesteps) == sorted(low.timesteps, reverse=True)
    # The last step lands on the clean sample (set_alpha_to_one): x_next = x0 exactly.
    assert low.sqrt_alpha_prod_next[-1] == 1.0 and low.direction_scale[-1] == 0.0
    assert not any(low.takes_noise(i) for i in range(4))


def test_path_target_sees_the_injected_noise_the_start_teacher_does_not(
    make_pixart, make_conditioning
) -> None:
    """LCM K = 2: changing the noise injected after step 0 moves the path teacher's target and
    leaves the start-noise teacher's unchanged; the frozen copy ignores later student updates."""
    model = make_pixart().eval()
    cond = make_conditioning(2)
    schedule = build_schedule(SamplerConfig(kind="lcm", **_V), 2)
    _, _, start, noises = _draw(schedule, 2)
    changed = [noises[0] + 1.0, noises[1]]
    path = NoisePairedTeacher(model, _objective(8), schedule.config)
    first = path.sample(cond, start, schedule, noises, generators=[])
    assert (path.sample(cond, start, schedule, changed, generators=[]) - first).abs().max() > 1e-3
    origin = NoisePairedTeacher(model, _objective(8, "start"), schedule.config)
    g = [torch.Generator().manual_seed(9) for _ in range(2)]
    torch.testing.assert_close(
        origin.sample(cond, start, schedule, noises, g),
        origin.sample(cond, start, schedule, changed, g),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(path.sample(cond, start, schedule, noises, generators=[]), first)


def test_gradients_through_the_student_match_plain_autograd(make_pixart, make_conditioning):
    """The target carries no graph; the student's gradients under the "step" checkpoint policy
    equal plain autograd's (the unroll is the one every other term uses)."""
    model = make_pixart()
    cond = make_conditioning(2)
    schedule = build_schedule(SamplerConfig(kind="lcm", **_V), 2)
    teacher = NoisePairedTeacher(model, _objective(4), schedule.config)
    _, plan, start, noises = _draw(schedule, 2)
    target = teacher.sample(cond, start, schedule, noises, generators=[])
    assert not target.requires_grad
    grads = []
    for policy in ("none", "step"):
        trajectory = Trajectory(TrajectoryConfig(num_steps=2, checkpoint=policy), schedule)
        model.zero_grad(set_to_none=True)
        sample = trajectory.run(model, cond, start, noises, plan)
        E2ED2Loss(_objective(4))(sample, target, teacher_sample=target)["total"].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_path_teacher_needs_a_ddim_solver_and_a_sampler_with_x0_predictions() -> None:
    with pytest.raises(ValueError, match="teacher_path='student'.*teacher_sampler='ddim'"):
        dataclasses.replace(_objective(16), teacher_sampler="lcm")
    with pytest.raises(ValueError, match="teacher_path="):
        dataclasses.replace(_objective(16), teacher_path="noise")


_PATH_RUN = [
    "run.max_steps=1",
    "run.batch_per_rank=2",
    "run.num_sample_images=0",
    "run.export_at_end=false",
    "run.deepspeed_config=none",
    "model.num_layers=1",
    "data.resolution=8",
    "sampler.kind=lcm",
    "sampler.prediction_type=v_prediction",
    "trajectory.num_steps=4",
    "objective.l2_weight=0",
    "objective.teacher_weight=1",
    "objective.teacher_sampler=ddim",
    "objective.teacher_path=student",
]


def test_the_trainer_hands_the_student_noises_to_the_path_teacher(tmp_path) -> None:
    """Through the trainer (its seeded per-sample start and LCM noises): one solve step per
    state gives a first-step teacher loss of 0; 16 solve steps a positive one."""
    from e2ed2.engine.config import load_config
    from e2ed2.engine.train.trainer import Trainer

    same = Trainer(
        load_config(
            None, [f"run.output_dir={tmp_path / 'a'}", *_PATH_RUN, "objective.teacher_steps=1"]
        )
    )
    assert same.train_step(iter(same.loader))["teacher"] < 1e-10
    more = Trainer(
        load_config(
            None, [f"run.output_dir={tmp_path / 'b'}", *_PATH_RUN, "objective.teacher_steps=16"]
        )
    )
    assert more.train_step(iter(more.loader))["teacher"] > 1e-6
