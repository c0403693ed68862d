"""The NaN/Inf policy, shared by the generator's and the discriminator's optimizer steps.

A step whose loss or gradient is non-finite on any rank is skipped on *every* rank, so the
replicas never diverge. Who skips depends on the engine:

* ZeRO 1-3 and DeepSpeed's bf16 / fp16 optimizers skip a step whose all-reduced gradient norm is
  NaN/Inf themselves (counted in ``engine.skipped_steps``); the trainer poisons a non-finite loss
  to NaN so that the norm is NaN on every rank.
* Plain fp32 without ZeRO does not: :meth:`StepGuard.step` checks the gradients (agreeing across
  ranks) and runs DeepSpeed's ``engine.step`` with the optimizer's and LR schedule's ``step``
  disabled for that one call, so DeepSpeed's own bookkeeping (micro-step counters, zero_grad)
  stays consistent. Clearing the gradients instead would still apply weight decay and momentum,
  and DeepSpeed's clipping fails on no gradients; DeepSpeed offers no public "skip this step".

Both rely on DeepSpeed internals, kept in train/deepspeed_compat.py (``skips_nonfinite_steps``,
``step_without_update``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .deepspeed_compat import skips_nonfinite_steps, step_without_update

__all__ = ["ReliabilityCounters", "StepGuard", "any_rank", "grads_finite"]


@dataclass
class ReliabilityCounters:
    """What the run skipped so far (global: summed over ranks; saved in every checkpoint)."""

    skipped_steps: int = 0
    """Optimizer steps skipped for a NaN/Inf loss or gradient."""
    skipped_disc_steps: int = 0
    """Discriminator steps skipped likewise (fp32; DeepSpeed counts bf16/fp16 ones itself)."""
    consecutive_skipped_steps: int = 0
    """Skipped optimizer steps in a row, up to now (0 after any good step)."""
    bad_samples: int = 0
    """Samples drawn that were bad (and replaced by the dataset)."""
    samples_drawn: int = 0
    """Samples drawn in all, bad ones included."""

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place (the checkpointed entry is this object); checkpoints from before a counter
        existed load it as 0."""
        for item in fields(self):
            setattr(self, item.name, int(state.get(item.name, 0)))


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over all ranks (a MAX all-reduce; the flag itself on one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    packed = torch.tensor([float(flag)], device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item())


def grads_finite(module: nn.Module) -> bool:
    return all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


class StepGuard:
    """Runs ``engine.step()`` for one DeepSpeed engine, skipping it on every rank when its
    gradients are non-finite on any rank and DeepSpeed would not skip it by itself."""

    def __init__(self, engine: Any, device: torch.device) -> None:
        self.engine = engine
        self.device = device
        # DeepSpeed skips by itself under ZeRO 1-3 and in bf16/fp16 (see the module docstring).
        self.checks_gradients = not skips_nonfinite_steps(engine)

    def step(self) -> bool:
        """``engine.step()``; True if this guard skipped the optimizer step (at a gradient
        accumulation boundary with a non-finite gradient on some rank)."""
        engine = self.engine
        if (
            self.checks_gradients
            and engine.is_gradient_accumulation_boundary()
            and any_rank(not grads_finite(engine.module), self.device)
        ):
            with step_without_update(engine):
                engine.step()
            return True
        engine.step()
        return False
