"""One training step's models and micro-batch under fake tensors, run as the trainer runs it.

The builder side of the whole-step estimate (train/step_estimate.py): every model of a resolved
config built from its ``config.json`` under ``FakeTensorMode`` in the dtype the trainer gives it
(the denoiser, LoRA adapters or per-step copies, the VAE, the teacher's frozen copy, the GAN
discriminator; the objective's own ``E2ED2Loss`` with its LPIPS and reward networks), a fake
micro-batch of the data's shapes, and the step's phases run through the real trajectory, cut
unroll, objective and GAN functions. Weights are never read: LPIPS gets a random backbone, CLIP
is built from its ``config.json``, the digit reward at its default width (same bytes, same
activations).

Where no data folder is at hand, the shapes come from the denoiser's ``config.json``
(``sample_size``, ``in_channels``, the caption width) and the text length from the model family
(PixArt's 120 T5 tokens, SD3's 77 CLIP + 256 T5 tokens).

Size: over 400 lines because building the step and running it share one state (the fake mode,
the models, the micro-batch); the builders of each model family and loss model are short and
listed in order of the trainer's own construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import TrainConfig
from ..core.estimate import UpperBoundShapes
from ..core.memory import LiveTensorTracker
from ..core.models import build_autoencoder, build_denoiser
from ..core.network import Conditioning, repeat_conditioning
from ..core.sampler import build_schedule
from ..core.step_cuts import CutUnroll
from ..core.trajectory import Trajectory, TrajectoryPlan

__all__ = [
    "FakeStep",
    "build_fake_loss",
    "build_fake_step",
    "measure",
    "one_term",
    "param_bytes",
    "param_count",
    "rows_of",
    "run_generator_step",
    "run_pixel_term",
]

_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Text tokens when no data folder says: PixArt's T5 captions, SD3's CLIP (77) + T5 (256) tokens.
_TEXT_TOKENS = {"PixArtTransformer2DModel": 120, "SD3Transformer2DModel": 333}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def param_bytes(module: nn.Module | None, *, trainable: bool | None = None) -> int:
    if module is None:
        return 0
    return sum(
        p.numel() * p.element_size()
        for p in module.parameters()
        if trainable is None or p.requires_grad == trainable
    )


def param_count(module: nn.Module, *, trainable: bool | None = None) -> int:
    return sum(
        p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )


def _clip_from_config(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``ClipReward`` from its folder's ``config.json``, tokenizer and processor files: the
    weights are not read (they do not change its bytes or activations)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from ..objectives.clip_reward import ClipPreprocess, ClipReward

    folder = os.fspath(path)
    with _default_dtype(dtype):
        model = CLIPModel(CLIPConfig.from_pretrained(folder, local_files_only=True))
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return ClipReward(model, tokenizer, ClipPreprocess.from_processor(processor, folder))


def _digit_reward_unread(path: str) -> nn.Module:
    from ..objectives.reward import DigitRewardMLP

    return DigitRewardMLP().eval().requires_grad_(False)


@contextlib.contextmanager
def _weight_free_loss_models() -> Iterator[None]:
    """The objective's reward models built without reading weights (the estimate runs from
    ``config.json`` files alone); the objective code itself is unchanged."""
    from ..objectives import losses
    from ..objectives.clip_reward import ClipReward

    with (
        mock.patch.object(ClipReward, "from_folder", staticmethod(_clip_from_config)),
        mock.patch.object(losses, "load_reward_model", _digit_reward_unread),
    ):
        yield


def _without_weight_files(objective: Any) -> Any:
    """The objective config with LPIPS's backbone file swapped for a random backbone (its bytes
    and activations are the same)."""
    if objective.lpips_weight > 0 and objective.lpips_backbone_path is not None:
        return dataclasses.replace(objective, lpips_backbone_path=None, lpips_random_backbone=True)
    return objective


def one_term(objective: Any, name: str) -> Any:
    """The objective with one weighted term (``name``) left: its cost measured alone."""
    weights = {key: 0.0 for key in ("l1", "l2", "lpips", "energy", "teacher", "reward")}
    weights[name] = 1.0
    return dataclasses.replace(objective, **{f"{k}_weight": w for k, w in weights.items()})


@dataclass
class FakeStep:
    """The fake models and inputs of one step."""

    config: TrainConfig
    mode: FakeTensorMode
    dtype: torch.dtype
    network: nn.Module  # what the trajectory calls (LoRA-wrapped when model.lora_rank)
    denoiser: nn.Module
    autoencoder: nn.Module
    teacher: Any
    latents: torch.Tensor  # (B, C, h, w) of one micro-batch
    cond: Conditioning
    trajectory: Trajectory
    plan: TrajectoryPlan
    discriminator: nn.Module | None
    pixel_channels: int


def _shapes(config: TrainConfig, denoiser_folder_config: dict[str, Any] | None) -> dict[str, Any]:
    """Latent channels, side and text width / tokens: from the data when its folder is there,
    else from the denoiser's config.json (a preset checked before the data is made)."""
    data = config.data
    if data.source == "digits":
        # The embedded digits: 1-channel pixels as latents, captions padded to max tokens (as
        # DigitsDataset builds them; not built here, it renders every image).
        side = data.resolution
        return {
            "channels": 1,
            "hw": (side, side),
            "tokens": data.caption_max_tokens,
            "text_dim": data.text_dim,
        }
    if data.source == "shards" and os.path.isdir(data.shard_dir or ""):
        from ..data.shards import read_index

        index = read_index(data.shard_dir)
        shapes = [tuple(b["latent_shape"]) for b in index["buckets"]]
        largest = max(shapes, key=lambda s: s[-1] * s[-2])
        tokens, text_dim = (int(n) for n in index["text"]["shape"])
        return {
            "channels": int(largest[0]),
            "hw": (int(largest[-2]), int(largest[-1])),
            "tokens": tokens,
            "text_dim": text_dim,
        }
    if denoiser_folder_config is None:
        raise ValueError(
            "the estimate needs the data folder or model.pretrained_path's config.json to know "
            "the latent and text shapes"
        )
    cfg = denoiser_folder_config
    side = int(cfg["sample_size"])
    text_dim = int(cfg.get("caption_channels") or cfg.get("joint_attention_dim"))
    tokens = _TEXT_TOKENS.get(cfg.get("_class_name", ""), 120)
    return {
        "channels": int(cfg["in_channels"]),
        "hw": (side, side),
        "tokens": tokens,
        "text_dim": text_dim,
    }


