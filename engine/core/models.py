"""Building the trained denoiser and the frozen autoencoder (diffusers models).

The denoiser is a diffusers ``PixArtTransformer2DModel`` or ``SD3Transformer2DModel`` (flow
matching, SD3 / SD3.5): loaded from a local diffusers folder by its config.json ``_class_name``
(``from_pretrained``; no hub) or, for tiny presets, a PixArt built from the config
(:func:`sd3_transformer` builds tiny SD3s for tests). The autoencoder is a frozen
``AutoencoderKL`` from a local folder (SD3's: 16 channels, ``scaling_factor`` 1.5305 and
``shift_factor`` 0.0609), or the identity (pixel-space presets such as the embedded digits). Frozen models are built by the caller outside ``deepspeed.zero.Init`` so ZeRO-3
never partitions them.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..config.model import ModelConfig
from .families import ModelFamily, denoiser_class_names, family_of_denoiser, resolve_family

if TYPE_CHECKING:
    # Imported where used: the config (ModelConfig) is read and checked before any model is
    # built, and diffusers' model classes take seconds to import.
    # From their modules: diffusers' top-level names type as its dummy (torch-less) objects.
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.autoencoders.autoencoder_dc import AutoencoderDC
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

__all__ = [
    "DENOISER_CLASSES",
    "ModelConfig",
    "IdentityAutoencoder",
    "FrozenVAE",
    "build_denoiser",
    "pixart_transformer",
    "sd3_transformer",
    "build_autoencoder",
    "model_family",
    "resolve_model_folder",
]

#: The diffusers denoiser classes a pretrained folder may hold (its config.json ``_class_name``).
DENOISER_CLASSES = denoiser_class_names()


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
    # lazy: diffusers adds ~3 s; the config and launch checks importing this module skip it
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

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


def sd3_transformer(
    *,
    num_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    in_channels: int,
    sample_size: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    caption_projection_dim: int | None = None,
    patch_size: int = 2,
    pos_embed_max_size: int | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
) -> SD3Transformer2DModel:
    """A randomly initialised SD3 MMDiT (joint attention over text and image tokens, adaLN from
    the timestep and the pooled text embedding): SD3-medium's structure for tiny test models.

    ``caption_projection_dim`` defaults to the hidden size (as SD3-medium: 1536 = 24 x 64);
    ``pos_embed_max_size`` to the patch grid of ``sample_size`` (SD3-medium: 192 for 128);
    ``dual_attention_layers`` / ``qk_norm="rms_norm"``: SD3.5's MMDiT-X.
    """
    # lazy: diffusers adds ~3 s; the config and launch checks importing this module skip it
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    hidden = num_attention_heads * attention_head_dim
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=caption_projection_dim or hidden,
        pooled_projection_dim=pooled_projection_dim,
        out_channels=in_channels,
        pos_embed_max_size=pos_embed_max_size or sample_size // patch_size,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )


def _denoiser_class_name(folder: str, key: str) -> str:
    """The diffusers class named by ``folder/config.json``'s ``_class_name``, if supported."""
    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f).get("_class_name")
    if name not in DENOISER_CLASSES:
        raise ValueError(
            f"{key}: {folder}/config.json names _class_name={name!r}; supported denoisers: "
            f"{', '.join(DENOISER_CLASSES)}"
        )
    return name


def _denoiser_class(folder: str, key: str) -> type[ModelMixin]:
    # lazy: diffusers adds ~3 s; the config and launch checks importing this module skip it
    import diffusers

    return getattr(diffusers, _denoiser_class_name(folder, key))


def model_family(config: ModelConfig) -> ModelFamily:
    """The run's model family (core/families.py), chosen once from ``model.family`` and the
    checkpoint folder; a denoiser built from config is PixArt-α's class."""
    denoiser = None
    if config.pretrained_path is not None:
        folder = resolve_model_folder(
            config.pretrained_path, "transformer", "model.pretrained_path"
        )
        denoiser = _denoiser_class_name(folder, f"model.pretrained_path={config.pretrained_path!r}")
    return resolve_family(config.family, config.pretrained_path, denoiser)


