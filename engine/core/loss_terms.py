"""One micro-batch's loss as a typed record: the tensor to backpropagate and its named terms.

The trainer logs each term under its name (metrics.jsonl, TensorBoard ``loss/<name>``); the loss
itself is logged as ``"total"`` by the E2ED2 objective and as ``"diffusion"`` by the plain
diffusion loss, its only term. :func:`total_key` is the one place that says which, so nothing
reads the loss by guessing between the two names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

__all__ = ["DIFFUSION_KEY", "TOTAL_KEY", "GeneratorLoss", "LossTerms", "total_key"]

#: The E2ED2 objective's loss (the weighted sum of its terms), as logged.
TOTAL_KEY = "total"
#: The diffusion objective's loss, its only term, as logged.
DIFFUSION_KEY = "diffusion"


def total_key(objective_kind: str) -> str:
    """The name the loss of ``objective.kind`` is logged under."""
    return DIFFUSION_KEY if objective_kind == "diffusion" else TOTAL_KEY


@dataclasses.dataclass(frozen=True, slots=True)
class LossTerms:
    """The generator's loss of one micro-batch and every term the trainer logs for it."""

    #: () the loss that is backpropagated.
    total: torch.Tensor
    #: Each logged term's value by its name; the loss's own value under :attr:`total_key`.
    logged: Mapping[str, float]
    #: Where :attr:`logged` holds the loss: :data:`TOTAL_KEY` or :data:`DIFFUSION_KEY`.
    total_key: str = TOTAL_KEY

    def __post_init__(self) -> None:
        if self.total_key not in self.logged:
            raise ValueError(
                f"the logged terms {sorted(self.logged)} lack the loss's {self.total_key!r}"
            )

    @property
    def total_value(self) -> float:
        """The loss as logged (a Python float, read once when the terms were made)."""
        return self.logged[self.total_key]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.total_value)

    def with_nan_loss(self) -> LossTerms:
        """The same terms with a NaN loss (tensor and logged value): what a numerically broken
        step looks like to the trainer (core/faults.py's ``nan_loss``)."""
        logged = {**self.logged, self.total_key: float("nan")}
        return dataclasses.replace(self, total=self.total * float("nan"), logged=logged)

    def with_nan_gradient(self) -> LossTerms:
        """The same finite loss whose gradient is NaN (core/faults.py's ``nan_gradient``)."""
        total = self.total.clone()  # a hook on the clone leaves the caller's tensor alone
        total.register_hook(lambda grad: grad * float("nan"))
        return dataclasses.replace(self, total=total)


@dataclasses.dataclass(frozen=True, slots=True)
class GeneratorLoss:
    """What one micro-batch's generator pass gives the trainer's step."""

    terms: LossTerms
    #: (R, 3, H, W) the decoded target pixels, the discriminator's "real" (GAN only, else None).
    real_pixels: torch.Tensor | None = None
    #: (R, 3, H, W) the decoded generated pixels, its "fake" (GAN only, else None).
    fake_pixels: torch.Tensor | None = None
