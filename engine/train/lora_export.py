"""The LoRA part of an export (``model.lora_rank >= 1``; see export.py for the rest).

Layout beside the export's other folders::

    <dir>/pytorch_lora_weights.safetensors           the shared adapter, or
    <dir>/pytorch_lora_weights_step_{i}.safetensors  per-step LoRA: step i's adapter
    <dir>/transformer/          the frozen base the adapters apply to (a symlink to
                                model.pretrained_path's transformer folder, else saved); with
                                ``model.lora_merge_on_export`` and a shared adapter: the merged
                                weights instead, so the folder runs without peft
    <dir>/transformer_step{i}/  per-step LoRA with ``lora_merge_on_export``: step i's merged
                                network (as independent per-step networks are exported)

The files are diffusers LoRA files (core/lora.py). diffusers 0.42 has no LoRA loader for PixArt
(neither the pipeline nor the transformer carry its LoRA mixins), so the adapter goes on with
peft, as :func:`~e2ed2.engine.core.lora.load_lora_weights` does::

    pipe = PixArtAlphaPipeline.from_pretrained("runs/x/export")
    load_lora_weights(pipe.transformer, "runs/x/export")  # e2ed2.engine.core.lora
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..config import TrainConfig, load_config
from ..core.layout import NetworkLayout
from ..core.lora import (
    DEFAULT_ADAPTER,
    PerStepLoRA,
    adapter_names,
    add_lora,
    load_lora_weights,
    lora_base,
    lora_weight_name,
    plain_transformer,
    save_lora_weights,
)
from ..core.models import resolve_model_folder
from .export_files import CONFIG_NAME, link_folder

if TYPE_CHECKING:
    # From their modules: diffusers' top-level names type as its dummy (torch-less) objects.
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

__all__ = ["load_lora_export", "write_lora_networks"]


def write_lora_networks(
    staging: Path, config: TrainConfig, module: nn.Module, state: dict[str, torch.Tensor]
) -> bool:
    """The adapters as diffusers LoRA files, and the base or merged transformer(s) they go with;
    whether the folder is a stock (one-transformer) pipeline."""
    layout = NetworkLayout(config.model)
    base = lora_base(module)
    # A plain CPU copy of the trained structure (no engine hooks, no fused kernels) with the
    # gathered weights: the adapters and the base come out of it with peft's own functions.
    # Not shared: a LoRA module is a PerStepLoRA, one item per step.
    num_steps = 1 if layout.shared else len(cast("Sized", module))
    # The base is a diffusers denoiser, so a ConfigMixin too: its registered config builds it.
    denoiser = cast("ConfigMixin", base)
    blank = cast("nn.Module", type(denoiser).from_config(denoiser.config))
    fresh = add_lora(blank, config.model, num_steps)
    fresh.load_state_dict(state, strict=True)
    fresh_base = lora_base(fresh)
    names = adapter_names(config.model, num_steps)
    for name in names:
        save_lora_weights(fresh_base, staging, name)
    merge = config.model.lora_merge_on_export
    if merge and layout.shared:
        _diffusers(plain_transformer(fresh_base, merge=names[0])).save_pretrained(
            staging / "transformer"
        )
        return True
    if merge:
        for i, name in enumerate(names):
            merged = _diffusers(plain_transformer(fresh_base, merge=name))
            merged.save_pretrained(staging / f"transformer_step{i}")
    if config.model.pretrained_path is not None:
        # The base is frozen: it is the pretrained transformer (GBs at full size, and every
        # checkpoint carries an export), linked like the other frozen parts.
        pretrained = resolve_model_folder(
            config.model.pretrained_path, "transformer", "model.pretrained_path"
        )
        link_folder(staging / "transformer", pretrained)
    else:
        _diffusers(plain_transformer(fresh_base)).save_pretrained(staging / "transformer")
    # Per-step: no stock pipeline runs K adapters (nor K networks).
    return layout.exports_stock_pipeline()


def _diffusers(model: nn.Module) -> ModelMixin:
    """``model`` as the diffusers model it is: plain_transformer copies the diffusers base."""
    return cast("ModelMixin", model)


def load_lora_export(
    directory: Path, num_steps: int, transformer_cls: type[ModelMixin]
) -> nn.Module | None:
    """The networks of a LoRA export: the base with its adapter, a :class:`PerStepLoRA` (base +
    K adapters), or K merged per-step networks. None where the export's transformer/ is all
    there is to load (no LoRA files, or a merged shared adapter)."""
    model = _lora_model_config(directory)
    if model is None:
        return None
    layout = NetworkLayout(model)
    if model.lora_merge_on_export and layout.shared:
        return None
    if model.lora_merge_on_export:
        # Merged per-step LoRA: transformer/ is the base, the step networks are beside it.
        steps = [directory / f"transformer_step{i}" for i in range(num_steps)]
        return nn.ModuleList(transformer_cls.from_pretrained(p) for p in steps)
    base = transformer_cls.from_pretrained(directory / "transformer")
    if layout.shared:
        return load_lora_weights(base, directory / lora_weight_name(DEFAULT_ADAPTER))
    names = [f"step_{i}" for i in range(num_steps)]
    for name in names:
        load_lora_weights(base, directory / lora_weight_name(name), name)
    return PerStepLoRA(base, names)


def _lora_model_config(directory: Path) -> Any:
    """The ``[model]`` section of a LoRA export's run config; None for an export without LoRA
    files (its config is not read: an older export loads as before)."""
    if not any(directory.glob("pytorch_lora_weights*.safetensors")):
        return None
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{directory} holds LoRA files but no {CONFIG_NAME} (it says how to apply them)"
        )
    model = load_config(str(directory / CONFIG_NAME)).model
    return model if NetworkLayout(model).lora else None
