"""The flash attention ``@triton.jit`` kernels (FlashAttention-2, Dao 2023): nothing else.

Layout of a tensor argument ``X``: a ``(B, H, N, D)`` tensor addressed by its three leading
strides ``stride_xb, stride_xh, stride_xn`` and a unit stride along D (any view with a unit last
stride: the processors' ``(B, N, H, D) -> (B, H, N, D)`` transposes are read in place). LSE and
DELTA are ``(B, H, Nq)`` float32, contiguous; KEEP is ``(B, Nk)`` uint8 (1 = attend).

Alignment (``ALIGNMENT``, see ``e2ed2.kernels._triton``): every ``stride_*`` is hinted as a
multiple of 8 elements and the tile pointers are 16-byte aligned (Triton specializes aligned
pointers by itself), so a tile row starts on a 16-byte boundary and the compiler emits 128-bit
loads and 16-byte ``cp.async`` copies. Without the hints PixArt's head stride 72 (not a
multiple of 16, the only divisibility Triton's runtime detects) makes every tile load 16 bits
wide and leaves the main loops unpipelined. The launcher guarantees the contract (copying
views that break it).

Numerics: scores, softmax statistics and all accumulators are float32; the probabilities ``P``
and ``dS`` are rounded to the input dtype before their matmuls (as FlashAttention does, so the
tensor cores run at fp16/bf16 rate). fp32 inputs use IEEE fp32 dots (no TF32) so that the fp32
path is a faithful reference on GPU too. Scores live in base 2 (``s * scale * log2(e)``, then
``exp2``), which saves a multiply per score over ``exp``.

Backward = three kernels: ``delta = rowsum(dO * O)``; dK/dV, one program per key block looping
over query blocks; dQ, one program per query block looping over key blocks. Two passes recompute
``QK^T`` twice but need no atomics, so results are deterministic and every kernel is idempotent
(safe to autotune).

Head dims that are not powers of two (PixArt-α: D = 72): the head dim is covered by a main tile of
``BLOCK_D0`` columns plus, where that saves work, a tail tile of ``BLOCK_D1`` columns masked to
``HEAD_DIM`` (see :func:`~e2ed2.kernels.attention.launcher.head_dim_tiles`); every ``QK^T`` is
then two dots into one fp32 tile and every ``P V``-like product writes two accumulators.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton import ALIGN_BYTES, ALIGN_ELEMENTS

__all__ = [
    "ALIGNMENT",
    "_attn_bwd_delta_kernel",
    "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel",
    "_attn_fwd_kernel",
]

# What the kernels assume of their arguments (checked by the launcher and the static check).
ALIGNMENT = {
    "pointer_bytes": ALIGN_BYTES,
    "stride_elements": ALIGN_ELEMENTS,
    "pointers": ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"),
}


@triton.jit
def _head_base(ptr, batch, head, stride_b, stride_h):
    """Start of one ``(batch, head)`` matrix, hinted 8-element (16-byte) aligned.

    The hint goes on the offset (an op result): ``tl.multiple_of`` on a kernel argument itself is
    silently dropped (an argument's divisibility comes only from runtime specialization).
    """
    offset = batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    return ptr + tl.multiple_of(offset, 8)


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
    """A ``(len(rows), len(cols))`` tile of a row-major ``(n_rows, HEAD_DIM)`` matrix; 0 outside.

    Row offsets are hinted as multiples of 8 elements: with the 16-byte aligned base every row
    starts on a 16-byte boundary, so 8 consecutive fp16/bf16 columns are one 128-bit load (and
    the tail tile's column mask, ``cols < HEAD_DIM`` with 8 | HEAD_DIM, is constant per vector).
    """
    row_offsets = tl.multiple_of(rows * stride_row, 8)
    ptrs = base + row_offsets[:, None] + cols[None, :]
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
    row_offsets = tl.multiple_of(rows * stride_row, 8)
    ptrs = base + row_offsets[:, None] + cols[None, :]
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
    keep_stride_b,
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
    q_base = _head_base(Q, batch, head, stride_qb, stride_qh)
    k_base = _head_base(K, batch, head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, head, stride_vb, stride_vh)
    o_base = _head_base(Out, batch, head, stride_ob, stride_oh)
    keep_base = KEEP + batch.to(tl.int64) * keep_stride_b

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
    o_base = _head_base(Out, batch, head, stride_ob, stride_oh)
    do_base = _head_base(DO, batch, head, stride_dob, stride_doh)
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
    keep_stride_b,
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
    q_base = _head_base(Q, batch, head, stride_qb, stride_qh)
    k_base = _head_base(K, batch, head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, head, stride_vb, stride_vh)
    do_base = _head_base(DO, batch, head, stride_dob, stride_doh)
    dk_base = _head_base(DK, batch, head, stride_dkb, stride_dkh)
    dv_base = _head_base(DV, batch, head, stride_dvb, stride_dvh)
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
            KEEP + batch.to(tl.int64) * keep_stride_b + rows_n, mask=rows_n < n_k, other=0
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
    keep_stride_b,
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
    q_base = _head_base(Q, batch, head, stride_qb, stride_qh)
    k_base = _head_base(K, batch, head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, head, stride_vb, stride_vh)
    do_base = _head_base(DO, batch, head, stride_dob, stride_doh)
    dq_base = _head_base(DQ, batch, head, stride_dqb, stride_dqh)
    keep_base = KEEP + batch.to(tl.int64) * keep_stride_b

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
