"""Fused flash attention, forward and backward (FlashAttention-2, Dao 2023), in Triton.

Layers, bottom up: ``_attn_*_kernel`` (``@triton.jit``) -> ``_flash_forward`` / ``_flash_backward``
(launchers) -> :class:`FlashAttentionFunction` (autograd) -> :func:`flash_attention` (public,
with the backend switch and the input checks).

Shapes: q ``(B, H, Nq, D)``, k/v ``(B, H, Nk, D)``; Nq != Nk is allowed (cross-attention), any
Nq, Nk >= 1. Only the head dimension must be contiguous (stride 1): the ``(B, N, H, D)`` ->
``(B, H, N, D)`` transposed views that attention processors build are read in place, and the
output has q's layout, so the processor's transpose back is a view too.

Numerics: scores, softmax statistics and all accumulators are float32; the probabilities ``P``
and ``dS`` are rounded to the input dtype before their matmuls (as FlashAttention does, so the
tensor cores run at fp16/bf16 rate). fp32 inputs use IEEE fp32 dots (no TF32) so that the fp32
path is a faithful reference on GPU too. Scores live in base 2 (``s * scale * log2(e)``, then
``exp2``), which saves a multiply per score over ``exp``.

Memory: the forward saves only ``O`` and the per-row log-sum-exp ``LSE`` ``(B, H, Nq)`` (float32,
base 2) besides the inputs; the backward recomputes ``P = exp2(S - LSE)`` block by block.
Backward = three kernels: ``delta = rowsum(dO * O)``; dK/dV, one program per key block looping
over query blocks; dQ, one program per query block looping over key blocks. Two passes recompute
``QK^T`` twice but need no atomics, so results are deterministic and every kernel is idempotent
(safe to autotune).

Key padding: ``key_padding_mask`` ``(B, Nk)`` bool, True = attend. A query with no key to attend
to gets ``O = 0`` and zero gradients (not NaN): its ``LSE`` is stored as ``+inf``, which makes
every recomputed probability ``exp2(s - inf) = 0``.

Head dims that are not powers of two (PixArt-α: D = 72). ``tl.arange`` and ``tl.dot`` need
power-of-two tiles of width >= 16, so the head dim is covered by a main tile of ``BLOCK_D0``
(the largest power of two <= D) plus, where that saves work, a tail tile of ``BLOCK_D1`` (the next
power of two >= the rest, at least 16) whose extra columns are masked to zero on load:
D = 72 -> 64 + 16 (80 columns of work, 11% over D, where padding to 128 would be 78% over);
40 -> 32 + 16; 80 -> 64 + 16; 96 -> 64 + 32. Where the tail would be as wide as the main tile
(D = 24, 56, 104..120) one masked tile of twice the width does the same work with fewer dots.
Every ``QK^T`` is then two dots accumulated into one fp32 tile, and every ``P V``-like product
writes two accumulators. A single 80-wide tile is not expressible (``tl.arange`` needs a power of
two), and ``tl.dot`` needs K >= 16, so 64 + 8 is not either: 64 + 16 is the tightest legal cover.

Block sizes: autotuned on CUDA per (Nq, Nk, D, mask, dtype) from a short list (BLOCK_M x BLOCK_N
in {64, 128} x {32, 64, 128}, 4 or 8 warps, 2-4 stages); the Triton interpreter (CPU tests) runs
one fixed small config. The last, partial key block is masked only when Nk is not a multiple of
BLOCK_N (a compile-time flag), so full blocks pay no masking.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.function import once_differentiable

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "Backend",
    "FlashAttentionFunction",
    "flash_attention",
    "head_dim_tiles",
    "triton_available",
]

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(range(8, 129, 8))
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)


def head_dim_tiles(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D0, BLOCK_D1)``: the power-of-two tiles covering ``head_dim`` (0 = no tail).

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


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(
    base,
    rows,
    stride_row,
    n_rows,
    cols,
    HEAD_DIM: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    CHECK_COLS: tl.constexpr,
):
    """A ``(len(rows), len(cols))`` tile of a row-major ``(n_rows, HEAD_DIM)`` matrix; 0 outside."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(
                ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0
            )
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(
    base, tile, rows, stride_row, n_rows, cols, HEAD_DIM: tl.constexpr, CHECK_COLS: tl.constexpr
):
    """Store ``tile`` (cast to the destination dtype) inside ``(n_rows, HEAD_DIM)`` only."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if CHECK_COLS:
        mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    else:
        mask = rows[:, None] < n_rows
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    KEEP,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    stride_keep_b,
    n_heads,
    n_q,
    n_k,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M queries of one (batch, head); online softmax over all keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    keep_base = KEEP + batch.to(tl.int64) * stride_keep_b

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(q_base, rows_m, stride_qn, n_q, cols0, HEAD_DIM, True, MASK_D0)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(q_base, rows_m, stride_qn, n_q, cols1, HEAD_DIM, True, MASK_D1)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, n_k, BLOCK_N):
        rows_n = start_n + offs_n
        k0 = _load_tile(k_base, rows_n, stride_kn, n_k, cols0, HEAD_DIM, MASK_N, MASK_D0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            k1 = _load_tile(k_base, rows_n, stride_kn, n_k, cols1, HEAD_DIM, MASK_N, MASK_D1)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
        if HAS_MASK:
            keep = tl.load(keep_base + rows_n, mask=rows_n < n_k, other=0)
            s = tl.where(keep[None, :] != 0, s * qk_scale_log2, float("-inf"))
        elif MASK_N:
            s = tl.where(rows_n[None, :] < n_k, s * qk_scale_log2, float("-inf"))
        else:
            s = s * qk_scale_log2

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # With a mask, a row that has seen only masked keys has m = -inf; subtracting 0 instead
        # keeps exp2(-inf - m) = 0 rather than NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new) if HAS_MASK else m_new
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_in = p.to(V.dtype.element_ty)
        v0 = _load_tile(v_base, rows_n, stride_vn, n_k, cols0, HEAD_DIM, MASK_N, MASK_D0)
        acc0 = tl.dot(p_in, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            v1 = _load_tile(v_base, rows_n, stride_vn, n_k, cols1, HEAD_DIM, MASK_N, MASK_D1)
            acc1 = tl.dot(p_in, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if HAS_MASK:
        has_key = l_i > 0.0
        l_div = tl.where(has_key, l_i, 1.0)
        lse = tl.where(has_key, m_i + tl.math.log2(l_div), float("inf"))
    else:
        l_div = l_i
        lse = m_i + tl.math.log2(l_i)
    inv_l = 1.0 / l_div
    _store_tile(o_base, acc0 * inv_l[:, None], rows_m, stride_on, n_q, cols0, HEAD_DIM, MASK_D0)
    if BLOCK_D1 > 0:
        _store_tile(o_base, acc1 * inv_l[:, None], rows_m, stride_on, n_q, cols1, HEAD_DIM, MASK_D1)
    tl.store(LSE + pid_bh.to(tl.int64) * n_q + rows_m, lse, mask=rows_m < n_q)


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_on,
    stride_dob,
    stride_doh,
    stride_don,
    n_heads,
    n_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``delta = rowsum(dO * O)`` in float32, the softmax-backward term shared by all keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_D0)
    o0 = _load_tile(o_base, rows_m, stride_on, n_q, cols0, HEAD_DIM, True, MASK_D0)
    do0 = _load_tile(do_base, rows_m, stride_don, n_q, cols0, HEAD_DIM, True, MASK_D0)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if BLOCK_D1 > 0:
        cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        o1 = _load_tile(o_base, rows_m, stride_on, n_q, cols1, HEAD_DIM, True, MASK_D1)
        do1 = _load_tile(do_base, rows_m, stride_don, n_q, cols1, HEAD_DIM, True, MASK_D1)
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * n_q + rows_m, delta, mask=rows_m < n_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KEEP,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_keep_b,
    n_heads,
    n_q,
    n_k,
    qk_scale_log2,
    softmax_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, head); loops over all query blocks.

    Works on transposed tiles (keys as rows) so every product is a plain ``tl.dot``:
    ``P^T = exp2(K Q^T - LSE)``, ``dV += P^T dO``, ``dP^T = V dO^T``, ``dS^T = P^T (dP^T - delta)``,
    ``dK += dS^T Q``. A key row's dK/dV depend on that key alone, so padded keys need no masking
    inside the loop: their rows are zeroed once at the end, and out-of-range keys are not stored.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    dk_base = DK + batch.to(tl.int64) * stride_dkb + head.to(tl.int64) * stride_dkh
    dv_base = DV + batch.to(tl.int64) * stride_dvb + head.to(tl.int64) * stride_dvh
    lse_base = LSE + pid_bh.to(tl.int64) * n_q
    delta_base = DELTA + pid_bh.to(tl.int64) * n_q

    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_D0)
    k0 = _load_tile(k_base, rows_n, stride_kn, n_k, cols0, HEAD_DIM, True, MASK_D0)
    v0 = _load_tile(v_base, rows_n, stride_vn, n_k, cols0, HEAD_DIM, True, MASK_D0)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load_tile(k_base, rows_n, stride_kn, n_k, cols1, HEAD_DIM, True, MASK_D1)
        v1 = _load_tile(v_base, rows_n, stride_vn, n_k, cols1, HEAD_DIM, True, MASK_D1)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)

    for start_m in range(0, n_q, BLOCK_M):
        rows_m = start_m + offs_m
        q0 = _load_tile(q_base, rows_m, stride_qn, n_q, cols0, HEAD_DIM, MASK_M, MASK_D0)
        do0 = _load_tile(do_base, rows_m, stride_don, n_q, cols0, HEAD_DIM, MASK_M, MASK_D0)
        if MASK_M:
            # Out-of-range queries: LSE = +inf makes their probabilities exactly 0.
            lse = tl.load(lse_base + rows_m, mask=rows_m < n_q, other=float("inf"))
            delta = tl.load(delta_base + rows_m, mask=rows_m < n_q, other=0.0)
        else:
            lse = tl.load(lse_base + rows_m)
            delta = tl.load(delta_base + rows_m)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            q1 = _load_tile(q_base, rows_m, stride_qn, n_q, cols1, HEAD_DIM, MASK_M, MASK_D1)
            do1 = _load_tile(do_base, rows_m, stride_don, n_q, cols1, HEAD_DIM, MASK_M, MASK_D1)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale_log2 - lse[None, :])
        ds_t = p_t * (dp_t - delta[None, :])
        p_in = p_t.to(DO.dtype.element_ty)
        ds_in = ds_t.to(Q.dtype.element_ty)
        dv0 = tl.dot(p_in, do0, dv0, input_precision=DOT_PRECISION)
        dk0 = tl.dot(ds_in, q0, dk0, input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            dv1 = tl.dot(p_in, do1, dv1, input_precision=DOT_PRECISION)
            dk1 = tl.dot(ds_in, q1, dk1, input_precision=DOT_PRECISION)

    dk0 = dk0 * softmax_scale
    if BLOCK_D1 > 0:
        dk1 = dk1 * softmax_scale
    if HAS_MASK:
        # Padded keys: their (possibly overflowed) partial sums are discarded, not multiplied.
        keep = tl.load(
            KEEP + batch.to(tl.int64) * stride_keep_b + rows_n, mask=rows_n < n_k, other=0
        )
        keep = keep[:, None] != 0
        dk0 = tl.where(keep, dk0, 0.0)
        dv0 = tl.where(keep, dv0, 0.0)
        if BLOCK_D1 > 0:
            dk1 = tl.where(keep, dk1, 0.0)
            dv1 = tl.where(keep, dv1, 0.0)
    _store_tile(dk_base, dk0, rows_n, stride_dkn, n_k, cols0, HEAD_DIM, MASK_D0)
    _store_tile(dv_base, dv0, rows_n, stride_dvn, n_k, cols0, HEAD_DIM, MASK_D0)
    if BLOCK_D1 > 0:
        _store_tile(dk_base, dk1, rows_n, stride_dkn, n_k, cols1, HEAD_DIM, MASK_D1)
        _store_tile(dv_base, dv1, rows_n, stride_dvn, n_k, cols1, HEAD_DIM, MASK_D1)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    KEEP,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_keep_b,
    n_heads,
    n_q,
    n_k,
    qk_scale_log2,
    softmax_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M queries of one (batch, head): ``dQ = scale * sum_keys dS K``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    dq_base = DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
    keep_base = KEEP + batch.to(tl.int64) * stride_keep_b

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(q_base, rows_m, stride_qn, n_q, cols0, HEAD_DIM, True, MASK_D0)
    do0 = _load_tile(do_base, rows_m, stride_don, n_q, cols0, HEAD_DIM, True, MASK_D0)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(q_base, rows_m, stride_qn, n_q, cols1, HEAD_DIM, True, MASK_D1)
        do1 = _load_tile(do_base, rows_m, stride_don, n_q, cols1, HEAD_DIM, True, MASK_D1)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * n_q + rows_m, mask=rows_m < n_q, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * n_q + rows_m, mask=rows_m < n_q, other=0.0)

    for start_n in range(0, n_k, BLOCK_N):
        rows_n = start_n + offs_n
        k0 = _load_tile(k_base, rows_n, stride_kn, n_k, cols0, HEAD_DIM, MASK_N, MASK_D0)
        v0 = _load_tile(v_base, rows_n, stride_vn, n_k, cols0, HEAD_DIM, MASK_N, MASK_D0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            k1 = _load_tile(k_base, rows_n, stride_kn, n_k, cols1, HEAD_DIM, MASK_N, MASK_D1)
            v1 = _load_tile(v_base, rows_n, stride_vn, n_k, cols1, HEAD_DIM, MASK_N, MASK_D1)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale_log2 - lse[:, None])
        # Keys outside the sequence or padded must not contribute (``where``, not a product:
        # their unmasked exp2 may have overflowed to inf).
        if HAS_MASK:
            keep = tl.load(keep_base + rows_n, mask=rows_n < n_k, other=0)
            p = tl.where(keep[None, :] != 0, p, 0.0)
        elif MASK_N:
            p = tl.where(rows_n[None, :] < n_k, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)

    _store_tile(dq_base, dq0 * softmax_scale, rows_m, stride_dqn, n_q, cols0, HEAD_DIM, MASK_D0)
    if BLOCK_D1 > 0:
        _store_tile(dq_base, dq1 * softmax_scale, rows_m, stride_dqn, n_q, cols1, HEAD_DIM, MASK_D1)


# Whether `@triton.jit` built interpreter functions (TRITON_INTERPRET=1 when triton was imported):
# then the kernels run on CPU tensors, one fixed config, no autotuning.
INTERPRETED: bool = not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)


def _tile_configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples -> configs (one small one if interpreted)."""
    if INTERPRETED:
        pairs = [(32, 32, 4, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in pairs
    ]


# Candidates for sm80/sm90 with D <= 128; the autotuner keeps the fastest per shape.
_FWD_CONFIGS = _tile_configs(
    [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (128, 32, 4, 4),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
    ]
)
_DQ_CONFIGS = _tile_configs(
    [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 4, 3)]
)
# dK/dV: BLOCK_N keys are the program's rows, BLOCK_M the streamed query block.
_DKDV_CONFIGS = _tile_configs(
    [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4), (64, 128, 4, 2)]
)
_AUTOTUNE_KEY = ["n_q", "n_k", "HEAD_DIM", "HAS_MASK"]

