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
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..config.objective import ObjectiveConfig
from ..config.sampler import SamplerConfig
from ..core.network import Conditioning
from ..core.sampler import SamplerSchedule, build_schedule
from ..core.trajectory import run_steps

__all__ = ["NoisePairedTeacher", "teacher_sampler_config"]


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
            "matching student (and 'ddim' / 'lcm' otherwise)"
        )
    return dataclasses.replace(student, kind="ddim", eta=0.0, timestep_spacing="trailing")


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
        self.schedule = build_schedule(
            teacher_sampler_config(objective, student_sampler), objective.teacher_steps
        )

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> NoisePairedTeacher:
        self.network.to(device=device, dtype=dtype)
        return self

    def walks_student_path(self, student_schedule: SamplerSchedule) -> bool:
        """Same sampler, same steps: the teacher follows the student's path with its noise."""
        return self.schedule == student_schedule

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
