"""The fused timestep embedding's ``@triton.jit`` kernels (see the package docstring for the op).

Layout: ``W1`` / ``dW1`` ``(D, C)`` and ``H`` / ``dH`` ``(B, D)`` row-major with row strides
``stride_*`` (hinted as multiples of 8 elements: with 16-byte aligned pointers, rows of 8
fp16/bf16 values are one 128-bit load; see ``e2ed2.kernels._triton``); ``T`` ``(B,)`` timesteps,
``FREQS`` ``(C/2,)`` float32, biases ``(D,)``, all contiguous.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._triton import ALIGN_BYTES, ALIGN_ELEMENTS

__all__ = ["ALIGNMENT", "_temb_bwd_kernel", "_temb_fwd_kernel"]

# What the kernels assume of their arguments (checked by the launcher and the static check).
ALIGNMENT = {
    "pointer_bytes": ALIGN_BYTES,
    "stride_elements": ALIGN_ELEMENTS,
    "pointers": ("W1", "H", "DH", "DW1"),
}


@triton.jit
def _sinusoid(t, freqs, scale, USE_LIBDEVICE: tl.constexpr):
    """``(cos, sin)`` of ``scale * t[:, None] * freqs[None, :]``, each ``(len(t), len(freqs))``."""
    args = scale * (t[:, None] * freqs[None, :])
    if USE_LIBDEVICE:
        # libdevice's sinf/cosf reduce any fp32 argument exactly; the default lowering may use
        # the approximate instructions, whose error grows past |x| ~ 100 pi.
        cos = libdevice.cos(args)
        sin = libdevice.sin(args)
    else:
        cos = tl.cos(args)
        sin = tl.sin(args)
    return cos, sin


@triton.jit
def _temb_fwd_kernel(
    T,
    FREQS,
    W1,
    B1,
    H,
    n_rows,
    n_out,
    stride_w1,
    stride_h,
    scale,
    HALF: tl.constexpr,
    FLIP: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``h[b, j] = silu(emb(t_b) . W1[j] + b1[j])`` for a BLOCK_B x BLOCK_J tile of ``h``.

    ``emb = [cos, sin]`` (FLIP, PixArt) or ``[sin, cos]``: W1's columns split the same way, so the
    concatenation is two dots into one accumulator and never built.
    """
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    chans = tl.arange(0, HALF)
    t = tl.load(T + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
    cos, sin = _sinusoid(t, tl.load(FREQS + chans), scale, USE_LIBDEVICE)
    if FLIP:
        first, second = cos, sin
    else:
        first, second = sin, cos
    stride_w1 = tl.multiple_of(stride_w1, 8)
    stride_h = tl.multiple_of(stride_h, 8)
    w_ptrs = W1 + outs[:, None] * stride_w1 + chans[None, :]
    w_mask = outs[:, None] < n_out
    w_first = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_second = tl.load(w_ptrs + HALF, mask=w_mask, other=0.0)
    wdt = W1.dtype.element_ty
    pre = tl.dot(first.to(wdt), tl.trans(w_first), input_precision=DOT_PRECISION)
    pre = tl.dot(second.to(wdt), tl.trans(w_second), pre, input_precision=DOT_PRECISION)
    pre += tl.load(B1 + outs, mask=outs < n_out, other=0.0).to(tl.float32)[None, :]
    h = pre * tl.sigmoid(pre)
    h_ptrs = H + rows[:, None] * stride_h + outs[None, :]
    tl.store(
        h_ptrs, h.to(H.dtype.element_ty), mask=(rows[:, None] < n_rows) & (outs[None, :] < n_out)
    )


@triton.jit
def _temb_bwd_kernel(
    T,
    FREQS,
    W1,
    B1,
    DH,
    DW1,
    DB1,
    n_rows,
    n_out,
    stride_w1,
    stride_dh,
    stride_dw1,
    scale,
    HALF: tl.constexpr,
    FLIP: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``dW1[j] = sum_b dpre[b, j] emb(t_b)``, ``db1[j] = sum_b dpre[b, j]`` for BLOCK_J rows j.

    ``dpre = dh * silu'(pre)`` with ``pre`` recomputed; one program owns its rows of dW1 and loops
    over the whole batch, so the reduction needs no atomics.
    """
    pid_j = tl.program_id(0)
    outs = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    chans = tl.arange(0, HALF)
    offs_b = tl.arange(0, BLOCK_B)
    freqs = tl.load(FREQS + chans)
    stride_w1 = tl.multiple_of(stride_w1, 8)
    stride_dh = tl.multiple_of(stride_dh, 8)
    stride_dw1 = tl.multiple_of(stride_dw1, 8)
    w_ptrs = W1 + outs[:, None] * stride_w1 + chans[None, :]
    w_mask = outs[:, None] < n_out
    w_first = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_second = tl.load(w_ptrs + HALF, mask=w_mask, other=0.0)
    b1 = tl.load(B1 + outs, mask=outs < n_out, other=0.0).to(tl.float32)
    wdt = W1.dtype.element_ty
    dw_first = tl.zeros([BLOCK_J, HALF], dtype=tl.float32)
    dw_second = tl.zeros([BLOCK_J, HALF], dtype=tl.float32)
    db = tl.zeros([BLOCK_J], dtype=tl.float32)
    for start_b in range(0, n_rows, BLOCK_B):
        rows = start_b + offs_b
        t = tl.load(T + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
        cos, sin = _sinusoid(t, freqs, scale, USE_LIBDEVICE)
        if FLIP:
            first, second = cos.to(wdt), sin.to(wdt)
        else:
            first, second = sin.to(wdt), cos.to(wdt)
        pre = tl.dot(first, tl.trans(w_first), input_precision=DOT_PRECISION)
        pre = tl.dot(second, tl.trans(w_second), pre, input_precision=DOT_PRECISION)
        pre += b1[None, :]
        sig = tl.sigmoid(pre)
        dh_ptrs = DH + rows[:, None] * stride_dh + outs[None, :]
        dh_mask = (rows[:, None] < n_rows) & (outs[None, :] < n_out)
        dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0).to(tl.float32)
        # silu'(x) = sig(x) * (1 + x * (1 - sig(x))); padded batch rows have dh = 0.
        dpre = dh * sig * (1.0 + pre * (1.0 - sig))
        db += tl.sum(dpre, 0)
        dpre_t = tl.trans(dpre.to(wdt))
        dw_first = tl.dot(dpre_t, first, dw_first, input_precision=DOT_PRECISION)
        dw_second = tl.dot(dpre_t, second, dw_second, input_precision=DOT_PRECISION)
    dw_ptrs = DW1 + outs[:, None] * stride_dw1 + chans[None, :]
    dw_dt = DW1.dtype.element_ty
    tl.store(dw_ptrs, dw_first.to(dw_dt), mask=w_mask)
    tl.store(dw_ptrs + HALF, dw_second.to(dw_dt), mask=w_mask)
    tl.store(DB1 + outs, db.to(DB1.dtype.element_ty), mask=outs < n_out)
