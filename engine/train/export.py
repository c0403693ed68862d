"""Exporting trained weights as a diffusers pipeline folder that ``from_pretrained`` loads.

Layout::

    <dir>/model_index.json      PixArtAlphaPipeline (StableDiffusion3Pipeline for an SD3
                                transformer): every component below, by library and class
    <dir>/transformer/          PixArtTransformer2DModel / SD3Transformer2DModel (shared), or
    <dir>/transformer_step{i}/  one per sampler step (independent per-step networks; then no
                                model_index.json: no stock pipeline runs K different networks)
    <dir>/scheduler/            the sampler's diffusers scheduler config
    <dir>/vae/                  the frozen AutoencoderKL: a symlink to model.vae_path's folder
    <dir>/text_encoder/         the frozen T5: a symlink to the pretrained pipeline folder's
    <dir>/tokenizer/            text_encoder/ + tokenizer/ (else to the folders the shards were
                                encoded with, from the shard index); the embedded digits save
                                their tiny T5 and ByT5 tokenizer here as real folders. SD3:
                                text_encoder{,_2,_3}/ + tokenizer{,_2,_3}/, symlinks to the
                                SD3 pipeline folder's (pretrained, else the shards' encoder)
    <dir>/e2ed2_config.toml     the run config (data/conditioning, sampler, model settings)
    <dir>/README.md             the sampling settings it was trained with (K, guidance_scale)

With LoRA (``model.lora_rank >= 1``) the adapters are diffusers LoRA files beside the model,
``transformer/`` holding the frozen base (or the merged weights): see lora_export.py.

Frozen parts are symlinked, not copied (T5-XXL alone is ~19 GB and every checkpoint carries an
export); ``cp -rL export elsewhere`` materialises them. Latent presets load as a stock pipeline::

    pipe = PixArtAlphaPipeline.from_pretrained("runs/x/export")
    image = pipe("a cat", num_inference_steps=4, guidance_scale=0.0).images[0]

with ``guidance_scale`` = the run's ``sampler.guidance_scale`` where it guided (> 1: the
pipeline's negative prompt "" is the empty prompt the training used; 0.0 or 1.0 = off); the
export's README.md states the K and guidance_scale it was trained at.

The embedded digits have no VAE (pixel space): ``model_index.json`` lists ``vae`` as null, so
``PixArtAlphaPipeline.from_pretrained(export, vae=None)`` loads, and
``pipe(prompt, output_type="latent", use_resolution_binning=False, guidance_scale=0.0)`` returns
the 1-channel images in [-1, 1] themselves (the pipeline assumes an 8x VAE: height = width =
8 x data.resolution).

Written to a temporary sibling and published with one rename, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..config import TrainConfig, config_to_toml
from ..config.sampler import SCHEDULER_CLASS_NAMES
from ..core.families import ModelFamily, denoiser_class_names, family_of_pipeline_folder
from ..core.layout import NetworkLayout
from ..core.lora import lora_base
from ..core.models import model_family, resolve_model_folder
from ..data.text import digits_text_encoder
from .export_files import CONFIG_NAME, link_folder, read_json
from .lora_export import load_lora_export, write_lora_networks

if TYPE_CHECKING:
    # From their modules: diffusers' top-level names type as its dummy (torch-less) objects.
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin
    from transformers.modeling_utils import PreTrainedModel

__all__ = [
    "CONFIG_NAME",
    "gathered_state_dict",
    "load_exported_networks",
    "sampling_settings",
    "write_export",
]


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> ModelMixin:
    """A fresh diffusers model (no engine hooks, no fused kernels) holding ``state``."""
    # ``model`` is a diffusers denoiser, so a ConfigMixin too: its registered config builds it.
    denoiser = cast("ConfigMixin", model)
    fresh = cast("ModelMixin", type(denoiser).from_config(denoiser.config))
    fresh.load_state_dict(state, strict=True)
    return fresh


def gathered_state_dict(module: nn.Module, *, on_this_rank: bool) -> dict[str, torch.Tensor] | None:
    """``module``'s full fp32 state dict on CPU, gathered from ZeRO-3 partitions (every rank must
    call it: the gather is collective); None where ``on_this_rank`` is False."""
    # lazy: deepspeed adds ~0.6 s and logs its accelerator line; sampling and evaluation import this
    # module without it
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
    if NetworkLayout(config.model).lora:
        stock_pipeline = write_lora_networks(staging, config, module, state)
    elif isinstance(module, nn.ModuleList):
        stock_pipeline = False
        for i, network in enumerate(module):
            prefix = f"{i}."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            _plain_copy(network, part).save_pretrained(staging / f"transformer_step{i}")
    else:
        stock_pipeline = True
        _plain_copy(module, state).save_pretrained(staging / "transformer")
    scheduler = config.sampler.to_diffusers()
    # Every diffusers scheduler is a ConfigMixin too (SchedulerMixin's type does not say so).
    cast("ConfigMixin", scheduler).save_pretrained(staging / "scheduler")
    family = _exported_family(config, module)
    frozen = (
        _joint_text_components(staging, config, family)
        if family.text_encoding == "sd3"
        else _frozen_components(staging, config)
    )
    components: dict[str, list[str | None]] = {
        "transformer": ["diffusers", family.denoiser_class],
        "scheduler": ["diffusers", type(scheduler).__name__],
        **frozen,
    }
    if stock_pipeline:
        _write_model_index(staging, components, family.pipeline_class)
    (staging / CONFIG_NAME).write_text(config_to_toml(config))
    (staging / "README.md").write_text(sampling_settings(config))
    if directory.exists():
        retired = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(directory, retired)
        os.replace(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, directory)
    return directory


def sampling_settings(config: TrainConfig) -> str:
    """The export's README.md: the sampler, K and guidance scale the model was trained at."""
    sampler, num_steps = config.sampler, config.trajectory.num_steps
    guidance = sampler.guidance_scale
    if guidance > 1:
        cfg = (
            f"guidance_scale = {guidance!r}: classifier-free guidance, the unconditional half "
            'from the negative prompt "" (the PixArt pipelines\' default; the empty prompt '
            "the training used)"
        )
    else:
        cfg = "guidance_scale = 1.0: no classifier-free guidance (diffusers: any value <= 1)"
    return (
        "# Sampling settings of this e2ed2 export\n\n"
        "Trained end to end through the sampler below; sample it with the same settings:\n\n"
        f"- scheduler: {SCHEDULER_CLASS_NAMES[sampler.kind]} (scheduler/), "
        f"num_inference_steps = {num_steps}\n"
        f"- {cfg}\n\n"
        f"    image = pipe(prompt, num_inference_steps={num_steps}, "
        f"guidance_scale={guidance!r}).images[0]\n\n"
        "The run's whole config: e2ed2_config.toml; `e2ed2 sample` reads it.\n"
    )


