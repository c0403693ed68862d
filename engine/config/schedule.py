"""Weight schedules of the data-side terms (the GAN's generator weight, the energy score's weight).

A data-side term can pull the student away from its teacher before the teacher term has shaped
it (issue 25: the GAN on the digits main job cost one fine-tune seed a quarter of its one-step
quality). A schedule holds such a term at 0 for ``start_step`` optimizer steps, then ramps it in
linearly over ``warmup_steps``. The sections keep flat keys (``gan.weight_schedule``,
``objective.energy_weight_schedule`` ...; TOML overrides are one level deep) and build one
:class:`WeightSchedule` from them on construction, which validates them and names the keys.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from .base import check_int

__all__ = ["SCHEDULE_KINDS", "ScheduleKind", "WeightSchedule"]

ScheduleKind = Literal["constant", "linear_warmup"]
SCHEDULE_KINDS: tuple[str, ...] = typing.get_args(ScheduleKind)


@dataclass(frozen=True)
class WeightSchedule:
    """The factor in [0, 1] a term's weight is multiplied by at each optimizer step.

    ``constant``: 1 at every step (``start_step`` and ``warmup_steps`` must be 0).
    ``linear_warmup``: 0 before ``start_step``, then ``(s - start_step + 1) / warmup_steps`` at
    0-based optimizer step ``s`` up to 1 (``warmup_steps`` 0: a step from 0 to 1 at
    ``start_step``). ``key``: the section and key prefix the error messages name (e.g.
    ``gan.weight``: its keys are ``gan.weight_schedule``, ``gan.weight_start_step`` ...).
    """

    kind: ScheduleKind = "constant"
    """``constant`` or ``linear_warmup``."""
    start_step: int = 0
    """Optimizer steps with the factor at 0 (linear_warmup only)."""
    warmup_steps: int = 0
    """Optimizer steps over which the factor rises linearly to 1 after start_step."""
    key: str = "weight"
    """The key prefix error messages name (``gan.weight``, ``objective.energy_weight``)."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"{self.key}_schedule={self.kind!r} is not one of {list(SCHEDULE_KINDS)}"
            )
        check_int(f"{self.key}_start_step", self.start_step, minimum=0)
        check_int(f"{self.key}_warmup_steps", self.warmup_steps, minimum=0)
        if self.kind == "constant" and (self.start_step or self.warmup_steps):
            raise ValueError(
                f"{self.key}_start_step / {self.key}_warmup_steps apply to "
                f"{self.key}_schedule='linear_warmup'; {self.key}_schedule='constant' needs them "
                f"0, got {self.start_step} / {self.warmup_steps}"
            )

    def factor(self, step: int) -> float:
        """The weight's factor at 0-based optimizer step ``step``."""
        if self.kind == "constant":
            return 1.0
        if step < self.start_step:
            return 0.0
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.start_step + 1) / self.warmup_steps)