def _denoiser_config(config: TrainConfig) -> dict[str, Any] | None:
    if config.model.pretrained_path is None:
        return None
    from ..core.models import resolve_model_folder

    folder = resolve_model_folder(
        config.model.pretrained_path, "transformer", "model.pretrained_path"
    )
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _fake_cond(
    denoiser: nn.Module, batch: int, tokens: int, text_dim: int, hw: tuple[int, int], guided: bool
) -> Conditioning:
    states = torch.randn(batch, tokens, text_dim)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    added = pooled = None
    cfg = denoiser.config
    if getattr(cfg, "use_additional_conditions", None) or (
        getattr(cfg, "_class_name", "") == "PixArtTransformer2DModel"
        and getattr(cfg, "use_additional_conditions", None) is None
        and cfg.sample_size == 128
    ):
        added = {
            "resolution": torch.full((batch, 2), 8.0 * hw[0], dtype=torch.float32),
            "aspect_ratio": torch.ones(batch, 1, dtype=torch.float32),
        }
    if getattr(cfg, "pooled_projection_dim", None):
        pooled = torch.randn(batch, cfg.pooled_projection_dim)
        mask = None
    cond = Conditioning(states, mask, added, pooled_projections=pooled)
    if guided:
        null = Conditioning(
            states[:1].clone(),
            None if mask is None else mask[:1].clone(),
            pooled_projections=None if pooled is None else pooled[:1].clone(),
        )
        cond = cond.with_unconditional(null)
    return cond


