"""The public flash attention op: input checks, the backend switch, the SDPA fallback.

Shapes: q ``(B, H, Nq, D)``, k/v ``(B, H, Nk, D)``; Nq != Nk is allowed (cross-attention), any
Nq, Nk >= 1, D a multiple of 8 up to 128 for the Triton backend. The output has q's layout when
q is read in place, so a processor's transpose back is a view too.

Key padding: ``key_padding_mask`` ``(B, Nk)`` bool, True = attend. A query with no key to attend
to gets ``O = 0`` and zero gradients (not NaN), in both backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._triton import INTERPRETED, Backend, resolve_backend, triton_available
from .function import FlashAttentionFunction
from .launcher import head_dim_tiles

__all__ = ["attention_sdpa", "flash_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """The "torch" backend: SDPA (its fastest available kernel) with the same masking rules.

    Also what "auto" runs off CUDA (CPU, meta, FakeTensorMode memory estimates). Not the test
    reference (``e2ed2.kernels.reference.attention_reference``, plain fp32 einsum/softmax).
    """
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
        return attention_sdpa(q, k, v, key_padding_mask, scale)
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
    # Views that break the kernels' alignment contract (sliced, offset, head dim not unit-strided)
    # are copied by the launchers; aligned views, the processors' transposes, are read in place.
    return FlashAttentionFunction.apply(q, k, v, keep, scale)
