"""The autograd Function of the fused timestep embedding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .launcher import temb_backward_first, temb_forward_first

__all__ = ["TimestepEmbeddingFunction"]


class TimestepEmbeddingFunction(torch.autograd.Function):
    """Fused ``Linear_2(SiLU(Linear_1(sinusoid(t))))``; saves only ``t`` and ``h`` (B x D)."""

    @staticmethod
    def forward(
        ctx: Any,
        timesteps: torch.Tensor,
        freqs: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        scale: float,
        flip_sin_to_cos: bool,
    ) -> torch.Tensor:
        h = temb_forward_first(timesteps, freqs, w1, b1, scale, flip_sin_to_cos)
        ctx.save_for_backward(timesteps, freqs, w1, b1, w2, h)
        ctx.scale, ctx.flip_sin_to_cos = scale, flip_sin_to_cos
        return F.linear(h.to(w2.dtype), w2, b2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        timesteps, freqs, w1, b1, w2, h = ctx.saved_tensors
        dy = dy.to(w2.dtype)
        need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[2:6]
        dw2 = dy.t().mm(h.to(w2.dtype)) if need_w2 else None
        db2 = dy.sum(0) if need_b2 else None
        dw1 = db1 = None
        if need_w1 or need_b1:
            dh = dy.mm(w2)
            dw1, db1 = temb_backward_first(
                dh, timesteps, freqs, w1, b1, ctx.scale, ctx.flip_sin_to_cos
            )
        return None, None, dw1, db1, dw2, db2, None, None