def _check_fits_data(
    model: ModelMixin,
    key: str,
    *,
    latent_channels: int,
    text_dim: int,
    pooled_dim: int | None,
) -> None:
    """Raises ValueError naming ``key`` unless the pretrained model takes the data's shapes."""
    cfg = model.config
    has: tuple[int | None, ...]
    if family_of_denoiser(type(model).__name__).pooled_projections:
        wants = {
            "in_channels": cfg["in_channels"],
            "joint_attention_dim": cfg["joint_attention_dim"],
            "pooled_projection_dim": cfg["pooled_projection_dim"],
        }
        has = (latent_channels, text_dim, pooled_dim)
        what = "latent channels, text width and pooled projection width"
        hint = (
            "; the data has no pooled projections: precompute it from the SD3 pipeline folder "
            "(e2ed2 precompute --text-encoder <SD3 folder>)"
            if pooled_dim is None
            else ""
        )
    else:
        wants = {"in_channels": cfg["in_channels"], "caption_channels": cfg["caption_channels"]}
        has = (latent_channels, text_dim)
        what = "latent channels and text width"
        hint = ""
    if tuple(wants.values()) != has:
        taken = ", ".join(f"{k}={v}" for k, v in wants.items())
        raise ValueError(f"{key} takes {taken}, but the data has {what} {has}{hint}")


def build_denoiser(
    config: ModelConfig,
    *,
    latent_channels: int,
    latent_size: int,
    text_dim: int,
    pooled_dim: int | None = None,
    load_weights: bool = True,
) -> ModelMixin:
    """The trainable denoiser, checked against the data's latent and text shapes.

    A pretrained folder's class comes from its config.json ``_class_name`` (PixArt, or SD3 whose
    ``pooled_dim`` = the data's pooled projection width must match). ``load_weights=False``: a
    pretrained model is built from its ``config.json`` alone (random weights), for
    ``--dry-run``'s forward under ``FakeTensorMode``, where nothing is allocated.
    """
    if config.pretrained_path is not None:
        key = f"model.pretrained_path={config.pretrained_path!r}"
        folder = resolve_model_folder(
            config.pretrained_path, "transformer", "model.pretrained_path"
        )
        cls = _denoiser_class(folder, key)
        resolve_family(config.family, config.pretrained_path, cls.__name__)  # a contradiction
        if load_weights:
            model = cls.from_pretrained(folder, use_safetensors=True)
        else:
            # Every denoiser class is a ConfigMixin as well (diffusers' registered config).
            config_class = cast("type[ConfigMixin]", cls)
            # load_config returns the config dict alone (its annotation says a tuple).
            loaded = config_class.load_config(folder)
            model = cast("ModelMixin", config_class.from_config(loaded))  # type: ignore[arg-type]
        _check_fits_data(
            model, key, latent_channels=latent_channels, text_dim=text_dim, pooled_dim=pooled_dim
        )
        if config.fused_kernels and not family_of_denoiser(cls.__name__).fused_kernels:
            raise ValueError(
                f"model.fused_kernels=true supports PixArt's self- and cross-attention only; "
                f"{cls.__name__}'s joint attention has no fused kernel: set "
                "model.fused_kernels=false"
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
        # lazy: e2ed2.kernels imports triton (absent off Linux); only fused-kernel runs need it
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

    def __init__(self, vae: AutoencoderKL | AutoencoderDC) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config["scaling_factor"])
        # SD3's VAE centres its latents before scaling (latents = (z - shift) * scale, as the
        # shards store them); SD / PixArt's has none (null in its config).
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels (B, 3, 8h, 8w) in about [-1, 1], with graph:
        ``z = latents / scaling_factor + shift_factor``, as the diffusers pipelines decode.

        The latents are cast to the VAE's dtype (differentiably): a bf16/fp16 sample meeting an
        fp32 VAE (or the reverse) would otherwise fail in the first conv with "Input type
        (c10::BFloat16) and bias type (float) should be the same". The pixels come back in the
        VAE's dtype; the trainer keeps the VAE in the run's compute dtype.
        """
        z = latents.to(self.vae.dtype) / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        return self.vae.decode(z).sample

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
    # lazy: diffusers adds ~3 s; the config and launch checks importing this module skip it
    import diffusers

    # AutoencoderKL, or Sana's deep-compression AutoencoderDC (decode(z).sample alike).
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        name = json.load(f).get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "AutoencoderDC"):
        raise ValueError(f"model.vae_path={config.vae_path!r} holds a {name}, not an autoencoder")
    cls = getattr(diffusers, name)
    if not load_weights:
        return FrozenVAE(cls.from_config(cls.load_config(folder)))
    return FrozenVAE(cls.from_pretrained(folder, use_safetensors=True))
