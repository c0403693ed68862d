"""Noise-paired teacher targets: trajectory distillation (Luhman & Luhman 2021, Sec. 3).

With the start noise independent of the data target, a distance to the data on the final sample
is minimised by the per-prompt mean image. Here the target of each trajectory depends on its
start noise instead: a frozen copy of the *pretrained* denoiser samples from the same start
``x_T`` with more steps (no graph), and the student's K-step sample is pulled towards it. The
map noise -> teacher sample is a function, so its minimiser is that function, not an average.

The teacher runs deterministically when it can (DDIM with eta = 0, ``trailing`` spacing so that
its first step is the student's pure-noise timestep); with the student's own sampler and as many
steps it reuses the student's per-step noise, so teacher = student gives a loss of exactly 0.

Classifier-free guidance: the teacher guides at the student's ``sampler.guidance_scale`` (its
sampler config is the student's with another kind or step count), with the same conditioning and
empty prompt: a guided teacher, the usual setup of guided distillation, and no second key to
keep in step with the first. An unguided student of a guided teacher is not offered.

``objective.teacher_path = "student"`` (the LCM-path teacher): LCM re-noises between steps with
fresh noise, so its K-step sample depends on the injected noises too, and a target drawn from the
start noise alone cannot see them (L2 then averages them out: the mean-image collapse at K > 1).
This teacher walks the student's own path instead, with the same start and the same injected
noises, and replaces each x0 prediction with a deterministic DDIM (eta 0) solve from that state::

    s_0 = x_T;   for i in 0..K-1:
        x0_i    = DDIM solve of the frozen base from (s_i, t_i) to 0 in n_i steps   (no graph)
        s_{i+1} = the student's step i with x0_i as its x0 prediction and noise_i
    target = s_K   (LCM: c_out * x0_{K-1} + c_skip * s_{K-1}; DDIM: x0_{K-1})

``n_i = max(1, round(teacher_steps * (t_i + 1) / num_train_timesteps))``: the solve's steps in
proportion to the noise level left (teacher_steps = 16, LCM K = 4 at t = 999/759/499/259: 16, 12,
8 and 4 steps). Each solve is a trailing grid from t_i down, its last step to the clean sample
(``final_alpha_cumprod``). With one solve step per state (teacher_steps = 1) the solve is the
base's own x0 prediction: teacher = student walks the student's states exactly (loss 0). The
target is a function of the start and injected noises alone, so its L2 minimiser is that
function again. Hand-written DDIM coefficients (:func:`solve_schedule`): diffusers' DDIMScheduler
cannot start its grid at an arbitrary timestep; the formulas are those of core/sampler.py.

``objective.teacher_sampler = "dpm_solver"``: the start-noise teacher samples with diffusers'
DPM-Solver++(2M) (Lu et al. 2022; ``DPMSolverMultistepScheduler``, deterministic, over the
student's beta schedule and prediction type with trailing spacing, first order at the last
step, which lands on the clean sample). The teacher needs no graph, so diffusers' scheduler runs
it as it is. A second-order multistep solver reaches a given sample quality in fewer network
calls than DDIM; the teacher's calls are most of a training step's (16 no-grad calls against
the student's one to four with backward). On the digits base, sampling seeds 0-2: DPM-Solver++
8 steps 36.8 digit FD against DDIM 16 steps 37.5; 16 steps 32.2 against DDIM 32 steps 34.3
(issue 25, fifth batch). Its first step is first order, which is DDIM's step, so with one or two
steps it equals the DDIM teacher (tested).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from ..config.objective import ObjectiveConfig
from ..config.sampler import SamplerConfig
from ..core.network import Conditioning, denoise
from ..core.sampler import SamplerSchedule, build_schedule
from ..core.trajectory import run_steps

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

__all__ = [
    "NoisePairedTeacher",
    "dpm_solver_sample",
    "dpm_solver_scheduler",
    "solve_schedule",
    "solve_steps",
    "teacher_sampler_config",
]

#: The DDIM config fields DPMSolverMultistepScheduler shares (the beta schedule, the prediction
#: type and the grid); DDIM's clip_sample has no counterpart there and is refused when on.
_DPM_SOLVER_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
)


def teacher_sampler_config(objective: ObjectiveConfig, student: SamplerConfig) -> SamplerConfig:
    """The teacher's sampler: the student's own, or deterministic DDIM over the same schedule.

    Flow matching (``flow_euler``) is deterministic already: its teacher is the student's own
    sampler with more Euler steps; DDIM / LCM cannot sample a velocity network.
    """
    if objective.teacher_sampler == student.kind:
        return student
    if "flow_euler" in (student.kind, objective.teacher_sampler):
        raise ValueError(
            f"objective.teacher_sampler={objective.teacher_sampler!r} cannot sample a "
            f"sampler.kind={student.kind!r} model; use teacher_sampler='flow_euler' for a flow "
            "matching student (and 'ddim' / 'lcm' / 'dpm_solver' otherwise)"
        )
    if objective.teacher_sampler == "dpm_solver" and student.kind not in ("ddim", "lcm"):
        raise ValueError(
            "objective.teacher_sampler='dpm_solver' samples an epsilon / v network over a beta "
            f"schedule: a sampler.kind 'ddim' or 'lcm' student, got {student.kind!r}"
        )
    # dpm_solver: DPMSolverMultistepScheduler is built from this DDIM config (dpm_solver_scheduler).
    return dataclasses.replace(student, kind="ddim", eta=0.0, timestep_spacing="trailing")


def dpm_solver_scheduler(sampler: SamplerConfig, num_steps: int) -> Any:
    """A fresh DPM-Solver++(2M) scheduler over ``sampler``'s beta schedule, prediction type and
    timestep spacing, set to ``num_steps`` steps (fresh: it keeps the solver's history)."""
    # lazy: diffusers adds seconds over torch; only this teacher needs it here
    from diffusers.schedulers.scheduling_dpmsolver_multistep import (
        DPMSolverMultistepScheduler,
    )

    if sampler.kind != "ddim" or sampler.clip_sample:
        raise ValueError(
            "objective.teacher_sampler='dpm_solver' builds on a DDIM config without clip_sample "
            f"(teacher_sampler_config), got sampler.kind={sampler.kind!r}, "
            f"clip_sample={sampler.clip_sample}; set sampler.clip_sample=false or use "
            "teacher_sampler='ddim'"
        )
    kwargs = {
        key: value for key, value in sampler.diffusers_kwargs().items() if key in _DPM_SOLVER_KEYS
    }
    scheduler = DPMSolverMultistepScheduler(
        **kwargs,
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def dpm_solver_sample(
    network: nn.Module,
    sampler: SamplerConfig,
    num_steps: int,
    cond: Conditioning,
    start: torch.Tensor,
) -> torch.Tensor:
    """DPM-Solver++(2M) in ``num_steps`` steps from ``start`` (B, C, h, w) pure noise to the clean
    sample, guided as ``sampler`` guides (``denoise``); no graph."""
    scheduler = dpm_solver_scheduler(sampler, num_steps)
    x = start * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = denoise(
            network,
            x,
            int(t),
            cond,
            guidance_scale=sampler.guidance_scale,
            embedded_guidance=sampler.embedded_guidance_scale,
        )
        x = scheduler.step(output, t, x, return_dict=False)[0]
    return x


def solve_steps(teacher_steps: int, timestep: int, num_train_timesteps: int) -> int:
    """DDIM steps of the path teacher's solve from ``timestep``: ``teacher_steps`` from pure noise
    (t = T - 1), fewer in proportion to the noise level left, at least one."""
    return max(1, round(teacher_steps * (timestep + 1) / num_train_timesteps))


def solve_schedule(config: SamplerConfig, timestep: int, num_steps: int) -> SamplerSchedule:
    """Deterministic DDIM (eta 0) in ``num_steps`` steps from ``timestep`` to the clean sample.

    The grid is diffusers' trailing spacing started at ``timestep`` instead of T - 1:
    ``round(arange(t + 1, 0, -(t + 1) / n)) - 1`` (from t = T - 1 it is diffusers' own grid);
    each step moves to the next grid point, the last one to ``final_alpha_cumprod``. ``config``:
    the DDIM sampler (teacher_sampler_config) whose beta schedule and prediction type it uses.
    """
    if not 0 <= timestep < config.num_train_timesteps or num_steps < 1:
        raise ValueError(f"no DDIM solve of {num_steps} steps from timestep {timestep}")
    num_steps = min(num_steps, timestep + 1)  # at most one step per discrete timestep
    scheduler = cast("DDIMScheduler", config.to_diffusers())  # the DDIM sampler (see above)
    acp = scheduler.alphas_cumprod  # float32, as diffusers indexes it
    final = scheduler.final_alpha_cumprod
    grid = np.round(np.arange(timestep + 1, 0, -(timestep + 1) / num_steps)).astype(np.int64) - 1
    timesteps = [int(t) for t in grid[:num_steps]]
    sqrt_a, sqrt_1ma, sqrt_a_next, direction = [], [], [], []
    for i, t in enumerate(timesteps):
        alpha_next = acp[timesteps[i + 1]] if i + 1 < num_steps else final
        sqrt_a.append(float(acp[t] ** 0.5))
        sqrt_1ma.append(float((1 - acp[t]) ** 0.5))
        sqrt_a_next.append(float(alpha_next**0.5))
        direction.append(float((1 - alpha_next) ** 0.5))
    return SamplerSchedule(
        config=dataclasses.replace(config, kind="ddim", eta=0.0),
        timesteps=tuple(timesteps),
        sqrt_alpha_prod=tuple(sqrt_a),
        sqrt_one_minus_alpha_prod=tuple(sqrt_1ma),
        sqrt_alpha_prod_next=tuple(sqrt_a_next),
        c_skip=(0.0,) * num_steps,
        c_out=(1.0,) * num_steps,
        direction_scale=tuple(direction),
        noise_scale=(0.0,) * num_steps,
    )


def _output_for_clean(
    schedule: SamplerSchedule, index: int, clean: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """The network output at step ``index`` whose x0 prediction is ``clean`` (the inverse of
    ``predict_clean`` without clipping), so the student's own ``step`` makes the transition."""
    a, b = schedule.sqrt_alpha_prod[index], schedule.sqrt_one_minus_alpha_prod[index]
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return (sample - a * clean) / b
    if kind == "v_prediction":
        return (a * sample - clean) / b
    return clean


class NoisePairedTeacher:
    """A frozen copy of the pretrained denoiser that samples targets from given start noise.

    ``pretrained`` is copied (before DeepSpeed wraps or partitions the trained one): the teacher
    is no ``nn.Module`` child of anything trained, so DeepSpeed, the optimizer and checkpoints
    never see its parameters; it is rebuilt from the pretrained weights on every start.
    """

    def __init__(
        self,
        pretrained: nn.Module,
        objective: ObjectiveConfig,
        student_sampler: SamplerConfig,
    ) -> None:
        self.network = copy.deepcopy(pretrained).requires_grad_(False).eval()
        self.sampler = teacher_sampler_config(objective, student_sampler)
        self.schedule = build_schedule(self.sampler, objective.teacher_steps)
        self.path = objective.teacher_path
        self.steps = objective.teacher_steps
        self.solver = objective.teacher_sampler
        if self.solver == "dpm_solver":
            dpm_solver_scheduler(self.sampler, self.steps)  # refuses a config it cannot follow
        if self.path == "student" and student_sampler.kind not in ("lcm", "ddim"):
            raise ValueError(
                "objective.teacher_path='student' needs sampler.kind 'lcm' or 'ddim' (a sampler "
                f"with x0 predictions to replace), got {student_sampler.kind!r}"
            )
        self._solves: dict[tuple[int, int], SamplerSchedule] = {}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> NoisePairedTeacher:
        self.network.to(device=device, dtype=dtype)
        return self

    def walks_student_path(self, student_schedule: SamplerSchedule) -> bool:
        """The teacher follows the student's path with its noise: teacher_path = "student", or
        the student's own sampler with as many steps."""
        if self.solver == "dpm_solver":
            return False
        return self.path == "student" or self.schedule == student_schedule

    def solve(self, timestep: int) -> SamplerSchedule:
        """The path teacher's DDIM solve from ``timestep`` (cached per timestep)."""
        n = solve_steps(self.steps, timestep, self.sampler.num_train_timesteps)
        key = (timestep, n)
        if key not in self._solves:
            self._solves[key] = solve_schedule(self.sampler, timestep, n)
        return self._solves[key]

    @torch.no_grad()
    def path_sample(
        self,
        cond: Conditioning,
        start: torch.Tensor,
        student_schedule: SamplerSchedule,
        student_noises: Sequence[torch.Tensor | None],
        states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The LCM-path target (module docstring): the student's steps from ``start`` with its
        noises, each x0 prediction replaced by a DDIM solve of the base from that state.
        ``states``: when given, receives s_0 .. s_{K-1} (the states the solves start from)."""
        x = start
        for i in range(student_schedule.num_steps):
            if states is not None:
                states.append(x)
            t = int(student_schedule.timestep(i))
            clean = run_steps(self.network, self.solve(t), cond, x, checkpoint_policy="none")
            # The student's step recomputes x0 from this output (and clips it as it would its own).
            output = _output_for_clean(student_schedule, i, clean, x)
            x = student_schedule.step(i, output, x, student_noises[i])
        return x.detach()

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        start: torch.Tensor,
        student_schedule: SamplerSchedule,
        student_noises: Sequence[torch.Tensor | None],
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """The teacher's final sample from the student's ``start`` (B, C, h, w).

        ``generators[j]`` draws sample j's per-step noise when the teacher's sampler injects
        noise on a path of its own (LCM with another step count); unused otherwise.
        """
        if self.path == "student":
            return self.path_sample(cond, start, student_schedule, student_noises)
        if self.solver == "dpm_solver":
            return dpm_solver_sample(self.network, self.sampler, self.steps, cond, start).detach()
        if self.walks_student_path(student_schedule):
            noises = list(student_noises)
        else:
            noises = []
            for i in range(self.schedule.num_steps):
                if not self.schedule.takes_noise(i):
                    noises.append(None)
                    continue
                one = start[:1]
                noises.append(
                    torch.cat(
                        [
                            torch.randn(
                                one.shape, generator=g, device=start.device, dtype=start.dtype
                            )
                            for g in generators
                        ]
                    )
                )
        return run_steps(
            self.network, self.schedule, cond, start, noises=noises, checkpoint_policy="none"
        ).detach()
