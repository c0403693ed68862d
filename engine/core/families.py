"""Model families: everything that differs between PixArt-α, PixArt-Σ, SD3, Sana and SANA-Sprint,
in one record each.

A family fixes the denoiser class a checkpoint holds, the pipeline class its folders and the
engine's exports are, how captions become conditioning (one T5's states and mask, or SD3's joint
CLIP + T5 states with pooled projections), the text length its pipeline encodes, and which
frozen text parts an export links. Every other module asks the record; none compares class names.

The family of a run is chosen once, from the checkpoint folder: ``model.family`` when set, else
the pipeline folder's ``model_index.json`` (``PixArtSigmaPipeline`` vs ``PixArtAlphaPipeline``:
both hold a ``PixArtTransformer2DModel``, so the transformer alone cannot tell them apart), else
the transformer's ``config.json`` class (a bare PixArt transformer is taken as PixArt-α).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Literal

from ..config.model import FAMILY_NAMES

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "denoiser_class_names",
    "family_named",
    "family_of_denoiser",
    "family_of_pipeline_folder",
    "resolve_family",
]


@dataclass(frozen=True)
class ModelFamily:
    """One diffusion model family as the engine trains, encodes and exports it."""

    name: str
    """The ``model.family`` value."""
    denoiser_class: str
    """The diffusers class its ``transformer/config.json`` names."""
    pipeline_class: str
    """The diffusers pipeline class of its folders (``model_index.json``) and of exports."""
    text_encoding: Literal["t5", "sd3", "gemma"]
    """``t5``: one T5's hidden states and attention mask (PixArt). ``sd3``: the pipeline's own
    ``encode_prompt`` (CLIP-L and CLIP-G penultimate states padded to T5's width, then T5's
    tokens) plus the pooled CLIP projections; no mask. ``gemma``: the Sana pipelines' own
    ``encode_prompt`` (Gemma-2's last hidden states of the complex human instruction + caption,
    of which the first token and the last ``caption_max_tokens - 1`` are kept) and its mask."""
    caption_max_tokens: int
    """T5 tokens its pipeline encodes a caption to (``max_sequence_length``)."""
    denoiser_text_tokens: int
    """Text tokens the denoiser attends to per caption (SD3: CLIP's 77 before T5's)."""
    fused_kernels: bool
    """Its attention fits e2ed2.kernels (PixArt's self- and cross-attention; SD3's joint
    attention has no fused kernel)."""
    frozen_text_parts: tuple[str, ...]
    """Pipeline subfolders holding its frozen text encoders and tokenizers."""
    vae_class: str = "AutoencoderKL"
    """The diffusers autoencoder class of its ``vae/`` folder (Sana: the deep-compression
    ``AutoencoderDC``, 32x downsampling, whose ``encode`` returns a latent, no posterior)."""
    sampler_kind: str | None = None
    """The engine sampler (``sampler.kind``) its pipeline's sampling equals, where the family
    fixes one (SANA-Sprint: ``scm``, TrigFlow); None: chosen by the preset."""
    fused_kernels_note: str = ""
    """Why its attention does or does not fit e2ed2.kernels, where ``fused_kernels`` is False."""

    @property
    def pooled_projections(self) -> bool:
        """Whether its conditioning carries pooled text projections (SD3's adaLN input)."""
        return self.text_encoding == "sd3"


_PIXART_TEXT = ("text_encoder", "tokenizer")
# Sana's self-attention is ReLU linear attention (SanaLinearAttnProcessor: relu(Q) (relu(K)^T V)
# over the image tokens, O(N D^2), no softmax and no N x N scores), and its feed-forward a GLU
# with a depthwise 3x3 conv (GLUMBConv); e2ed2.kernels fuses softmax attention only. Its
# cross-attention is softmax attention to the text, but a kernel for that alone would leave the
# self-attention, the bulk of the cost at 1024 px (4096 tokens), unfused.
_SANA_ATTENTION = (
    "Sana's self-attention is ReLU linear attention (no softmax, no N x N scores) and its MLP a "
    "GLU with a depthwise conv; e2ed2.kernels fuses softmax attention only"
)

# Sana (1600M / 600M): linear-attention DiT with 32x DC-AE latents (32 channels, patch 1),
# Gemma-2-2B text (2304 wide) behind the complex human instruction, 300 tokens, flow matching
# (the checkpoints ship flow DPM-Solver; the engine samples flow Euler at Sana's flow_shift 3.0:
# core/sampler.py).
_SANA = ModelFamily(
    name="sana",
    denoiser_class="SanaTransformer2DModel",
    pipeline_class="SanaPipeline",
    text_encoding="gemma",
    caption_max_tokens=300,
    denoiser_text_tokens=300,
    fused_kernels=False,
    frozen_text_parts=_PIXART_TEXT,
    vae_class="AutoencoderDC",
    sampler_kind="flow_euler",
    fused_kernels_note=_SANA_ATTENTION,
)

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        # PixArt-α: T5-XXL, 120 tokens, the SD VAE (scaling 0.18215).
        ModelFamily(
            name="pixart_alpha",
            denoiser_class="PixArtTransformer2DModel",
            pipeline_class="PixArtAlphaPipeline",
            text_encoding="t5",
            caption_max_tokens=120,
            denoiser_text_tokens=120,
            fused_kernels=True,
            frozen_text_parts=_PIXART_TEXT,
        ),
        # PixArt-Σ: the same transformer class and T5, 300 tokens, the SDXL VAE (0.13025; the
        # VAE folder's config carries it, nothing here reads it).
        ModelFamily(
            name="pixart_sigma",
            denoiser_class="PixArtTransformer2DModel",
            pipeline_class="PixArtSigmaPipeline",
            text_encoding="t5",
            caption_max_tokens=300,
            denoiser_text_tokens=300,
            fused_kernels=True,
            frozen_text_parts=_PIXART_TEXT,
        ),
        # SD3 / SD3.5: MMDiT, CLIP-L + CLIP-G (77 tokens) + T5 (256), flow matching.
        ModelFamily(
            name="sd3",
            denoiser_class="SD3Transformer2DModel",
            pipeline_class="StableDiffusion3Pipeline",
            text_encoding="sd3",
            caption_max_tokens=256,
            denoiser_text_tokens=77 + 256,
            fused_kernels=False,
            frozen_text_parts=tuple(
                f"{kind}{n}" for kind in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")
            ),
        ),
        _SANA,
        # SANA-Sprint: Sana's transformer with a guidance embedding (guidance_embeds), sampled
        # in 1-4 TrigFlow steps (SCMScheduler): the engine's scm sampler; same text and DC-AE.
        dataclasses.replace(
            _SANA, name="sana_sprint", pipeline_class="SanaSprintPipeline", sampler_kind="scm"
        ),
    )
}
assert set(FAMILIES) == set(FAMILY_NAMES) - {"auto"}, "config.model.FAMILY_NAMES out of step"