_attn_fwd = triton.autotune(_FWD_CONFIGS, key=_AUTOTUNE_KEY)(
    triton.heuristics({"MASK_N": lambda a: a["n_k"] % a["BLOCK_N"] != 0})(_attn_fwd_kernel)
)
_attn_bwd_dq = triton.autotune(_DQ_CONFIGS, key=_AUTOTUNE_KEY)(
    triton.heuristics({"MASK_N": lambda a: a["n_k"] % a["BLOCK_N"] != 0})(_attn_bwd_dq_kernel)
)
_attn_bwd_dkdv = triton.autotune(_DKDV_CONFIGS, key=_AUTOTUNE_KEY)(
    triton.heuristics({"MASK_M": lambda a: a["n_q"] % a["BLOCK_M"] != 0})(_attn_bwd_dkdv_kernel)
)
_DELTA_BLOCK_M = 32 if INTERPRETED else 128


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _is_fake(x: torch.Tensor) -> bool:
    """FakeTensorMode tensors (shape and memory tracing) have no data a kernel could read."""
    return isinstance(x, FakeTensor)


def triton_available(x: torch.Tensor | torch.device) -> str | None:
    """None if the Triton kernels can run on tensor ``x`` (or device), else the reason why not."""
    if isinstance(x, torch.Tensor) and _is_fake(x):
        return (
            "the Triton kernels cannot run on fake tensors (FakeTensorMode); use backend='auto' "
            "or 'torch' to trace shapes and memory"
        )
    device = x.device if isinstance(x, torch.Tensor) else x
    if INTERPRETED or device.type == "cuda":
        return None
    return (
        f"the Triton kernels need CUDA tensors (got {device.type}); to run them on CPU, set "
        "TRITON_INTERPRET=1 in the environment before triton is first imported"
    )


