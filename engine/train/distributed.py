"""DeepSpeed configuration: the shipped ZeRO JSON plus the values the run config owns.

The JSON files in ``ds_configs/`` describe *how* to shard (ZeRO stage, buckets, prefetch,
offload). Everything that is also a training setting (batch sizes, accumulation, clipping,
precision, optimizer, LR schedule) is derived here, in one place, from the run config; a JSON that
sets one of those keys to a different value is an error rather than a silent override.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..config import TrainConfig
from ..config.optim import OptimConfig
from ..config.presets import shipped_ds_configs
from ..config.run import Precision
from ..objectives.gan import build_discriminator
from .deepspeed_compat import release_shm_allreduce_buffer, use_weights_only_loading
from .supervise import RANK_STATUS_ENV

__all__ = [
    "OptimConfig",
    "build_discriminator_engine",
    "resolve_ds_config",
    "build_ds_config",
    "init_distributed",
    "exit_process",
    "free_port",
    "lost_peer",
]


def resolve_ds_config(name_or_path: str) -> Path:
    """A shipped config by name (``zero2``, ``zero3``, ``zero3_offload``, ``none``) or a path."""
    path = Path(name_or_path)
    shipped = shipped_ds_configs()
    if path.suffix != ".json":
        path = Path(shipped.get(name_or_path, f"{name_or_path}.json"))
    if not path.is_file():
        raise FileNotFoundError(
            f"run.deepspeed_config={name_or_path!r}: no DeepSpeed JSON at {str(path)!r} "
            f"(shipped: {sorted(shipped)}, or give a path to a .json file)"
        )
    return path


def build_ds_config(
    ds_config: str,
    *,
    batch_per_rank: int,
    grad_accum_steps: int,
    world_size: int,
    optim: OptimConfig,
    precision: Precision,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """The full DeepSpeed config dict of one engine. ``total_steps``: the run's optimizer steps
    (run.max_steps), where optim.lr_schedule = "cosine" ends."""
    path = resolve_ds_config(ds_config)
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"run.deepspeed_config={str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"run.deepspeed_config={str(path)!r} must hold a JSON object")
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": batch_per_rank * grad_accum_steps * world_size,
        "gradient_clipping": optim.grad_clip,
    }
    owner = {
        "train_micro_batch_size_per_gpu": "run.batch_per_rank",
        "gradient_accumulation_steps": "run.grad_accum_steps",
        "train_batch_size": f"run.batch_per_rank x run.grad_accum_steps x {world_size} ranks",
        "gradient_clipping": "optim.grad_clip",
    }
    for key, value in derived.items():
        if key in config and config[key] != value:
            reason = ""
            if key == "train_batch_size" and isinstance(config[key], int):
                per_rank = config[key] / (grad_accum_steps * world_size)
                if not per_rank.is_integer():
                    reason = f" (not divisible by {world_size} ranks x {grad_accum_steps} accum)"
            raise ValueError(
                f"run.deepspeed_config={str(path)!r}: {key}={config[key]}{reason} disagrees "
                f"with {owner[key]} = {value}; the run config sets it, remove the key from the JSON"
            )
    if "e2ed2_gather_once_per_iteration" in config:
        raise ValueError(
            f"run.deepspeed_config={str(path)!r}: 'e2ed2_gather_once_per_iteration' is no "
            "DeepSpeed key; remove it and set run.zero3_gather_once=true"
        )
    for owned in ("optimizer", "scheduler", "bf16", "fp16"):
        if owned in config:
            raise ValueError(
                f"run.deepspeed_config={str(path)!r}: {owned!r} is set by the run config "
                "(optim.*, run.precision); remove it from the JSON"
            )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(
            f"run.deepspeed_config={str(path)!r}: zero_optimization.stage={stage!r} is not one "
            "of [0, 1, 2, 3]"
        )
    config.update(derived)
    # Explicit rather than DeepSpeed's default: the trainer relies on a non-finite gradient norm
    # making the ZeRO / bf16 optimizer skip the step on every rank (see Trainer.train_step).
    config["bf16"] = {"enabled": precision == "bf16", "check_grad_overflow": True}
    config["fp16"] = {"enabled": precision == "fp16"}
    config["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": optim.lr,
            "betas": [optim.beta1, optim.beta2],
            "eps": optim.eps,
            "weight_decay": optim.weight_decay,
        },
    }
    if optim.lr_schedule == "cosine":
        if total_steps is None:
            raise ValueError("optim.lr_schedule='cosine' needs the run's length (run.max_steps)")
        # WarmupCosineLR warms up over max(2, n) steps from warmup_min_ratio x lr and refuses
        # n = 0: without a warmup, a ratio of 1 holds lr over those first steps (no step at 0).
        config["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_min_ratio": 0.0 if optim.warmup_steps > 0 else 1.0,
                "warmup_num_steps": max(1, optim.warmup_steps),
                "cos_min_ratio": optim.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    elif optim.warmup_steps > 0:
        # Without warmup no scheduler at all: WarmupLR would give step 0 a learning rate of 0.
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": optim.lr,
                "warmup_num_steps": optim.warmup_steps,
                "warmup_type": "linear",
            },
        }
    assert (
        config["train_batch_size"]
        == config["train_micro_batch_size_per_gpu"]
        * config["gradient_accumulation_steps"]
        * world_size
    )
    return config


def build_discriminator_engine(
    config: TrainConfig,
    pixel_channels: int,
    world_size: int,
    *,
    base: Any = None,
    text_dim: int | None = None,
) -> Any:
    """The GAN discriminator's own DeepSpeed engine: plain data parallel (ZeRO off, it is
    small), its own AdamW from ``[gan]``, no warmup, the run's precision. ``base`` / ``text_dim``:
    the frozen denoiser and text width of gan.discriminator='denoiser_features' (only its heads
    are the engine's parameters)."""
    # lazy: deepspeed adds ~0.6 s and logs its accelerator line; the launch checks and the dry run
    # import this module without it
    import deepspeed

    run = config.run
    disc = build_discriminator(
        config.gan,
        pixel_channels,
        base=base,
        text_dim=text_dim,
        sampler=config.sampler,
        seed=config.run.seed,
    )
    disc_ds = build_ds_config(
        "none",
        batch_per_rank=run.batch_per_rank,
        grad_accum_steps=1,
        world_size=world_size,
        optim=dataclasses.replace(
            config.optim,
            lr=config.gan.lr,
            beta1=config.gan.beta1,
            beta2=config.gan.beta2,
            weight_decay=config.gan.weight_decay,
            warmup_steps=0,
            lr_schedule="constant",
            min_lr_ratio=0.0,
        ),
        precision=run.precision,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=disc, model_parameters=list(disc.parameters()), config=disc_ds
    )
    use_weights_only_loading(engine)
    return engine


def init_distributed() -> tuple[int, int]:
    """Starts torch.distributed through DeepSpeed (launcher env, or a 1-process group).

    ``e2ed2 train`` without a launcher runs as a world of one; the rendezvous variables the
    launcher would set are filled in for that case.
    """
    # lazy: deepspeed adds ~0.6 s and logs its accelerator line; the launch checks and the dry run
    # import this module without it
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    release_shm_allreduce_buffer(rank, world_size)
    return rank, world_size


def exit_process(code: int) -> NoReturn:
    """Ends this process with ``code``; a rank of a multi-process group skips interpreter teardown.

    Left to interpreter teardown, the gloo process group (and the DeepSpeed objects that keep
    references to it) can be destroyed in an order that aborts a rank whose peer has already
    exited (``terminate called without an active exception``, exit -6: seen about once in four
    2-rank CPU runs), and the ``deepspeed`` launcher then reports a finished run as failed. So a
    rank that finished meets its peers at a barrier (skipped after an error, where a peer may
    never arrive), tears the group down, flushes logs and streams (every output file is already
    closed by then) and leaves with ``os._exit``. Only for a process about to exit: in-process
    callers (tests) keep DeepSpeed's cached groups valid by never calling this.
    """
    _report_exit_code(code)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        sys.exit(code)
    if code == 0:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lost_peer(error: BaseException) -> bool:
    """True if ``error`` is a collective that failed because a peer rank is gone (gloo's reset
    connection, NCCL's abort or watchdog timeout): the peer's own message says why."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return "gloo" in text and any(
        cause in text for cause in ("Connection reset", "Connection closed", "Timed out")
    )


def _report_exit_code(code: int) -> None:
    """Under ``e2ed2 launch``: this rank's exit code, for the supervisor (train/supervise.py) to
    name a failed rank and its code (the ranks are not its children, so it cannot wait for them)."""
    folder = os.environ.get(RANK_STATUS_ENV)
    if folder:
        try:
            with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
                f.write(str(code))
        except OSError:
            pass  # the supervisor then reports this rank as ended without a code


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
