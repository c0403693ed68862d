"""Building the trained denoiser and the frozen autoencoder (diffusers models).

The denoiser is a diffusers ``PixArtTransformer2DModel``: loaded from a local diffusers folder
(``from_pretrained``; no hub) or, for tiny presets, built from the config. The autoencoder is a
frozen ``AutoencoderKL`` from a local folder, or the identity (pixel-space presets such as the
embedded digits). Frozen models are built by the caller outside ``deepspeed.zero.Init`` so ZeRO-3
never partitions them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config.model import ModelConfig

if TYPE_CHECKING:
    # Imported where used: the config (ModelConfig) is read and checked before any model is
    # built, and diffusers' model classes take seconds to import.
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

__all__ = [
    "ModelConfig",
    "IdentityAutoencoder",
    "FrozenVAE",
    "build_denoiser",
    "pixart_transformer",
    "build_autoencoder",
    "resolve_model_folder",
]


def resolve_model_folder(path: str, subfolder: str, key: str) -> str:
    """``path`` itself if it holds a diffusers ``config.json``, else ``path/subfolder``.

    The folder must also hold its weights as safetensors (a pickle is never loaded: it can run
    code), so a half-copied model folder fails here, naming the path, not inside diffusers.
    """
    expected = (
        "a diffusers model folder (config.json + *.safetensors weights) or a pipeline folder "
        f"with {subfolder}/config.json"
    )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}={path!r} does not exist; expected {expected}")
    for folder in (path, os.path.join(path, subfolder)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
                raise FileNotFoundError(
                    f"{key}={path!r}: {folder!r} has config.json but no *.safetensors weights "
                    "(pickled .bin weights are not loaded; convert them to safetensors)"
                )
            return folder
    raise FileNotFoundError(f"{key}={path!r} holds no config.json; expected {expected}")


def pixart_transformer(
    *,
    num_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    in_channels: int,
    out_channels: int,
    sample_size: int,
    caption_channels: int,
    patch_size: int = 2,
    use_additional_conditions: bool = False,
) -> PixArtTransformer2DModel:
    """A randomly initialised PixArt-α transformer (adaLN-single, cross-attention to the text):
    the one constructor behind denoisers built from config, the memory estimate and the tests.

    ``use_additional_conditions``: PixArt-MS's resolution / aspect-ratio embeddings (diffusers
    turns them on by itself for ``sample_size == 128``; here it is always explicit).
    """
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=num_layers,
        cross_attention_dim=num_attention_heads * attention_head_dim,
        sample_size=sample_size,
        patch_size=patch_size,
        caption_channels=caption_channels,
        norm_num_groups=1,
        use_additional_conditions=use_additional_conditions,
    )


def build_denoiser(
    config: ModelConfig,
    *,
    latent_channels: int,
    latent_size: int,
    text_dim: int,
    load_weights: bool = True,
) -> PixArtTransformer2DModel:
    """The trainable denoiser, checked against the data's latent and text shapes.

    ``load_weights=False``: a pretrained model is built from its ``config.json`` alone (random
    weights), for ``--dry-run``'s forward under ``FakeTensorMode``, where nothing is allocated.
    """
    from diffusers import PixArtTransformer2DModel

    if config.pretrained_path is not None:
        folder = resolve_model_folder(
            config.pretrained_path, "transformer", "model.pretrained_path"
        )
        if load_weights:
            model = PixArtTransformer2DModel.from_pretrained(folder, use_safetensors=True)
        else:
            model = PixArtTransformer2DModel.from_config(
                PixArtTransformer2DModel.load_config(folder)
            )
        got = (model.config.in_channels, model.config.caption_channels)
        if got != (latent_channels, text_dim):
            raise ValueError(
                f"model.pretrained_path={config.pretrained_path!r} takes in_channels={got[0]}, "
                f"caption_channels={got[1]}, but the data has {latent_channels} latent channels "
                f"and {text_dim}-dim text embeddings"
            )
    else:
        if latent_size % config.patch_size:
            raise ValueError(
                f"latent size {latent_size} is not divisible by model.patch_size={config.patch_size}"
            )
        model = pixart_transformer(
            num_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim,
            in_channels=latent_channels,
            out_channels=latent_channels * (2 if config.learned_sigma else 1),
            sample_size=latent_size,
            caption_channels=text_dim,
            patch_size=config.patch_size,
        )
    for prefix in config.freeze:
        matched = [p for name, p in model.named_parameters() if name.startswith(prefix)]
        if not matched:
            top = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
            raise ValueError(f"model.freeze: {prefix!r} matches no parameter (top level: {top})")
        for param in matched:
            param.requires_grad_(False)
    if config.fused_kernels:
        from e2ed2.kernels import install_fused_kernels

        install_fused_kernels(model)
    return model


class IdentityAutoencoder(nn.Module):
    """Pixel space: latents are the images in [-1, 1]."""

    scaling_factor = 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class FrozenVAE(nn.Module):
    """A frozen ``AutoencoderKL`` that decodes *scaled* latents (as stored / trained on)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels (B, 3, 8h, 8w) in about [-1, 1], with graph.

        The latents are cast to the VAE's dtype (differentiably): a bf16/fp16 sample meeting an
        fp32 VAE (or the reverse) would otherwise fail in the first conv with "Input type
        (c10::BFloat16) and bias type (float) should be the same". The pixels come back in the
        VAE's dtype; the trainer keeps the VAE in the run's compute dtype.
        """
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample

    def train(self, mode: bool = True) -> FrozenVAE:
        # Frozen: stays in eval mode whatever the trainer asks.
        return super().train(False)


def build_autoencoder(
    config: ModelConfig, *, load_weights: bool = True
) -> IdentityAutoencoder | FrozenVAE:
    """The frozen decoder: the VAE of ``model.vae_path`` (``load_weights=False``: built from its
    config.json, as :func:`build_denoiser`), or the identity in pixel space."""
    if config.vae_path is None:
        return IdentityAutoencoder()
    folder = resolve_model_folder(config.vae_path, "vae", "model.vae_path")
    from diffusers import AutoencoderKL

    if not load_weights:
        return FrozenVAE(AutoencoderKL.from_config(AutoencoderKL.load_config(folder)))
    return FrozenVAE(AutoencoderKL.from_pretrained(folder, use_safetensors=True))