def _head_dim_meta(head_dim: int) -> dict[str, int | bool]:
    d0, d1 = head_dim_tiles(head_dim)
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D0": d0,
        "BLOCK_D1": d1,
        "MASK_D0": head_dim < d0,
        "MASK_D1": d1 > 0 and head_dim < d0 + d1,
    }


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE dots (the reference path); fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The kernels index (B, H, N) by strides but need the head dim contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, whatever the current device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(O, LSE)``; O has q's layout, LSE is (B, H, Nq) float32."""
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    keep_arg = keep if keep is not None else lse  # never read when HAS_MASK is False

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)

    with _device_guard(q.device):
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
            softmax_scale * _LOG2E,
            HAS_MASK=keep is not None,
            DOT_PRECISION=_dot_precision(q.dtype),
            **_head_dim_meta(head_dim),
        )
    return o, lse


def _flash_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    keep: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta, dK/dV and dQ kernels: ``(dq, dk, dv)`` in the layouts of q, k, v."""
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    do = _row_major(do)
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    keep_arg = keep if keep is not None else lse
    keep_stride = keep.stride(0) if keep is not None else 0
    d_meta = _head_dim_meta(head_dim)
    common = {"HAS_MASK": keep is not None, "DOT_PRECISION": _dot_precision(q.dtype), **d_meta}

    with _device_guard(q.device):
        _attn_bwd_delta_kernel[(triton.cdiv(n_q, _DELTA_BLOCK_M), batch * heads)](
            o,
            do,
            delta,
            *o.stride()[:3],
            *do.stride()[:3],
            heads,
            n_q,
            BLOCK_M=_DELTA_BLOCK_M,
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
            softmax_scale * _LOG2E,
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
            softmax_scale * _LOG2E,
            softmax_scale,
            **common,
        )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    """Triton flash attention. Saves q, k, v, O and LSE; the backward recomputes P blockwise.

    ``keep``: None or a ``(B, Nk)`` uint8 tensor with unit stride along Nk (1 = attend).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor | None,
        softmax_scale: float,
    ) -> torch.Tensor:
        o, lse = _flash_forward(q, k, v, keep, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, keep)
        ctx.softmax_scale = softmax_scale
        return o

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, o, lse, keep = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, keep, ctx.softmax_scale)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "flash_attention expects q (B, H, Nq, D) and k, v (B, H, Nk, D); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    batch, heads, n_q, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim"
        )
    if min(batch, heads, n_q, k.shape[2], head_dim) < 1:
        raise ValueError(
            f"flash_attention needs non-empty inputs, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be (B, Nk) = {(batch, k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def _attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """The "torch" backend: SDPA (its fastest available kernel) with the same masking rules."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
    has_key = key_padding_mask.any(dim=-1)
    # Samples without any key attend to all keys (finite everywhere, so no NaN in backward) and
    # their outputs are then replaced by zeros, which also zeroes their gradients.
    attend = key_padding_mask | ~has_key[:, None]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attend[:, None, None, :], scale=softmax_scale
    )
    return torch.where(has_key[:, None, None, None], out, 0.0)


