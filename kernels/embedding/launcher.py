"""Fused timestep embedding launchers: tiles, the alignment fallback, grids.

The first Linear (with the sinusoid and SiLU) is Triton; the second is cuBLAS (``F.linear`` in
the Function). Inputs: ``timesteps`` ``(B,)`` and ``freqs`` ``(C/2,)`` contiguous float32 /
integer, ``w1`` ``(D, C)``, ``b1`` ``(D,)``; views of ``w1`` / ``dh`` that break the kernels'
alignment contract (16-byte pointers, row strides multiples of 8) are copied, then asserted.

Tiles: fixed (no autotuning: the op is launch-bound), each checked for sm_80 / sm_90 by
``e2ed2.kernels.static_check`` (no spills, 128-bit weight loads); reasons next to the constants.
"""

from __future__ import annotations

import torch
import triton

from .._triton import (
    INTERPRETED,
    aligned_empty,
    aligned_for_kernel,
    check_aligned,
    device_guard,
    dot_precision,
)
from .kernels import _temb_bwd_kernel, _temb_fwd_kernel

__all__ = ["temb_backward_first", "temb_forward_first"]


# Tiles: BLOCK_B >= 16 is tl.dot's minimum (batches of 8 are padded); BLOCK_J keeps the two
# (BLOCK_J, 128) weight halves plus the fp32 dW1 accumulators in registers.
_BLOCK_B = 16
# Forward: 64 outputs a program (18 programs for D = 1152) with 8 warps, 61-64 registers; with 4
# warps ptxas holds this kernel to 96 registers and spills 16 B on sm_80 and sm_90 (checked by
# the static check).
_FWD_BLOCK_J = 32 if INTERPRETED else 64
_FWD_NUM_WARPS = 8
# Backward: 32 rows of dW1 a program (36 programs), 4 warps, 168 registers, no spill.
_BWD_BLOCK_J = 32
_BWD_NUM_WARPS = 4


def temb_forward_first(
    timesteps: torch.Tensor,
    freqs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    scale: float,
    flip_sin_to_cos: bool,
) -> torch.Tensor:
    """Launch the forward kernel: ``h = silu(Linear_1(sinusoid(t)))``, ``(B, D)`` in W1's dtype."""
    n_rows, n_out = timesteps.shape[0], w1.shape[0]
    w1 = aligned_for_kernel(w1)
    h = aligned_empty((n_rows, n_out), device=w1.device, dtype=w1.dtype)
    check_aligned(w1=w1, h=h)
    grid = (triton.cdiv(n_rows, _BLOCK_B), triton.cdiv(n_out, _FWD_BLOCK_J))
    with device_guard(w1.device):
        _temb_fwd_kernel[grid](
            timesteps,
            freqs,
            w1,
            b1,
            h,
            n_rows,
            n_out,
            w1.stride(0),
            h.stride(0),
            scale,
            HALF=freqs.shape[0],
            FLIP=flip_sin_to_cos,
            USE_LIBDEVICE=not INTERPRETED,
            DOT_PRECISION=dot_precision(w1.dtype),
            BLOCK_B=_BLOCK_B,
            BLOCK_J=_FWD_BLOCK_J,
            num_warps=_FWD_NUM_WARPS,
        )
    return h


def temb_backward_first(
    dh: torch.Tensor,
    timesteps: torch.Tensor,
    freqs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    scale: float,
    flip_sin_to_cos: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``(dW1, db1)`` in the dtypes of W1 and b1."""
    n_rows, n_out = dh.shape
    dh, w1 = aligned_for_kernel(dh), aligned_for_kernel(w1)
    dw1 = aligned_empty(w1.shape, device=w1.device, dtype=w1.dtype)
    db1 = torch.empty_like(b1)
    check_aligned(dh=dh, w1=w1, dw1=dw1)
    with device_guard(w1.device):
        _temb_bwd_kernel[(triton.cdiv(n_out, _BWD_BLOCK_J),)](
            timesteps,
            freqs,
            w1,
            b1,
            dh,
            dw1,
            db1,
            n_rows,
            n_out,
            w1.stride(0),
            dh.stride(0),
            dw1.stride(0),
            scale,
            HALF=freqs.shape[0],
            FLIP=flip_sin_to_cos,
            USE_LIBDEVICE=not INTERPRETED,
            DOT_PRECISION=dot_precision(w1.dtype),
            BLOCK_B=_BLOCK_B,
            BLOCK_J=_BWD_BLOCK_J,
            num_warps=_BWD_NUM_WARPS,
        )
    return dw1, db1
