"""Wiring the fused kernels into a diffusers denoiser (PixArt-α and other ``Attention`` users).

* :class:`FlashAttnProcessor` is a diffusers attention processor: the projections, norms and
  output layer are the module's own (as in ``AttnProcessor2_0``), only the attention itself is
  :func:`~e2ed2.kernels.flash_attention`, with the text padding mask turned into a key padding
  mask.
* :class:`FusedPixArtTimestepEmbeddings` replaces ``adaln_single.emb``: its timestep (and, for
  PixArt-1024, resolution / aspect-ratio) embedders become :class:`FusedTimestepEmbedding`,
  holding the original ``nn.Linear`` modules, so state-dict keys do not change.
* :func:`install_fused_kernels` does both, in place; the engine calls it behind one switch.

Why the whole ``emb`` module and not only ``time_proj`` + ``timestep_embedder``: diffusers casts
the ``time_proj`` output to the hidden dtype before the embedder. A fused embedder behind a
pass-through ``time_proj`` would receive the raw timesteps cast to bf16, which rounds 999 to
1000 (bf16 holds integers exactly only up to 256). The replacement keeps timesteps as they come.

Masks: PixArt turns ``encoder_attention_mask`` (1 = token) into an additive bias ``(1 - m) *
-10000`` of shape ``(B, 1, L)``. The processor reads entries equal to 0 as "attend" and every
other entry as "masked", so it accepts such binary biases (or bool masks, True = attend), not a
general float bias. For a partly padded row this equals diffusers' result exactly (``exp(-10000)``
is 0 in every float format). A row with every token masked differs: diffusers' bias then gives
uniform attention over the padding, the kernel gives zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ._triton import BACKENDS, Backend
from .attention import SUPPORTED_HEAD_DIMS, flash_attention
from .embedding import FusedTimestepEmbedding

if TYPE_CHECKING:
    from diffusers.models.attention import AttentionMixin
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings

__all__ = [
    "FlashAttnProcessor",
    "FusedPixArtTimestepEmbeddings",
    "install_fused_kernels",
    "key_padding_mask_from_attention_mask",
]


def key_padding_mask_from_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, n_keys: int
) -> torch.Tensor | None:
    """``(B, Nk)`` bool (True = attend) from a diffusers ``attention_mask``.

    Accepts a bool mask (True = attend) or a binary additive bias (0 = attend, anything else =
    masked), shaped ``(B, Nk)`` or ``(B, 1, Nk)``. Query-dependent masks ``(B, Nq, Nk)`` cannot be
    expressed as key padding and raise.
    """
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 3:
        if mask.shape[1] != 1:
            raise ValueError(
                "FlashAttnProcessor supports key padding masks only ((B, Nk) or (B, 1, Nk)), got "
                f"{tuple(mask.shape)}"
            )
        mask = mask[:, 0]
    if tuple(mask.shape) != (batch, n_keys):
        raise ValueError(
            f"attention mask of shape {tuple(attention_mask.shape)} does not match batch {batch} "
            f"and {n_keys} keys"
        )
    return mask if mask.dtype == torch.bool else mask == 0


def _check_attention_module(attn: Attention, backend: str) -> None:
    """Refuse ``Attention`` configurations the processor does not implement (PixArt uses none)."""
    name = type(attn).__name__
    for feature in ("spatial_norm", "group_norm"):
        if getattr(attn, feature, None) is not None:
            raise ValueError(f"FlashAttnProcessor does not support {name} with {feature}")
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        raise ValueError(f"FlashAttnProcessor does not support {name} with added KV projections")
    head_dim = attn.inner_dim // attn.heads
    if backend != "torch" and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{name} has head dim {head_dim}; the Triton kernel supports multiples of 8 up to 128"
        )


class FlashAttnProcessor:
    """A diffusers attention processor running :func:`flash_attention` (self and cross).

    Mirrors ``AttnProcessor2_0`` step for step, with ``attn.scale`` as the softmax scale (the
    scale diffusers' default processors use for ``scale_qk=True`` modules, ``dim_head ** -0.5``).
    """

    def __init__(self, backend: Backend = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, N, H*D) -> (B, H, N, D) views; the kernel reads them in place.
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        keep = key_padding_mask_from_attention_mask(attention_mask, batch, key.shape[2])
        out = flash_attention(
            query, key, value, keep, softmax_scale=attn.scale, backend=self.backend
        )
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class FusedPixArtTimestepEmbeddings(nn.Module):
    """Drop-in for diffusers' ``PixArtAlphaCombinedTimestepSizeEmbeddings`` with fused embedders.

    Same submodule names with parameters (``timestep_embedder``, ``resolution_embedder``,
    ``aspect_ratio_embedder``, each with ``linear_1`` / ``linear_2``), same forward signature.
    """

    def __init__(
        self, emb: PixArtAlphaCombinedTimestepSizeEmbeddings, *, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        self.outdim = emb.outdim
        self.use_additional_conditions = bool(emb.use_additional_conditions)
        self.timestep_embedder = FusedTimestepEmbedding.from_diffusers(
            emb.time_proj, emb.timestep_embedder, backend=backend
        )
        if self.use_additional_conditions:
            self.resolution_embedder = FusedTimestepEmbedding.from_diffusers(
                emb.additional_condition_proj, emb.resolution_embedder, backend=backend
            )
            self.aspect_ratio_embedder = FusedTimestepEmbedding.from_diffusers(
                emb.additional_condition_proj, emb.aspect_ratio_embedder, backend=backend
            )

    def forward(
        self,
        timestep: torch.Tensor,
        resolution: torch.Tensor | None,
        aspect_ratio: torch.Tensor | None,
        batch_size: int,
        hidden_dtype: torch.dtype,
    ) -> torch.Tensor:
        """``(B,)`` timesteps -> ``(B, D)`` conditioning, as diffusers' module computes it.

        The embedders return their weights' dtype, as diffusers' do (``hidden_dtype`` is only
        used there to cast the sinusoid, which the fused op keeps in fp32 until the first GEMM).
        """
        conditioning = self.timestep_embedder(timestep)
        if self.use_additional_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError(
                    "this PixArt uses additional conditions: added_cond_kwargs needs 'resolution' "
                    "and 'aspect_ratio'"
                )
            res = self.resolution_embedder(resolution.flatten()).reshape(batch_size, -1)
            ratio = self.aspect_ratio_embedder(aspect_ratio.flatten()).reshape(batch_size, -1)
            conditioning = conditioning + torch.cat([res, ratio], dim=1)
        return conditioning


def install_fused_kernels(
    model: nn.Module,
    *,
    attention: bool = True,
    timestep_embedding: bool = True,
    backend: Backend = "auto",
) -> dict[str, int]:
    """Route ``model``'s attention and PixArt timestep embedding through the fused kernels.

    In place. ``attention``: every diffusers ``Attention`` gets a :class:`FlashAttnProcessor`
    (via ``model.set_attn_processor``). ``timestep_embedding``: ``model.adaln_single.emb``
    becomes :class:`FusedPixArtTimestepEmbeddings`. Parameters and state-dict keys are unchanged,
    so checkpoints load either way; call it before building the optimizer or DeepSpeed engine so
    that wrappers see the final module tree. Installing twice is a no-op. ``backend`` is passed
    to the kernels ("auto": Triton for CUDA tensors, torch otherwise).

    Returns how many modules now run fused: ``{"attention": n, "timestep_embedding": n}``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    installed = {"attention": 0, "timestep_embedding": 0}
    if attention:
        if not hasattr(model, "set_attn_processor") or not hasattr(model, "attn_processors"):
            raise TypeError(
                f"{type(model).__name__} has no set_attn_processor (not a diffusers attention model)"
            )
        attn_modules = [m for m in model.modules() if hasattr(m, "set_processor")]
        for attn in attn_modules:
            # Modules with set_processor are diffusers Attention modules.
            _check_attention_module(cast("Attention", attn), backend)
        # diffusers types the processor as a union of its own processor classes; any object with
        # their __call__ signature is what it calls.
        processor = FlashAttnProcessor(backend)
        cast("AttentionMixin", model).set_attn_processor(processor)  # type: ignore[arg-type]
        installed["attention"] = len(attn_modules)
    if timestep_embedding:
        adaln = getattr(model, "adaln_single", None)
        if adaln is None or not hasattr(adaln, "emb"):
            raise TypeError(
                f"{type(model).__name__} has no adaln_single.emb: the fused timestep embedding "
                "is for PixArt-style (adaLN-single) models"
            )
        if not isinstance(adaln.emb, FusedPixArtTimestepEmbeddings):
            adaln.emb = FusedPixArtTimestepEmbeddings(adaln.emb, backend=backend)
        fused = [m for m in adaln.emb.modules() if isinstance(m, FusedTimestepEmbedding)]
        for module in fused:
            module.backend = backend
        installed["timestep_embedding"] = len(fused)
    return installed