def resolve_backend(backend: str, x: torch.Tensor | torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensor ``x`` (or a device).

    "auto" is Triton for real CUDA tensors and torch otherwise: CPU, meta, and fake tensors (so
    that FakeTensorMode memory estimates of a model with the kernels installed still trace).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if isinstance(x, torch.Tensor):
            return "triton" if x.device.type == "cuda" and not _is_fake(x) else "torch"
        return "triton" if x.type == "cuda" else "torch"
    return backend


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T * scale) v`` over keys where ``key_padding_mask`` is True.

    q ``(B, H, Nq, D)``, k/v ``(B, H, Nk, D)`` -> ``(B, H, Nq, D)`` in q's dtype and layout.
    ``key_padding_mask``: ``(B, Nk)`` bool, True = attend; queries with no key get zeros.
    ``softmax_scale`` defaults to ``D ** -0.5``.

    ``backend``: ``"triton"`` = the fused kernels (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``; raises where they cannot run, and for D not a multiple of 8 in
    [8, 128]); ``"torch"`` = ``F.scaled_dot_product_attention``; ``"auto"`` = Triton for CUDA
    tensors, torch otherwise.
    """
    _check_inputs(q, k, v, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if resolve_backend(backend, q) == "torch":
        return _attention_torch(q, k, v, key_padding_mask, scale)
    reason = triton_available(q)
    if reason is not None:
        raise RuntimeError(f"flash_attention(backend='triton'): {reason}")
    if INTERPRETED and q.dtype == torch.bfloat16:
        raise TypeError(
            "the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16; use float16 "
            "or float32 on CPU"
        )
    head_dim_tiles(q.shape[-1])  # raises for unsupported head dims
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask.contiguous().view(torch.uint8)
    return FlashAttentionFunction.apply(_row_major(q), _row_major(k), _row_major(v), keep, scale)