def _exported_family(config: TrainConfig, module: nn.Module) -> ModelFamily:
    """The run's family (its pipeline class is the export's), checked against the exported
    transformer(s) (per-step: the first's)."""
    if isinstance(module, nn.ModuleList):
        module = module[0]
    family = model_family(config.model)
    name = type(lora_base(module)).__name__
    if name != family.denoiser_class:
        raise ValueError(
            f"cannot export a {name} as a {family.pipeline_class} (model.family resolved to "
            f"{family.name!r}, which trains a {family.denoiser_class})"
        )
    return family


def _write_model_index(
    staging: Path, components: dict[str, list[str | None]], pipeline: str
) -> None:
    # lazy: diffusers adds ~3 s over torch; sampling and evaluation import this module without it
    import diffusers

    index: dict[str, object] = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
    }
    index.update(dict(sorted(components.items())))
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _frozen_components(staging: Path, config: TrainConfig) -> dict[str, list[str | None]]:
    """Puts the frozen vae/, text_encoder/ and tokenizer/ into ``staging``; their
    model_index.json entries ([library, class], or [None, None] where there is none)."""
    entries: dict[str, list[str | None]] = {"vae": [None, None]}
    if config.model.vae_path is not None:
        vae = resolve_model_folder(config.model.vae_path, "vae", "model.vae_path")
        link_folder(staging / "vae", vae)
        entries["vae"] = [
            "diffusers",
            read_json(vae, "config.json").get("_class_name", "AutoencoderKL"),
        ]
    if config.data.source == "digits":
        # Pixel space: the tiny T5 exists only inside e2ed2 (seeded), so it is saved here.
        tokenizer, encoder = digits_text_encoder(config.data.text_dim, config.data.seed)
        # digits_text_encoder's encoder is a transformers T5EncoderModel.
        cast("PreTrainedModel", encoder).save_pretrained(staging / "text_encoder")
        tokenizer.save_pretrained(staging / "tokenizer")
        return {
            **entries,
            "text_encoder": ["transformers", type(encoder).__name__],
            "tokenizer": ["transformers", type(tokenizer).__name__],
        }
    encoder_dir, tokenizer_dir = _text_folders(config)
    entries["text_encoder"] = entries["tokenizer"] = [None, None]
    if encoder_dir is not None:
        link_folder(staging / "text_encoder", encoder_dir)
        architectures = read_json(encoder_dir, "config.json").get("architectures") or []
        entries["text_encoder"] = ["transformers", (architectures or ["T5EncoderModel"])[0]]
    if tokenizer_dir is not None:
        link_folder(staging / "tokenizer", tokenizer_dir)
        tokenizer_class = read_json(tokenizer_dir, "tokenizer_config.json").get("tokenizer_class")
        entries["tokenizer"] = ["transformers", tokenizer_class or "T5Tokenizer"]
    return entries


