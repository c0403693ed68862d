"""The consistency-distillation baseline of experiments/ (issue 25): its solver, boundary
conditions and EMA target behave as the LCM paper defines them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from e2ed2.engine import SamplerConfig
from e2ed2.engine.core.network import denoise

_PATH = Path(__file__).resolve().parents[2] / "experiments" / "consistency_distill.py"
_spec = importlib.util.spec_from_file_location("consistency_distill", _PATH)
cd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cd)

_LCM = SamplerConfig(kind="lcm", prediction_type="v_prediction")


def test_solver_is_diffusers_ddim_step_over_the_skip_and_f_is_identity_at_zero(
    make_pixart, make_conditioning
) -> None:
    model = make_pixart().eval()
    cond = make_conditioning(2)
    distiller = cd.ConsistencyDistiller(model, _LCM, lr=1e-3)
    assert distiller.skip == 20 and distiller.grid[0] == 19 and distiller.grid[-1] == 999
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = 759
    got = distiller.ddim_solve(x, torch.tensor([t, t]), torch.tensor([t - 20, t - 20]), cond)
    ddim = DDIMScheduler(
        prediction_type="v_prediction", timestep_spacing="leading", clip_sample=False
    )
    ddim.set_timesteps(50)
    with torch.no_grad():
        want = ddim.step(denoise(model, x, t, cond), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Boundary condition: f(x, 0) = x (c_skip(0) = 1, c_out(0) = 0); near-pure x0 at t = 999.
    assert abs(distiller.c_skip[0] - 1) < 1e-6 and abs(distiller.c_out[0]) < 1e-6
    assert distiller.c_skip[999] < 1e-6 and abs(distiller.c_out[999] - 1) < 1e-6


def test_one_step_trains_the_student_and_moves_the_target_by_its_ema(
    make_pixart, make_conditioning
) -> None:
    model = make_pixart()
    cond = make_conditioning(2)
    distiller = cd.ConsistencyDistiller(model, _LCM, lr=1e-3)
    teacher_before = [p.clone() for p in distiller.teacher.parameters()]
    target_before = [p.clone() for p in distiller.target.parameters()]
    clean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = distiller.step(clean, cond, torch.Generator().manual_seed(2))
    assert loss > 0
    for p, q in zip(distiller.teacher.parameters(), teacher_before, strict=True):
        assert torch.equal(p, q)
    moved = 0
    for target, before, student in zip(
        distiller.target.parameters(), target_before, distiller.student.parameters(), strict=True
    ):
        want = cd.TARGET_EMA * before + (1 - cd.TARGET_EMA) * student
        torch.testing.assert_close(target, want)
        moved += int(not torch.equal(student, before))
    assert moved > 0, "the student did not change"
