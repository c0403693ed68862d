"""``[model]``: the trained denoiser and the frozen autoencoder (see core/models.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_fields

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser (trained) and the autoencoder (frozen).

    Latent channels and latent size are not set here: they follow from the data (pixel space) or
    the autoencoder, and are passed to :func:`build_denoiser`.
    """

    pretrained_path: str | None = None
    """Local diffusers folder of a PixArt transformer: a model folder (config.json) or a pipeline
    folder with a transformer/ subfolder. None = build from the fields below.
    """
    vae_path: str | None = None
    """Local diffusers folder of an AutoencoderKL (or a pipeline folder with vae/). None = pixel
    space (identity autoencoder).
    """
    num_layers: int = 4
    """Architecture of a denoiser built from config (PixArt-α-XL/2: 28 layers, 16 heads x 72)."""
    num_attention_heads: int = 4
    """Attention heads of a denoiser built from config."""
    attention_head_dim: int = 16
    """Width of each attention head; hidden size = heads x head dim."""
    patch_size: int = 2
    """Side of the square latent patches the transformer tokenizes (must divide the latent size)."""
    learned_sigma: bool = False
    """Output 2x the latent channels (PixArt-α's learned variance); only the first half is used."""
    share_across_steps: bool = True
    """Paper App. D.1: one network shared by all K steps (default) or one copy per step."""
    fused_kernels: bool = False
    """Route attention and the timestep embedding through e2ed2.kernels (Triton on CUDA)."""
    freeze: tuple[str, ...] = ()
    """Parameter-name prefixes of the denoiser kept frozen (e.g. ["caption_projection"])."""

    def __post_init__(self) -> None:
        check_fields("model", self)
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.attention_head_dim % 8 and self.fused_kernels:
            raise ValueError(
                f"model.attention_head_dim={self.attention_head_dim} must be a multiple of 8 "
                "with model.fused_kernels=true"
            )