# The family a bare transformer folder of each class is taken as (no pipeline folder to ask).
# A bare Sana transformer folder is taken as Sana (set model.family="sana_sprint" for a SANA-Sprint
# one, or point at its pipeline folder).
_DEFAULT_FOR_DENOISER = {
    "PixArtTransformer2DModel": "pixart_alpha",
    "SD3Transformer2DModel": "sd3",
    "SanaTransformer2DModel": "sana",
}


def denoiser_class_names() -> tuple[str, ...]:
    """The diffusers denoiser classes the engine trains, in registry order."""
    return tuple(dict.fromkeys(f.denoiser_class for f in FAMILIES.values()))


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family={name!r}: expected one of {sorted(FAMILIES)}") from None


def family_of_denoiser(class_name: str) -> ModelFamily:
    """The family a bare transformer of diffusers class ``class_name`` is taken as."""
    if class_name not in _DEFAULT_FOR_DENOISER:
        raise ValueError(
            f"a {class_name} is not a supported denoiser; supported: "
            f"{', '.join(denoiser_class_names())}"
        )
    return FAMILIES[_DEFAULT_FOR_DENOISER[class_name]]


def family_of_pipeline_folder(folder: str | os.PathLike | None) -> ModelFamily | None:
    """The family whose pipeline ``folder/model_index.json`` names; None when the folder is no
    pipeline folder of a known family (a bare model folder, a T5 folder, missing)."""
    if folder is None:
        return None
    try:
        with open(os.path.join(os.fspath(folder), "model_index.json"), encoding="utf-8") as f:
            pipeline = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return next((f for f in FAMILIES.values() if f.pipeline_class == pipeline), None)


def resolve_family(
    family: str, pretrained_path: str | None, denoiser_class: str | None
) -> ModelFamily:
    """The run's family: ``family`` (``model.family``) unless ``"auto"``; else the pipeline folder
    at or above ``pretrained_path``; else the family of ``denoiser_class`` (PixArt-α for a
    denoiser built from config). Raises ValueError when an explicit family contradicts the
    checkpoint's denoiser class."""
    if family != "auto":
        chosen = family_named(family)
        if denoiser_class is not None and denoiser_class != chosen.denoiser_class:
            raise ValueError(
                f"model.family={family!r} trains a {chosen.denoiser_class}, but "
                f"model.pretrained_path holds a {denoiser_class}"
            )
        return chosen
    if pretrained_path is not None:
        path = os.path.abspath(pretrained_path)
        for folder in (path, os.path.dirname(path)):  # a pipeline folder or its transformer/
            found = family_of_pipeline_folder(folder)
            if found is not None and found.denoiser_class == (
                denoiser_class or found.denoiser_class
            ):
                return found
    return family_of_denoiser(denoiser_class or "PixArtTransformer2DModel")