def build_fake_step(config: TrainConfig, resolution_px: int | None) -> FakeStep:
    from ..core.lora import add_lora
    from ..core.network import per_step_networks
    from ..objectives.gan import build_discriminator
    from ..objectives.teacher import NoisePairedTeacher

    dtype = _COMPUTE_DTYPES[config.run.precision]
    shapes = _shapes(config, _denoiser_config(config))
    hw = shapes["hw"]
    if resolution_px is not None:
        side = resolution_px // 8 if config.model.vae_path is not None else resolution_px
        hw = (side, side)
    trajectory_config = config.trajectory
    k = max((trajectory_config.num_steps, *trajectory_config.num_steps_choices))
    mode = FakeTensorMode()

    def denoiser_from_config() -> nn.Module:
        return build_denoiser(
            config.model,
            latent_channels=shapes["channels"],
            latent_size=max(hw),
            text_dim=shapes["text_dim"],
            pooled_dim=_pooled_dim(config),
            load_weights=False,
        )

    with mode, _default_dtype(dtype):
        denoiser = denoiser_from_config()
        autoencoder = build_autoencoder(config.model, load_weights=False)
        teacher = None
        if config.objective.kind == "e2ed2" and config.objective.teacher_weight > 0:
            # Its schedule is built from real tensors (outside the mode); its network, the
            # trainer's frozen copy of the pretrained denoiser, is one more built from config (a
            # deep copy of fake tensors would belong to another fake mode).
            with _outside(mode):
                teacher = NoisePairedTeacher(nn.Module(), config.objective, config.sampler)
            teacher.network = denoiser_from_config().requires_grad_(False).eval()
        if config.model.lora_rank:
            network: nn.Module = add_lora(denoiser, config.model, k)
        elif config.model.share_across_steps:
            network = denoiser
        else:
            network = per_step_networks(denoiser, k)
        discriminator = None
        pixel_channels = shapes["channels"] if config.model.vae_path is None else 3
        if config.gan.enabled:
            discriminator = build_discriminator(config.gan, pixel_channels)
        batch = config.run.batch_per_rank
        latents = torch.randn(batch, shapes["channels"], *hw)
        cond = _fake_cond(
            denoiser,
            batch,
            shapes["tokens"],
            shapes["text_dim"],
            hw,
            guided=config.sampler.guidance_scale > 1,
        )
    trajectory = Trajectory(
        dataclasses.replace(trajectory_config, num_steps=k), build_schedule(config.sampler, k)
    )
    # The worst plan: from pure noise (or the first step), the most differentiated steps.
    grad_steps = (
        k if trajectory_config.truncation == "full" else min(k, trajectory_config.grad_steps)
    )
    plan = TrajectoryPlan(num_steps=k, start_index=0, grad_start_index=k - grad_steps)
    return FakeStep(
        config,
        mode,
        dtype,
        network,
        denoiser,
        autoencoder,
        teacher,
        latents,
        cond,
        trajectory,
        plan,
        discriminator,
        pixel_channels,
    )


@contextlib.contextmanager
def _outside(mode: FakeTensorMode) -> Iterator[None]:
    """Leaves ``mode`` for the code inside (real tensors), then re-enters it."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def _pooled_dim(config: TrainConfig) -> int | None:
    cfg = _denoiser_config(config)
    return None if cfg is None else cfg.get("pooled_projection_dim")


# -- running the step ------------------------------------------------------------------------------


def build_fake_loss(step: FakeStep, objective: Any) -> Any:
    """The objective's own loss module (built as the trainer builds it: float32 by default, the
    reward model in the compute dtype), under the step's fake mode."""
    from ..objectives.losses import E2ED2Loss

    decode = None if step.config.model.vae_path is None else step.autoencoder.decode
    with step.mode, _weight_free_loss_models(), _quiet_loggers():
        return E2ED2Loss(_without_weight_files(objective), decode, reward_dtype=step.dtype)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    # The random LPIPS backbone's warning is about the loss's meaning, not its memory.
    logger = logging.getLogger("e2ed2.engine.objectives.losses")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def rows_of(step: FakeStep) -> tuple[torch.Tensor, Conditioning, int]:
    m = step.config.trajectory.samples_per_prompt
    return step.latents.repeat_interleave(m, dim=0), repeat_conditioning(step.cond, m), m


