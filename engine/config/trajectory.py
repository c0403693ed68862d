"""``[trajectory]``: how the K-step unroll is run and differentiated (see core/trajectory.py)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Literal

from .base import check_fields

__all__ = ["CHECKPOINT_POLICIES", "CheckpointPolicy", "TrajectoryConfig"]

CheckpointPolicy = Literal["none", "step", "block", "offload", "block_offload", "selective"]
Truncation = Literal["full", "last_k", "random_k"]
StartKind = Literal["noise", "noised_latent"]

CHECKPOINT_POLICIES: tuple[str, ...] = typing.get_args(CheckpointPolicy)
# torch device strings the offload policy can copy to (checked without importing torch).
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|xpu|xpu:\d+|npu|npu:\d+|mps)$")


@dataclass(frozen=True)
class TrajectoryConfig:
    """How the K-step trajectory is run and differentiated."""

    num_steps: int = 4
    """K: sampler steps run with gradients from the start to the final sample."""
    checkpoint: CheckpointPolicy = "step"
    """Memory policy of the unroll: none, step, block, offload, block_offload or selective
    (core/trajectory.py). block_offload: block's device memory at step's compute, block inputs on
    the host (offload_device).
    """
    truncation: Truncation = "full"
    """Backprop through every step (full), the last grad_steps (last_k) or a random 1..grad_steps
    (random_k).
    """
    grad_steps: int = 1
    """k for ``last_k``; the largest k for ``random_k``. Ignored for ``full``."""
    start: StartKind = "noise"
    """Start from pure noise, or from the clean latent noised to a random sampler step
    (noised_latent).
    """
    offload_device: str = "cpu"
    """Where ``offload`` / ``block_offload`` keep what they offload (a torch device, e.g. cpu)."""
    num_steps_choices: tuple[int, ...] = ()
    """K drawn per optimizer step (uniformly, the same on every rank) from these, e.g. [1, 2, 4]:
    one network trained for several step budgets; a K listed twice is drawn twice as often
    ([1, 1, 2, 4]: K = 1 half the time). Empty = always num_steps, which must be one of the
    choices (it stays the K of sample grids and of the export's default).
    """
    per_step_backward: bool = False
    """Backpropagate one sampler step at a time, each step as one DeepSpeed micro-step
    (core/step_cuts.py, train/step_backward.py): ZeRO-2/3 then reduce and free each step's
    gradient contribution as it is produced, instead of autograd holding a full-size sum of the
    shared weights' gradients across the K steps (PixArt-α-XL/2: 1.14 GiB per rank in bf16).
    Same gradients and compute under every checkpoint policy; costs K x the gradient
    reduce-scatter traffic per micro-batch. Needs one shared network and bf16 / fp32.
    """
    samples_per_prompt: int = 1
    """m: trajectories run per prompt (independent start and step noise, same conditioning),
    as one batch of batch_per_rank x m (or in passes: rows_per_pass); the energy score needs
    m >= 2.
    """
    rows_per_pass: int = 0
    """Unroll at most this many of a micro-batch's batch_per_rank x m rows at once, in sequential
    passes whose backwards run one after the other (core/step_cuts.py); the loss still sees every
    row. 0 = all rows in one pass. Bounds the activation memory of the checkpointed policies by
    these rows instead of the micro-batch's (m trajectories per prompt without m times the
    activations), at the cost of smaller network calls; ``none`` / ``selective`` keep every
    pass's activations until its backward and gain little. Needs bf16 / fp32 when it splits.
    """

    def __post_init__(self) -> None:
        check_fields("trajectory", self)
        if self.num_steps_choices:
            if any(k < 1 for k in self.num_steps_choices):
                raise ValueError(
                    f"trajectory.num_steps_choices must all be >= 1, got {list(self.num_steps_choices)}"
                )
            if self.num_steps not in self.num_steps_choices:
                raise ValueError(
                    f"trajectory.num_steps={self.num_steps} must be one of "
                    f"trajectory.num_steps_choices={list(self.num_steps_choices)}"
                )
        if self.rows_per_pass < 0:
            raise ValueError(f"trajectory.rows_per_pass must be >= 0, got {self.rows_per_pass}")
        if self.samples_per_prompt < 1:
            raise ValueError(
                f"trajectory.samples_per_prompt must be >= 1, got {self.samples_per_prompt}"
            )
        if self.num_steps < 1:
            raise ValueError(f"trajectory.num_steps must be >= 1, got {self.num_steps}")
        if not isinstance(self.offload_device, str) or not _DEVICE.match(self.offload_device):
            raise ValueError(
                f"trajectory.offload_device={self.offload_device!r} is not a torch device; use "
                "cpu (the host, the usual choice), cuda or cuda:N"
            )
        if self.truncation != "full" and not 1 <= self.grad_steps <= self.num_steps:
            raise ValueError(
                f"trajectory.grad_steps must be in 1..num_steps={self.num_steps} for "
                f"truncation={self.truncation!r}, got {self.grad_steps}"
            )
