"""e2ed2.kernels: Triton kernels, their autograd Functions and pure-torch references.

* :func:`flash_attention`: fused FlashAttention-2 forward + backward (key padding masks, any
  Nq / Nk, head dims that are multiples of 8 up to 128, D = 72 without padding to 128).
* :func:`timestep_embedding` / :class:`FusedTimestepEmbedding`: sinusoid + Linear + SiLU + Linear.
* :func:`install_fused_kernels`: swap both into a diffusers PixArt denoiser, in place.

Set ``TRITON_INTERPRET=1`` before triton is first imported to run the Triton backend on CPU.

Layout: ``_triton`` (helpers shared by all kernels: backend choice, launch plumbing, the alignment
contract), one package per op (``attention/``, ``embedding/``: ``kernels`` -> ``launcher`` ->
``function`` -> public function / module), ``reference`` (pure-torch ground truth for the tests),
``processors`` (diffusers wiring), ``static_check`` (ahead-of-time compile report for sm_80 /
sm_90, no GPU needed).
"""

from ._triton import triton_available
from .attention import SUPPORTED_HEAD_DIMS, FlashAttentionFunction, flash_attention, head_dim_tiles
from .embedding import (
    FusedTimestepEmbedding,
    TimestepEmbeddingFunction,
    sinusoidal_frequencies,
    timestep_embedding,
)
from .processors import (
    FlashAttnProcessor,
    FusedPixArtTimestepEmbeddings,
    install_fused_kernels,
    key_padding_mask_from_attention_mask,
)
from .reference import attention_reference, timestep_embedding_reference

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "FlashAttentionFunction",
    "FlashAttnProcessor",
    "FusedPixArtTimestepEmbeddings",
    "FusedTimestepEmbedding",
    "TimestepEmbeddingFunction",
    "attention_reference",
    "flash_attention",
    "head_dim_tiles",
    "install_fused_kernels",
    "key_padding_mask_from_attention_mask",
    "sinusoidal_frequencies",
    "timestep_embedding",
    "timestep_embedding_reference",
    "triton_available",
]
