"""Flash attention launchers: head-dim tiling, autotune configs, the alignment fallback, grids.

:func:`flash_forward` / :func:`flash_backward` take ``(B, H, N, D)`` tensors with a unit last
stride and return new tensors; they make every tensor they pass meet the kernels' alignment
contract (``e2ed2.kernels._triton``: 16-byte pointers, strides multiples of 8 elements) by copying
the views that break it, then assert it. No shape or dtype checks here: the public
:func:`~e2ed2.kernels.attention.flash_attention` does those once.

Autotune configs: every config kept below is compiled for sm_80 and sm_90 at PixArt-α shapes
(D = 72, 64, 128; fp16/bf16; self-attention and cross-attention to 120 padded keys) by
``e2ed2.kernels.static_check``, which checks that it is spill-free, fits shared memory, loads its
tiles with 128-bit vectors and pipelines its main loop with cp.async on both GPUs
(``tests/kernels/test_static_check.py``; the full table is
``benchmarks/results/kernel_static_after.md``). The comment on each says why it is worth a
benchmark slot.
"""

from __future__ import annotations

import math

import torch
import triton

from .._triton import INTERPRETED, aligned_for_kernel, check_aligned, device_guard, dot_precision
from .._triton import tile_configs as _tile_configs
from .kernels import (
    _attn_bwd_delta_kernel,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
)

__all__ = ["SUPPORTED_HEAD_DIMS", "flash_backward", "flash_forward", "head_dim_tiles"]

SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(range(8, 129, 8))
LOG2E = math.log2(math.e)


def head_dim_tiles(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D0, BLOCK_D1)``: the power-of-two tiles covering ``head_dim`` (0 = no tail).

    ``tl.arange`` and ``tl.dot`` need power-of-two tiles of width >= 16, so the head dim is
    covered by a main tile (the largest power of two <= D) plus, where that saves work, a tail
    tile (the next power of two >= the rest, at least 16) whose extra columns are masked to zero:
    D = 72 -> 64 + 16 (80 columns of work, 11% over D, where padding to 128 would be 78% over);
    40 -> 32 + 16; 96 -> 64 + 32. Where the tail would be as wide as the main tile (D = 24, 56,
    104..120) one masked tile of twice the width does the same work with fewer dots.

    >>> head_dim_tiles(72), head_dim_tiles(64), head_dim_tiles(40), head_dim_tiles(112)
    ((64, 16), (64, 0), (32, 16), (128, 0))
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"flash_attention supports head dims that are multiples of 8 up to 128, got {head_dim}"
        )
    if head_dim <= 16:
        return 16, 0
    main = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - main
    if rest == 0:
        return main, 0
    tail = max(16, triton.next_power_of_2(rest))
    if tail >= main:
        return 2 * main, 0
    return main, tail


def head_dim_meta(head_dim: int) -> dict[str, int | bool]:
    d0, d1 = head_dim_tiles(head_dim)
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D0": d0,
        "BLOCK_D1": d1,
        "MASK_D0": head_dim < d0,
        "MASK_D1": d1 > 0 and head_dim < d0 + d1,
    }


# --------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_M, BLOCK_N, num_warps, num_stages)
# --------------------------------------------------------------------------------------------

# Pruned from the 16 configs the kernels shipped with (benchmarks/results/kernel_static_before.md):
# every one dropped spilled registers in at least one case or GPU once the loads were vectorized
# (e.g. forward 128x64 with 4 warps by 8 B under the mask on sm_80, 128x128 by 40 B at D = 128;
# dQ 128x64 / 128x32 with 4 warps; dK/dV with 128-key or 64x64 tiles at 4 warps, whose two fp32
# accumulators of BLOCK_N x 80 alone take 80-160 registers a thread). The first config of each
# list is the preferred one (the fast static test compiles it; E2ED2_TRITON_CONFIGS=first uses it).
FWD_TILES = [
    # FlashAttention-2's forward tile for D > 64: 8 warps split the 128 x 80 fp32 accumulator and
    # the 128 x 64 scores to ~200 registers a thread (no spill at D = 128 either); 3 stages keep
    # two K/V tiles in flight (96 KiB shared at D = 128).
    (128, 64, 8, 3),
    # Same 128 query rows with 4 warps: 2 blocks per SM on both GPUs (8 warps resident) and a
    # smaller score tile; 4 stages because each 32-key tile is short work.
    (128, 32, 4, 4),
    # Short sequences (512 px: 1024 tokens) and cross-attention: twice the programs of the
    # 128-row tiles, so B x H x Nq / 64 fills 108-132 SMs even at batch 1-2.
    (64, 64, 4, 4),
]
DQ_TILES = [
    # 64 queries x 64 keys, 4 warps: 2 blocks per SM at D = 72 (252 registers at D = 128, still
    # no spill); the dQ accumulator is only 64 x 80 fp32.
    (64, 64, 4, 3),
    # Half the key tile, one more stage: the lowest register count (168-188), for D = 128.
    (64, 32, 4, 4),
    # 128 queries with 8 warps: half the K/V re-reads of the 64-row tiles for long sequences.
    (128, 32, 8, 3),
]
# dK/dV: BLOCK_N keys are the program's rows (their dK and dV accumulate in registers, 2 x
# BLOCK_N x 80 fp32), BLOCK_M the streamed query block.
DKDV_TILES = [
    # 64 keys per program, 32 queries a step: spill-free in self- and cross-attention on both
    # GPUs at D = 72 and D = 128 (the old 64 x 64 / 32 x 128 tiles spilled 4-1084 B).
    (32, 64, 4, 4),
    # 16 queries a step: the fewest registers (131-246), 2-3 blocks per SM.
    (16, 64, 4, 4),
    # 32 keys per program: cross-attention to 120 text keys gets 4 programs per (batch, head),
    # 512 at batch 8 x 16 heads instead of 256, enough to fill an H100's 132 SMs twice.
    (32, 32, 4, 4),
]
DELTA_BLOCK_M = 32 if INTERPRETED else 128
AUTOTUNE_KEY = ["n_q", "n_k", "HEAD_DIM", "HAS_MASK"]

