"""Exponential moving average of the denoiser's weights, sharded like the weights themselves.

Under ZeRO-3 each rank holds only its partition of every parameter (DeepSpeed's ``ds_tensor``,
read through train/deepspeed_compat.py's ``local_partition``); the EMA
keeps an fp32 shadow of exactly that partition, so EMA memory per rank is 1/N of the model (the
paper's EMA, decay 0.95, at no replicated cost). Under ZeRO-0/1/2 parameters are whole on every
rank and so is the shadow. To use the EMA weights (export, sampling), :meth:`ShardedEMA.swapped`
copies the shadow into the parameters and restores them afterwards; ZeRO-3 then gathers the swapped
partitions as usual.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..config.ema import EmaConfig
from .deepspeed_compat import local_partition

__all__ = ["EmaConfig", "ShardedEMA"]


class ShardedEMA:
    """``shadow = decay * shadow + (1 - decay) * param`` on each rank's own partition (fp32)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [local_partition(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(local_partition(param).float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, model has {len(self.shadow)}")
        for i, shadow in enumerate(self.shadow):
            saved = state[f"shadow.{i}"]
            if saved.shape != shadow.shape:
                raise ValueError(
                    f"EMA tensor {i} has shape {tuple(saved.shape)}, this rank's partition is "
                    f"{tuple(shadow.shape)} (different model or number of ranks?)"
                )
            shadow.copy_(saved)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Parameters hold the EMA weights inside the block, the trained weights after it."""
        backup = [local_partition(p).detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for shadow, param in zip(self.shadow, self.params, strict=True):
                    local_partition(param).copy_(shadow)
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.params, strict=True):
                    local_partition(param).copy_(saved)
