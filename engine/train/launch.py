"""Checks a config can only pass at launch: the DeepSpeed JSON for this world size, local files.

Not part of :class:`~e2ed2.engine.config.TrainConfig` because a config is also read where those
files are absent (an export's ``e2ed2_config.toml`` on another machine, ``--dry-run`` of a preset
on a laptop).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ..config import ConfigError, TrainConfig
from ..config.objective import TORCHVISION_MODELS
from ..core.models import resolve_model_folder
from ..data.shards import check_bucket_table, read_index
from ..objectives.clip_reward import check_clip_folder
from .distributed import build_ds_config
from .trackers import check_trackers

__all__ = ["check_launch"]


def check_launch(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """What a config can only be checked against at launch: the DeepSpeed JSON for this world
    size and the local files it names. Returns the DeepSpeed config; raises ConfigError.

    Not part of :class:`TrainConfig` itself because a config is also read where those files are
    absent (an export's ``e2ed2_config.toml`` on another machine, ``--dry-run`` of a preset).
    Runs before any model is built (``Trainer`` calls it first, ``e2ed2 train`` before that).
    """
    run = config.run
    config.check_prompt_only()  # data.source="prompts": the terms that need images, by name
    try:
        ds_config = build_ds_config(
            run.deepspeed_config,
            batch_per_rank=run.batch_per_rank,
            grad_accum_steps=run.grad_accum_steps,
            world_size=world_size,
            optim=config.optim,
            precision=run.precision,
            total_steps=run.max_steps,
        )
        _keep_linear_for_selective(config, ds_config)
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if run.zero3_gather_once and stage != 3:
            raise ValueError(
                f"run.zero3_gather_once=true needs ZeRO stage 3; run.deepspeed_config="
                f"{run.deepspeed_config!r} has stage {stage}"
            )
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err).replace("\n", " ")) from None
    # The local files and folders: every missing one is reported at once (a preset's dry run on
    # a new machine names all the paths to replace, not one per rerun).
    problems: list[str] = []
    for check in _local_path_checks(config):
        try:
            check()
        except (ValueError, FileNotFoundError) as err:
            message = str(err).replace("\n", " ")
            if message not in problems:
                problems.append(message)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            f"{len(problems)} problems with local paths: "
            + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        )
    return ds_config


def _local_path_checks(config: TrainConfig) -> list[Callable[[], object]]:
    """One check per local path the config names (each raises ValueError / FileNotFoundError)."""
    run = config.run
    checks: list[Callable[[], object]] = []
    pretrained_path, vae_path = config.model.pretrained_path, config.model.vae_path
    if pretrained_path is not None:
        checks.append(
            lambda: resolve_model_folder(pretrained_path, "transformer", "model.pretrained_path")
        )
    if vae_path is not None:
        checks.append(lambda: resolve_model_folder(vae_path, "vae", "model.vae_path"))
    lpips_path = config.objective.lpips_backbone_path
    if config.objective.lpips_weight > 0 and lpips_path is not None:

        def lpips_file() -> None:
            if not os.path.isfile(lpips_path):
                raise FileNotFoundError(
                    f"objective.lpips_backbone_path={lpips_path!r} does not exist; expected a "
                    f"torchvision {TORCHVISION_MODELS[config.objective.lpips_net]} state dict "
                    "(.pth)"
                )

        checks.append(lpips_file)
    reward_path, shard_dir = config.objective.reward_path, config.data.shard_dir
    if config.objective.needs_captions:
        assert reward_path is not None  # ObjectiveConfig requires it with a reward weight
        checks.append(lambda: check_clip_folder(reward_path))
    if config.data.source == "shards":
        assert shard_dir is not None  # DataConfig requires it for data.source = "shards"

        def shards() -> None:
            index = read_index(shard_dir)
            check_bucket_table(config.data, index)
            _check_latent_size(config, index)

        checks.append(shards)
    checks.append(lambda: _check_output_paths(config))
    checks.append(lambda: check_trackers(run.report_to))  # wandb named but not installed
    return checks


def _keep_linear_for_selective(config: TrainConfig, ds_config: dict[str, Any]) -> None:
    """ZeRO-3 with ``trajectory.checkpoint='selective'``: DeepSpeed's memory_efficient_linear off.

    With it on (DeepSpeed's default), ZeRO-3 replaces ``torch.nn.functional.linear`` by a version
    whose in-place bias add corrupts the matmul outputs a selective checkpoint keeps (see
    ``e2ed2.engine.core.deepspeed_compat.linear_mutates_its_matmul_output``). Off, ZeRO-3 keeps
    torch's linear, which saves the same input and weight for backward, so little is lost.
    """
    zero = ds_config.get("zero_optimization", {})
    if config.trajectory.checkpoint != "selective" or zero.get("stage", 0) != 3:
        return
    if zero.get("memory_efficient_linear") is True:
        raise ValueError(
            f"run.deepspeed_config={config.run.deepspeed_config!r} sets "
            "zero_optimization.memory_efficient_linear=true, which gives wrong gradients with "
            "trajectory.checkpoint='selective'; remove the key or set it to false"
        )
    ds_config["zero_optimization"] = {**zero, "memory_efficient_linear": False}


def _check_latent_size(config: TrainConfig, index: dict[str, Any]) -> None:
    """Every bucket's latent sides must split into the transformer's patches: model.patch_size,
    or a pretrained transformer's own (its config.json), which only launch can read."""
    patch, key = config.model.patch_size, "model.patch_size"
    if config.model.pretrained_path is not None:  # its own config.json's patch size
        folder = resolve_model_folder(
            config.model.pretrained_path, "transformer", "model.pretrained_path"
        )
        with open(os.path.join(folder, "config.json")) as f:
            patch = json.load(f).get("patch_size")
        key = f"model.pretrained_path={config.model.pretrained_path!r}: its patch_size"
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            return  # no patches (or no patch size to check against)
    for bucket in index["buckets"]:
        height, width = bucket["latent_shape"][-2:]
        if height % patch or width % patch:
            raise ValueError(
                f"{key}={patch} does not divide the latent size {height}x{width} of "
                f"data.shard_dir={config.data.shard_dir!r} (precompute it with a --resolution "
                f"that is a multiple of the VAE's downsampling factor x {patch})"
            )


def _check_output_paths(config: TrainConfig) -> None:
    """run.output_dir is a folder this process can create and write; run.resume_from a folder."""
    run = config.run
    output_dir = os.path.abspath(run.output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"run.output_dir={run.output_dir!r} is a file; it must be a folder")
    existing = output_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"run.output_dir={run.output_dir!r}: {existing!r} is not writable by this user"
        )
    resume_from = run.resume_from
    if (
        isinstance(resume_from, str)
        and not resume_from.isdigit()
        and not os.path.isdir(resume_from)
    ):
        raise ValueError(
            f"run.resume_from={resume_from!r} is not a folder; give a checkpoint folder "
            "(…/checkpoints/stepNNNNNNNN) or a step number"
        )
