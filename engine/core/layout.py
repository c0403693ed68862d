"""The network layout: which networks the K sampler steps run and which of their weights train.

Four layouts follow from two ``[model]`` keys, and every component that cares asks this object
instead of branching on the keys itself:

=================  ====================  ===========================================================
``kind``           keys                  what DeepSpeed wraps / trains / keeps an EMA of
=================  ====================  ===========================================================
``shared``         share_across_steps    the denoiser; every weight; every weight
``per_step``       not shared            a ModuleList of K copies; every weight; every weight
``lora``           lora_rank >= 1        the frozen denoiser with one adapter; the adapter's
``per_step_lora``  both                  one frozen denoiser with K adapters (PerStepLoRA); the
                                         adapters
=================  ====================  ===========================================================

A shared layout is called through the DeepSpeed engine (ZeRO-3 gathers through its hooks); the
per-step layouts through the module inside it, which the trajectory indexes by step. A per-step
layout only samples at the K it was trained for. How each layout is exported (one stock
pipeline, or K transformers / K adapters beside it) is :func:`exports_stock_pipeline`'s answer,
and ``train/export.py`` writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config.model import ModelConfig
from .lora import add_lora
from .network import per_step_networks

__all__ = ["LayoutKind", "NetworkLayout"]

LayoutKind = Literal["shared", "per_step", "lora", "per_step_lora"]


@dataclass(frozen=True)
class NetworkLayout:
    """The layout of ``model`` (a run's ``[model]`` section); see the module docstring."""

    model: ModelConfig

    @property
    def shared(self) -> bool:
        """One network (or one adapter) for every sampler step."""
        return self.model.share_across_steps

    @property
    def lora(self) -> bool:
        """The denoiser is frozen and LoRA adapters train."""
        return self.model.lora_rank > 0

    @property
    def kind(self) -> LayoutKind:
        if self.lora:
            return "lora" if self.shared else "per_step_lora"
        return "shared" if self.shared else "per_step"

    def wrap(self, denoiser: nn.Module, num_steps: int) -> nn.Module:
        """The module DeepSpeed wraps: ``denoiser`` itself, K copies of it, or it with its
        adapters (frozen but for them; peft's ValueError names unmatched target modules)."""
        if self.lora:
            return add_lora(denoiser, self.model, num_steps)
        if self.shared:
            return denoiser
        return per_step_networks(denoiser, num_steps)

    def trainable_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """What the optimizer steps: every weight, or the adapters alone under LoRA."""
        return [p for p in module.parameters() if p.requires_grad]

    def ema_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """What the EMA shadows: the adapters alone under LoRA (a shadow of the frozen base
        would be a second copy of it), else every weight."""
        if self.lora:
            return self.trainable_parameters(module)
        return list(module.parameters())

    def networks(self, engine: nn.Module) -> nn.Module:
        """What the trajectory calls, given the DeepSpeed engine (or any wrapper with
        ``.module``): the wrapper for a shared layout, the per-step container inside it else."""
        if self.shared:
            return engine
        inner = engine.module
        assert isinstance(inner, nn.Module)
        return inner

    def sampling_steps_error(self, num_steps: int, trained_steps: int) -> str | None:
        """Why ``num_steps`` cannot sample a model trained at ``trained_steps``; None if it can
        (a shared layout samples at any K, a per-step one at its own K only)."""
        if self.shared or num_steps == trained_steps:
            return None
        return f"per-step networks were trained for K={trained_steps}"

    def exports_stock_pipeline(self) -> bool:
        """Whether the export is one stock diffusers pipeline (one transformer, adapters merged
        or beside it) rather than K networks or K adapters no stock pipeline runs."""
        return self.shared