def _joint_text_components(
    staging: Path, config: TrainConfig, family: ModelFamily
) -> dict[str, list[str | None]]:
    """SD3's frozen vae/, three text encoders and three tokenizers, linked from a pipeline folder
    of the family (model.pretrained_path's, else the one the shards were encoded with); their
    model_index.json entries, as the pipeline folder's own model_index.json lists them."""
    entries: dict[str, list[str | None]] = {
        "vae": [None, None],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    if config.model.vae_path is not None:
        vae = resolve_model_folder(config.model.vae_path, "vae", "model.vae_path")
        link_folder(staging / "vae", vae)
        entries["vae"] = [
            "diffusers",
            read_json(vae, "config.json").get("_class_name", "AutoencoderKL"),
        ]
    candidates = [config.model.pretrained_path]
    if config.data.source == "shards":
        shard_dir = config.data.shard_dir
        assert shard_dir is not None  # DataConfig requires it for data.source = "shards"
        recorded = read_json(shard_dir, "index.json").get("text_encoder") or {}
        candidates.append(recorded.get("path"))
    folder = next((c for c in candidates if family_of_pipeline_folder(c) == family), None)
    listed = read_json(folder, "model_index.json") if folder is not None else {}
    for part in family.frozen_text_parts:
        entries[part] = [None, None]
        if folder is not None and (Path(folder) / part).is_dir():
            link_folder(staging / part, str(Path(folder) / part))
            entries[part] = list(listed.get(part) or [None, None])
    return entries


def _text_folders(config: TrainConfig) -> tuple[str | None, str | None]:
    """The text encoder and tokenizer folders: the pretrained pipeline folder's, else those the
    shards were encoded with (recorded in their index.json by ``e2ed2 precompute``)."""
    encoder = tokenizer = None
    if config.model.pretrained_path is not None:
        root = Path(config.model.pretrained_path)
        if (root / "text_encoder" / "config.json").is_file():
            encoder = str(root / "text_encoder")
        if (root / "tokenizer").is_dir():
            tokenizer = str(root / "tokenizer")
    if config.data.source == "shards" and (encoder is None or tokenizer is None):
        shard_dir = config.data.shard_dir
        assert shard_dir is not None  # DataConfig requires it for data.source = "shards"
        recorded = read_json(shard_dir, "index.json").get("text_encoder") or {}
        if encoder is None and os.path.isdir(recorded.get("path") or ""):
            encoder = recorded["path"]
        if tokenizer is None and os.path.isdir(recorded.get("tokenizer") or ""):
            tokenizer = recorded["tokenizer"]
    return encoder, tokenizer


def load_exported_networks(
    directory: str | os.PathLike, num_steps: int
) -> nn.Module | nn.ModuleList:
    """The shared network, or the K per-step networks, of an export folder (with LoRA: the
    base with its adapters loaded, or the merged weights; per-step LoRA unmerged: a
    :class:`~e2ed2.engine.core.lora.PerStepLoRA`); their class is the one their config.json
    names (PixArt or SD3)."""
    directory = Path(directory)
    transformer_cls = _exported_class(directory)
    lora = load_lora_export(directory, num_steps, transformer_cls)
    if lora is not None:
        return lora
    if (directory / "transformer").is_dir():
        return transformer_cls.from_pretrained(directory / "transformer")
    steps = [directory / f"transformer_step{i}" for i in range(num_steps)]
    if all(p.is_dir() for p in steps):
        return nn.ModuleList(transformer_cls.from_pretrained(p) for p in steps)
    raise FileNotFoundError(
        f"{directory}: no transformer/ nor transformer_step0..{num_steps - 1}/ folders; "
        "expected an `e2ed2 train` export"
    )


def _exported_class(directory: Path) -> type[ModelMixin]:
    """The diffusers class of an export's transformer(s), from their config.json."""
    # lazy: diffusers adds ~3 s over torch; sampling and evaluation import this module without it
    import diffusers

    for folder in ("transformer", "transformer_step0"):
        name = read_json(directory / folder, "config.json").get("_class_name")
        if name in denoiser_class_names():
            return getattr(diffusers, name)
    return getattr(diffusers, denoiser_class_names()[0])
