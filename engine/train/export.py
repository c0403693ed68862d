"""Exporting trained weights as diffusers folders that ``from_pretrained`` loads.

Layout::

    <dir>/transformer/          PixArtTransformer2DModel (shared network), or
    <dir>/transformer_step{i}/  one per sampler step (independent per-step networks)
    <dir>/scheduler/            the sampler's diffusers scheduler config
    <dir>/e2ed2_config.toml     the run config (data/conditioning, sampler, model settings)

Written to a temporary sibling and published with one rename, so a reader never sees half of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from torch import nn

from ..config import TrainConfig, config_to_toml

__all__ = ["CONFIG_NAME", "gathered_state_dict", "load_exported_networks", "write_export"]

CONFIG_NAME = "e2ed2_config.toml"


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> PixArtTransformer2DModel:
    """A fresh diffusers model (no engine hooks, no fused kernels) holding ``state``."""
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(state, strict=True)
    return fresh


def gathered_state_dict(module: nn.Module, *, on_this_rank: bool) -> dict[str, torch.Tensor] | None:
    """``module``'s full fp32 state dict on CPU, gathered from ZeRO-3 partitions (every rank must
    call it: the gather is collective); None where ``on_this_rank`` is False."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if not on_this_rank:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def write_export(
    directory: str | os.PathLike,
    config: TrainConfig,
    module: nn.Module,
    state: dict[str, torch.Tensor],
) -> Path:
    """``module``'s architecture with weights ``state`` (full, gathered) -> ``directory``."""
    directory = Path(directory)
    staging = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if isinstance(module, nn.ModuleList):
        for i, network in enumerate(module):
            prefix = f"{i}."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            _plain_copy(network, part).save_pretrained(staging / f"transformer_step{i}")
    else:
        _plain_copy(module, state).save_pretrained(staging / "transformer")
    config.sampler.to_diffusers().save_pretrained(staging / "scheduler")
    (staging / CONFIG_NAME).write_text(config_to_toml(config))
    if directory.exists():
        retired = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(directory, retired)
        os.replace(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, directory)
    return directory


def load_exported_networks(
    directory: str | os.PathLike, num_steps: int
) -> nn.Module | nn.ModuleList:
    """The shared network, or the K per-step networks, of an export folder."""
    directory = Path(directory)
    if (directory / "transformer").is_dir():
        return PixArtTransformer2DModel.from_pretrained(directory / "transformer")
    steps = [directory / f"transformer_step{i}" for i in range(num_steps)]
    if all(p.is_dir() for p in steps):
        return nn.ModuleList(PixArtTransformer2DModel.from_pretrained(p) for p in steps)
    raise FileNotFoundError(
        f"{directory}: no transformer/ nor transformer_step0..{num_steps - 1}/ folders; "
        "expected an `e2ed2 train` export"
    )
