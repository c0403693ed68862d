"""``[model]``: the trained denoiser and the frozen autoencoder (see core/models.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .base import check_fields, check_int

__all__ = ["FAMILY_NAMES", "LORA_TARGET_MODULES", "FamilyName", "ModelConfig"]

#: ``model.family``: the model family records of core/families.py, or "auto" (from the folder).
FamilyName = Literal["auto", "pixart_alpha", "pixart_sigma", "sd3", "sana", "sana_sprint"]
FAMILY_NAMES: tuple[str, ...] = get_args(FamilyName)

# Each PixArt block's attention projections (self- and cross-attention: attn1 / attn2) and its
# feed-forward: the per-block targets of the PixArt-α authors' diffusers LoRA script
# (PixArt-alpha train_scripts/train_pixart_lora_hf.py; its further targets proj / linear /
# linear_1 / linear_2 / proj_out reach the patch embedding, the adaLN-single, timestep and
# caption embedders and the output projection). diffusers' own DiT LoRA scripts (Sana, SD3)
# default to the attention four alone; the feed-forward holds two thirds of a block's weights.
LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser (trained) and the autoencoder (frozen).

    Latent channels and latent size are not set here: they follow from the data (pixel space) or
    the autoencoder, and are passed to :func:`build_denoiser`.
    """

    family: FamilyName = "auto"
    """The model family (core/families.py: denoiser and pipeline classes, text encoding, export).
    "auto": from the checkpoint folder (its pipeline's model_index.json, else the transformer's
    class; PixArt-α for a denoiser built from config). Set it for a bare PixArt-Σ transformer
    folder, which cannot be told from PixArt-α's."""
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
    lora_rank: int = 0
    """LoRA rank r (peft adapters, core/lora.py): 0 = off (the whole denoiser is trained). r >= 1
    freezes the denoiser and trains rank-r adapters on ``lora_target_modules`` only. With
    ``share_across_steps=false``: per-step LoRA, one frozen base shared by the K steps and one
    adapter per step (``step_0`` .. ``step_{K-1}``; paper App. D.1 at a fraction of the memory).
    """
    lora_alpha: float | None = None
    """LoRA scale numerator: each adapted layer adds (lora_alpha / lora_rank) * B A x. None =
    ``lora_rank`` (scale 1)."""
    lora_target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    """Modules that get adapters (peft ``target_modules``: a module matches when its name equals
    an entry or ends with "." + entry). Default: every block's to_q, to_k, to_v, to_out.0 (self-
    and cross-attention) and ff.net.0.proj, ff.net.2."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1) (recomputed steps replay the same mask)."""
    lora_merge_on_export: bool = False
    """Exports also hold the adapters merged into the weights, so they load without peft:
    transformer/ (shared adapter) or transformer_step{i}/ (per step). The adapters are exported
    as diffusers LoRA files either way (train/export.py)."""

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
        self._check_lora()

    def _check_lora(self) -> None:
        check_int("model.lora_rank", self.lora_rank, minimum=0)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(
                f"model.lora_alpha must be > 0 (or none = rank), got {self.lora_alpha}"
            )
        if self.lora_rank == 0:
            # Settings that only mean something for adapters: a typo for lora_rank, not a no-op.
            stray = [
                key
                for key, unset in (
                    ("lora_alpha", self.lora_alpha is None),
                    ("lora_dropout", self.lora_dropout == 0.0),
                    ("lora_merge_on_export", not self.lora_merge_on_export),
                )
                if not unset
            ]
            if stray:
                raise ValueError(
                    f"model.{stray[0]}={getattr(self, stray[0])!r} needs model.lora_rank >= 1 "
                    "(lora_rank=0: no adapters)"
                )
            return
        if not self.lora_target_modules or not all(
            isinstance(name, str) and name.strip(".") for name in self.lora_target_modules
        ):
            raise ValueError(
                "model.lora_target_modules must name at least one module (non-empty names), "
                f"got {list(self.lora_target_modules)}"
            )
        if self.freeze:
            raise ValueError(
                f"model.freeze={list(self.freeze)} with model.lora_rank={self.lora_rank}: LoRA "
                "freezes the whole denoiser and trains only the adapters; leave model.freeze empty"
            )