def _loss_extras(loss_fn: Any, rows: int) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if loss_fn.needs_labels:
        extra["labels"] = torch.zeros(rows, dtype=torch.long)
    if loss_fn.needs_captions:
        extra["captions"] = ["a photograph of a cat sitting on a wooden table"] * rows
    return extra


def run_generator_step(
    step: FakeStep,
    loss_fn: Any,
    *,
    gan: bool,
    teacher: bool,
    trainable: list[torch.Tensor],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One micro-batch as the trainer's ``_generator_loss`` + backward runs it (m trajectories
    per prompt, the cut unroll's pieces, teacher, decode, objective, GAN generator term).
    Returns the (real, generated) pixels the discriminator then reads."""
    from ..objectives.gan import generator_adversarial_loss
    from ..objectives.losses import diffusion_loss

    config = step.config
    latents, cond, m = rows_of(step)
    if config.objective.kind == "diffusion":
        g = torch.Generator().manual_seed(0)
        diffusion_loss(
            step.network, step.latents, step.cond, config.sampler, generator=g
        ).backward()
        return None, None
    rows = latents.shape[0]
    generators = [torch.Generator().manual_seed(j) for j in range(rows)]
    start, noises = step.trajectory.draw_noise_per_sample(step.plan, latents, generators)
    traj = config.trajectory
    unroll = None
    if traj.per_step_backward or 0 < traj.rows_per_pass < rows:
        unroll = CutUnroll(per_step=traj.per_step_backward, rows_per_pass=traj.rows_per_pass)
        sample = unroll.run(step.trajectory, step.network, cond, start, noises, step.plan)
    else:
        sample = step.trajectory.run(step.network, cond, start, noises, step.plan)
    teacher_sample = None
    if teacher and step.teacher is not None:
        teacher_sample = step.teacher.sample(
            cond, start, step.trajectory.schedule, noises, generators
        )
    fake = real = None
    if gan or loss_fn.needs_pixels:
        fake = loss_fn.decode_sample(sample)
        real = loss_fn.decode_target(latents)
    terms = loss_fn(
        sample,
        latents,
        sample_pixels=fake,
        target_pixels=real,
        samples_per_prompt=m,
        teacher_sample=teacher_sample,
        **_loss_extras(loss_fn, rows),
    )
    total = terms["total"]
    if gan:
        adversarial = generator_adversarial_loss(step.discriminator, fake, loss=config.gan.loss)
        total = total + config.gan.weight * adversarial
    pieces = unroll.pieces(total, loss_divisor=config.run.grad_accum_steps) if unroll else [total]
    for piece in pieces:
        piece.backward()
    for param in trainable:
        param.grad = None  # the optimizer step (or ZeRO's partition) takes them
    return real, None if fake is None else fake.detach()


def run_pixel_term(step: FakeStep, loss_fn: Any, *, gan: bool) -> None:
    """One pixel term alone: decode a latent leaf of the batch's shape (in the graph), the
    term (LPIPS / reward / pixel energy, or the GAN generator term), backward to the latent."""
    from ..objectives.gan import generator_adversarial_loss

    latents, _, m = rows_of(step)
    sample = latents.clone().requires_grad_()
    fake = loss_fn.decode_sample(sample)
    real = loss_fn.decode_target(latents)
    if gan:
        total = generator_adversarial_loss(step.discriminator, fake, loss=step.config.gan.loss)
    elif loss_fn.config.weights.keys() == {"l2"}:  # the decode alone
        total = fake.float().mean()
    else:
        total = loss_fn(
            sample,
            latents,
            sample_pixels=fake,
            target_pixels=real,
            samples_per_prompt=m,
            **_loss_extras(loss_fn, latents.shape[0]),
        )["total"]
    total.backward()


def measure(step: FakeStep, fn: Callable[[], object]) -> tuple[int, int]:
    with step.mode, LiveTensorTracker(track_cuda=False) as tracker, UpperBoundShapes():
        fn()
    report = tracker.report()
    return report.peak_bytes, report.host_peak_bytes
