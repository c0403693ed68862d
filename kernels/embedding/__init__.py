"""Fused timestep embedding (sinusoid -> Linear -> SiLU -> Linear, PixArt-α's ``adaln_single``).

Layers, bottom up: ``kernels`` (``@triton.jit`` only) -> ``launcher`` (tiles, alignment
fallback, grids) -> ``function`` (:class:`TimestepEmbeddingFunction`) -> ``module``
(:func:`timestep_embedding`, :class:`FusedTimestepEmbedding`, and the eager-torch backend).
"""

from .function import TimestepEmbeddingFunction
from .module import (
    FusedTimestepEmbedding,
    sinusoidal_embedding,
    sinusoidal_frequencies,
    timestep_embedding,
)

__all__ = [
    "FusedTimestepEmbedding",
    "TimestepEmbeddingFunction",
    "sinusoidal_embedding",
    "sinusoidal_frequencies",
    "timestep_embedding",
]