# The last, partial key (query) block is masked only when Nk (Nq) is not a multiple of the block:
# a compile-time flag, so full blocks pay no masking.
_attn_fwd = triton.autotune(_tile_configs(FWD_TILES), key=AUTOTUNE_KEY)(
    triton.heuristics({"MASK_N": lambda a: a["n_k"] % a["BLOCK_N"] != 0})(_attn_fwd_kernel)
)
_attn_bwd_dq = triton.autotune(_tile_configs(DQ_TILES), key=AUTOTUNE_KEY)(
    triton.heuristics({"MASK_N": lambda a: a["n_k"] % a["BLOCK_N"] != 0})(_attn_bwd_dq_kernel)
)
_attn_bwd_dkdv = triton.autotune(_tile_configs(DKDV_TILES), key=AUTOTUNE_KEY)(
    triton.heuristics({"MASK_M": lambda a: a["n_q"] % a["BLOCK_M"] != 0})(_attn_bwd_dkdv_kernel)
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, LSE)``: O ``(B, H, Nq, D)`` in q's layout (or contiguous if q was copied), LSE
    ``(B, H, Nq)`` float32 log-sum-exp in base 2 (``+inf`` for queries without any key)."""
    q, k, v = aligned_for_kernel(q), aligned_for_kernel(k), aligned_for_kernel(v)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    check_aligned(q=q, k=k, v=v, o=o)
    keep_arg = keep if keep is not None else lse  # never read when HAS_MASK is False

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)

    with device_guard(q.device):
        _attn_fwd[grid](
            q,
            k,
            v,
            o,
            lse,
            keep_arg,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *o.stride()[:3],
            keep.stride(0) if keep is not None else 0,
            heads,
            n_q,
            n_k,
            softmax_scale * LOG2E,
            HAS_MASK=keep is not None,
            DOT_PRECISION=dot_precision(q.dtype),
            **head_dim_meta(head_dim),
        )
    return o, lse


def flash_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    keep: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta, dK/dV and dQ kernels: ``(dq, dk, dv)`` in the layouts of q, k, v.

    Any input that breaks the contract is copied: ``do`` (an expanded scalar gradient has every
    stride 0), and q, k, v when the forward had to copy them (it saves the caller's views, not
    the copies, so aligned inputs cost no extra memory and unaligned ones are copied again).
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    do, q, k, v, o = (aligned_for_kernel(x) for x in (do, q, k, v, o))
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    check_aligned(do=do, q=q, k=k, v=v, o=o, dq=dq, dk=dk, dv=dv)
    keep_arg = keep if keep is not None else lse
    keep_stride = keep.stride(0) if keep is not None else 0
    d_meta = head_dim_meta(head_dim)
    common = {"HAS_MASK": keep is not None, "DOT_PRECISION": dot_precision(q.dtype), **d_meta}

    with device_guard(q.device):
        _attn_bwd_delta_kernel[(triton.cdiv(n_q, DELTA_BLOCK_M), batch * heads)](
            o,
            do,
            delta,
            *o.stride()[:3],
            *do.stride()[:3],
            heads,
            n_q,
            BLOCK_M=DELTA_BLOCK_M,
            **d_meta,
        )
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            keep_arg,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *do.stride()[:3],
            *dk.stride()[:3],
            *dv.stride()[:3],
            keep_stride,
            heads,
            n_q,
            n_k,
            softmax_scale * LOG2E,
            softmax_scale,
            **common,
        )
        _attn_bwd_dq[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            keep_arg,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *do.stride()[:3],
            *dq.stride()[:3],
            keep_stride,
            heads,
            n_q,
            n_k,
            softmax_scale * LOG2E,
            softmax_scale,
            **common,
        )
    return dq, dk, dv
