"""Fault injection: named points where a test makes a run fail on purpose, set from outside.

The reliability tests need a NaN loss at step 3, a NaN gradient at step 4, a failing checkpoint
write on rank 1 of a launcher run, a VAE that overflows on one image of a precompute. Rather than each test wrapping a private method, the run reads
one plan from the environment, so the same hook works in-process, through ``e2ed2 train`` and on
every rank the launcher starts::

    E2ED2_FAULTS="nan_loss@3,nan_gradient@4"      a NaN loss at step 3, a NaN gradient at 4
    E2ED2_FAULTS="nan_loss@3-"                    every loss from step 3 on is NaN
    E2ED2_FAULTS="nan_loss@2:rank=1"              step 2's loss is NaN on rank 1 only
    E2ED2_FAULTS="fail_save:rank=1"               rank 1's DeepSpeed checkpoint writes fail (EIO)
    E2ED2_FAULTS="nan_latent@2"                   precompute's 2nd VAE call gives a NaN latent

An entry is ``POINT[@STEPS][:rank=R]``; ``STEPS`` (1-based optimizer steps) is ``N``, ``N-M`` or
``N-`` (N on); without it every step, without a rank every rank. ``E2ED2_FAIL_SAVE_RANK=R``,
the older spelling of ``fail_save:rank=R``, is still read. The points:

``nan_loss``      the generator's loss of each micro-batch of the step is NaN (tensor and logged
                  value), as a numerically broken step is (train/trainer.py)
``nan_gradient``  the loss stays finite, its gradient is NaN (train/trainer.py)
``fail_save``     inside a checkpoint save, this rank's DeepSpeed file writes raise an injected
                  ``OSError(EIO)`` (train/write_errors.py), between the save's collectives
``nan_latent``    ``e2ed2 precompute``: the first image of the worker's N-th VAE call (``@N``;
                  the rank is the precompute worker) gets a NaN latent, as a VAE overflowing on
                  it would (data/precompute.py)

Unset, the plan is empty and every check is one tuple scan. No torch at import: the command
boundary's write-error handling imports it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, cast, get_args

if TYPE_CHECKING:
    from .loss_terms import GeneratorLoss

__all__ = ["FAIL_SAVE_ENV", "FAULTS_ENV", "Fault", "FaultPlan", "FaultPoint"]

#: The plan (comma-separated entries, see the module doc).
FAULTS_ENV = "E2ED2_FAULTS"
#: ``E2ED2_FAIL_SAVE_RANK=R``: the same as ``E2ED2_FAULTS="fail_save:rank=R"``.
FAIL_SAVE_ENV = "E2ED2_FAIL_SAVE_RANK"

FaultPoint = Literal["nan_loss", "nan_gradient", "fail_save", "nan_latent"]
_POINTS: tuple[str, ...] = get_args(FaultPoint)
_ENTRY = re.compile(
    r"(?P<point>\w+)(?:@(?P<first>\d+)(?P<range>-(?P<last>\d+)?)?)?(?::rank=(?P<rank>\d+))?"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """One point failing on steps ``first_step..last_step`` (None: no end) of ``rank`` (None:
    every rank)."""

    point: FaultPoint
    first_step: int = 1
    last_step: int | None = None
    rank: int | None = None

    def hits(self, point: FaultPoint, step: int | None, rank: int) -> bool:
        """Whether ``point`` fails at 1-based ``step`` (None: a point not tied to a step) on
        ``rank``."""
        if point != self.point or (self.rank is not None and rank != self.rank):
            return False
        if step is None:
            return True
        return self.first_step <= step and (self.last_step is None or step <= self.last_step)


@dataclasses.dataclass(frozen=True, slots=True)
class FaultPlan:
    """The faults a run injects; empty (the default) injects none."""

    faults: tuple[Fault, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """The plan ``text`` spells (see the module doc); ValueError names a bad entry."""
        faults = []
        for entry in filter(None, (part.strip() for part in text.split(","))):
            match = _ENTRY.fullmatch(entry)
            if match is None or match["point"] not in _POINTS:
                raise ValueError(
                    f"{FAULTS_ENV}: {entry!r} is not POINT[@STEPS][:rank=R] with POINT one of "
                    f"{list(_POINTS)} and STEPS N, N-M or N-"
                )
            first = int(match["first"] or 1)
            if match["range"] is None:
                last = None if match["first"] is None else first
            else:
                last = None if match["last"] is None else int(match["last"])
            rank = None if match["rank"] is None else int(match["rank"])
            faults.append(Fault(cast(FaultPoint, match["point"]), first, last, rank))
        return cls(tuple(faults))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultPlan:
        """The plan :data:`FAULTS_ENV` and :data:`FAIL_SAVE_ENV` set (empty where neither is)."""
        environ = os.environ if environ is None else environ
        plan = cls.parse(environ.get(FAULTS_ENV, ""))
        rank = environ.get(FAIL_SAVE_ENV, "")
        if rank:
            if not rank.isdigit():
                raise ValueError(f"{FAIL_SAVE_ENV}={rank!r} must be a rank number")
            plan = cls((*plan.faults, Fault("fail_save", rank=int(rank))))
        return plan

    def __bool__(self) -> bool:
        return bool(self.faults)

    def hits(self, point: FaultPoint, *, rank: int, step: int | None = None) -> bool:
        """Whether any fault of the plan makes ``point`` fail at ``step`` on ``rank``."""
        return any(fault.hits(point, step, rank) for fault in self.faults)

    def on_generator_loss(self, loss: GeneratorLoss, *, step: int, rank: int) -> GeneratorLoss:
        """``loss`` with this step's ``nan_loss`` / ``nan_gradient`` applied (else itself)."""
        terms = loss.terms
        if self.hits("nan_loss", step=step, rank=rank):
            terms = terms.with_nan_loss()
        if self.hits("nan_gradient", step=step, rank=rank):
            terms = terms.with_nan_gradient()
        if terms is loss.terms:
            return loss
        return dataclasses.replace(loss, terms=terms)
