"""The autograd Function over the flash attention launchers."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .launcher import flash_backward, flash_forward

__all__ = ["FlashAttentionFunction"]


class FlashAttentionFunction(torch.autograd.Function):
    """Triton flash attention. Saves q, k, v, O and LSE; the backward recomputes P blockwise.

    Memory: besides the inputs (which autograd keeps anyway for the projections' backward) only
    ``O`` and the per-row ``LSE`` ``(B, H, Nq)`` float32 are saved, never the ``(Nq, Nk)``
    probabilities. ``keep``: None or a ``(B, Nk)`` uint8 tensor with unit stride along Nk
    (1 = attend).
    """

    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx type lacks the attributes autograd gives ctx
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor | None,
        softmax_scale: float,
    ) -> torch.Tensor:
        o, lse = flash_forward(q, k, v, keep, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, keep)
        ctx.softmax_scale = softmax_scale
        return o

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, do: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, o, lse, keep = ctx.saved_tensors
        dq, dk, dv = flash_backward(do, q, k, v, o, lse, keep, ctx.softmax_scale)
        return dq, dk, dv, None, None
