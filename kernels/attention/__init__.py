"""Fused flash attention (FlashAttention-2 forward + backward) in Triton.

Layers, bottom up: ``kernels`` (``@triton.jit`` only) -> ``launcher`` (head-dim tiling,
autotune configs, alignment fallback, grids) -> ``function`` (:class:`FlashAttentionFunction`)
-> ``api`` (:func:`flash_attention`: checks, backend switch, SDPA fallback).
"""

from .._triton import resolve_backend, triton_available
from .api import attention_sdpa, flash_attention
from .function import FlashAttentionFunction
from .launcher import SUPPORTED_HEAD_DIMS, head_dim_tiles

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "FlashAttentionFunction",
    "attention_sdpa",
    "flash_attention",
    "head_dim_tiles",
    "resolve_backend",
    "triton_available",
]
