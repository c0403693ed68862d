"""One training step's models and micro-batch under fake tensors, run as the trainer runs it.

The builder side of the whole-step estimate (train/step_estimate.py): every model of a resolved
config built from its ``config.json`` under ``FakeTensorMode`` in the dtype the trainer gives it
(the denoiser, LoRA adapters or per-step copies, the VAE, the teacher's frozen copy, the GAN
discriminator; the objective's own ``E2ED2Loss`` with its LPIPS and reward networks), a fake
micro-batch of the data's shapes, and the trainer's own ``Trainer.train_step`` run on them
through a stand-in for its DeepSpeed engines (:func:`run_trainer_step`): the unroll, its cuts and
row passes, the teacher, the objective's pixel passes, crops and checkpoints, the GAN generator
term and every discriminator update are whatever the trainer does. Weights are never read:
LPIPS gets a random backbone, CLIP is built from its ``config.json``, the digit reward at its
default width (same bytes, same activations).

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
import inspect
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
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ..config import TrainConfig
from ..core import models
from ..core.batch import Batch
from ..core.estimate import UpperBoundShapes
from ..core.families import resolve_family
from ..core.faults import FaultPlan
from ..core.layout import NetworkLayout
from ..core.memory import LiveTensorTracker
from ..core.models import FrozenVAE, IdentityAutoencoder, build_autoencoder, build_denoiser
from ..core.network import (
    Conditioning,
    repeat_conditioning,
    uses_size_conditions,
)
from ..core.sampler import build_schedule
from ..core.trajectory import Trajectory, TrajectoryPlan
from ..data.shards import read_index
from ..data.storage import COMPUTE_DTYPES
from ..objectives import losses
from ..objectives.clip_reward import ClipPreprocess, ClipReward
from ..objectives.gan import build_discriminator
from ..objectives.losses import E2ED2Loss
from ..objectives.reward import DigitRewardMLP
from ..objectives.teacher import NoisePairedTeacher
from .step_guard import ReliabilityCounters

__all__ = [
    "FakeStep",
    "build_fake_loss",
    "config_only_folders",
    "build_fake_step",
    "measure",
    "one_term",
    "param_bytes",
    "param_count",
    "rows_of",
    "run_trainer_step",
    "stand_in_trainer",
]


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
    # lazy: transformers adds ~1 s over torch; only CLIP-reward estimates need it
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = os.fspath(path)
    with _default_dtype(dtype):
        model = CLIPModel(CLIPConfig.from_pretrained(folder, local_files_only=True))
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return ClipReward(model, tokenizer, ClipPreprocess.from_processor(processor, folder))


def _digit_reward_unread(path: str) -> nn.Module:
    return DigitRewardMLP().eval().requires_grad_(False)


@contextlib.contextmanager
def _weight_free_loss_models() -> Iterator[None]:
    """The objective's reward models built without reading weights (the estimate runs from
    ``config.json`` files alone); the objective code itself is unchanged."""
    with (
        mock.patch.object(ClipReward, "from_folder", staticmethod(_clip_from_config)),
        mock.patch.object(losses, "load_reward_model", _digit_reward_unread),
    ):
        yield


def _config_folder(path: str, subfolder: str, key: str) -> str:
    """``path`` or ``path/subfolder``, whichever holds a ``config.json`` (weights not needed:
    the launch check, core/models.py's ``resolve_model_folder``, also wants the safetensors)."""
    for folder in (path, os.path.join(path, subfolder)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(
        f"{key}={path!r} holds no config.json (nor {subfolder}/config.json); the estimate needs "
        "the model's config.json only, not its weights"
    )


@contextlib.contextmanager
def config_only_folders() -> Iterator[None]:
    """Model folders resolved by their ``config.json`` alone while the fake models are built:
    a preset is estimated before its weights are downloaded."""
    with mock.patch.object(models, "resolve_model_folder", _config_folder):
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
    autoencoder: IdentityAutoencoder | FrozenVAE
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
    shard_dir = data.shard_dir or ""
    if data.source == "shards" and os.path.isdir(shard_dir):
        index = read_index(shard_dir)
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
    # PixArt's config.json names the text width caption_channels, SD3's joint_attention_dim.
    width: Any = cfg.get("caption_channels") or cfg.get("joint_attention_dim")
    text_dim = int(width)
    # Text tokens when no data folder says: the family's (PixArt-α 120, Σ and Sana 300, SD3's
    # CLIP 77 + T5 256).
    family = resolve_family(config.model.family, config.model.pretrained_path, cfg["_class_name"])
    tokens = family.denoiser_text_tokens
    return {
        "channels": int(cfg["in_channels"]),
        "hw": (side, side),
        "tokens": tokens,
        "text_dim": text_dim,
    }


def _denoiser_config(config: TrainConfig) -> dict[str, Any] | None:
    if config.model.pretrained_path is None:
        return None
    folder = _config_folder(config.model.pretrained_path, "transformer", "model.pretrained_path")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _fake_cond(
    denoiser: nn.Module, batch: int, tokens: int, text_dim: int, hw: tuple[int, int], guided: bool
) -> Conditioning:
    states = torch.randn(batch, tokens, text_dim)
    mask: torch.Tensor | None = torch.ones(batch, tokens, dtype=torch.long)
    added: dict[str, torch.Tensor] | None = None
    pooled: torch.Tensor | None = None
    cfg: Any = denoiser.config  # diffusers' registered config (a FrozenDict, read as attributes)
    if uses_size_conditions(denoiser):  # PixArt-MS (diffusers derives it from sample_size 128)
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
    dtype = COMPUTE_DTYPES[config.run.precision]
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

    with mode, _default_dtype(dtype), config_only_folders():
        denoiser = denoiser_from_config()
        autoencoder = build_autoencoder(config.model, load_weights=False)
        teacher = None
        if config.objective.kind == "e2ed2" and config.objective.teacher_weight > 0:
            # Its schedule is built from real tensors (outside the mode); its network, the
            # trainer's frozen copy of the pretrained denoiser, is one more built from config (a
            # deep copy of fake tensors would belong to another fake mode).
            objective = config.objective
            if objective.teacher_sampler == "dpm_solver":
                # diffusers' DPM-Solver builds its grid with numpy, which fake tensors cannot
                # give. Its memory is the DDIM teacher's (one no-grad network call at a time, as
                # many calls) plus its previous x0 prediction: one latent of the batch more.
                objective = dataclasses.replace(objective, teacher_sampler="ddim")
            with _outside(mode):
                teacher = NoisePairedTeacher(nn.Module(), objective, config.sampler)
            teacher.network = denoiser_from_config().requires_grad_(False).eval()
        layout = NetworkLayout(config.model)
        # peft moves each new adapter (and layer) to its base layer's device and dtype with
        # Module.to, which cannot swap fake parameters; everything is on the CPU in the compute
        # dtype already, so the moves are skipped while a LoRA layout's adapters are built.
        no_moves = mock.patch.object(nn.Module, "to", lambda module, *a, **k: module)
        with no_moves if layout.lora else contextlib.nullcontext():
            network = layout.wrap(denoiser, k)
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
    with _disable_current_modes():
        yield


def _pooled_dim(config: TrainConfig) -> int | None:
    cfg = _denoiser_config(config)
    return None if cfg is None else cfg.get("pooled_projection_dim")


# -- running the step ------------------------------------------------------------------------------


def build_fake_loss(step: FakeStep, objective: Any) -> Any:
    """The objective's own loss module (built as the trainer builds it: float32 by default, the
    reward model in the compute dtype), under the step's fake mode."""
    decode = None if step.config.model.vae_path is None else step.autoencoder.decode
    extra: dict[str, Any] = {}
    if "decoder" in inspect.signature(E2ED2Loss).parameters:
        # The AutoencoderKL whose blocks objective.decode_checkpoint_blocks checkpoints, as the
        # trainer passes it.
        extra["decoder"] = getattr(step.autoencoder, "vae", None)
    with step.mode, _weight_free_loss_models(), _quiet_loggers():
        return E2ED2Loss(_without_weight_files(objective), decode, reward_dtype=step.dtype, **extra)


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


def measure(step: FakeStep, fn: Callable[[], object]) -> tuple[int, int]:
    with step.mode, LiveTensorTracker(track_cuda=False) as tracker, UpperBoundShapes():
        fn()
    report = tracker.report()
    return report.peak_bytes, report.host_peak_bytes


# -- the trainer's own step on the fake models ------------------------------------------------------


class _ScalarReads(TorchDispatchMode):
    """``.item()`` / ``bool()`` of a fake tensor read as 0 (enter it inside the fake mode).

    The trainer logs its loss terms with ``.item()`` and checks them with ``math.isfinite``; a
    fake tensor has no value, and a logged number changes no memory.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return False if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        return func(*args, **(kwargs or {}))


class _Engine(nn.Module):
    """What the trainer's step reads of a DeepSpeed engine, around a fake module: ``backward``
    is autograd's (ZeRO's gradient handling is the caller's ``drop_full_grads``)."""

    def __init__(self, module: nn.Module, grad_accum_steps: int) -> None:
        super().__init__()
        self.module = module
        self._accum = grad_accum_steps
        self.optimizer = None
        self.skipped_steps = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self._accum if scale_wrt_gas else loss).backward()

    def gradient_accumulation_steps(self) -> int:
        return self._accum

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        del boundary  # no optimizer here: the step's memory is the resident terms'


class _Guard:
    """The step guard's ``step()``: the optimizer step frees the full gradients (ZeRO-0/1 keep
    them until then); never skips."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module

    def step(self) -> bool:
        if self.module is not None:
            for param in self.module.parameters():
                param.grad = None
        return False


class _Dataset:
    def __init__(self, rows: int) -> None:
        self.captions = ["a photograph of a cat sitting on a wooden table"] * rows
        self.rows = rows

    def __len__(self) -> int:
        return self.rows


class _Metrics:
    def scalar(self, *args: Any) -> None:
        pass

    def flush(self) -> None:
        pass


def _batch(step: FakeStep) -> Batch:
    """The fake micro-batch as the data loader collates it (``Batch.conditioning`` reads it
    back)."""
    cond = step.cond
    added = cond.added_cond_kwargs or {}
    rows = step.latents.shape[0]
    return Batch(
        latents=step.latents,
        encoder_hidden_states=cond.encoder_hidden_states,
        index=torch.arange(rows),
        encoder_attention_mask=cond.encoder_attention_mask,
        pooled_projections=cond.pooled_projections,
        resolution=added.get("resolution"),
        aspect_ratio=added.get("aspect_ratio"),
        label=torch.zeros(rows, dtype=torch.long),
    )


def stand_in_trainer(step: FakeStep, config: TrainConfig, loss_fn: Any) -> Any:
    """A :class:`~e2ed2.engine.train.trainer.Trainer` over the fake models, without DeepSpeed,
    data loader or output folder: its ``train_step`` runs the step exactly as training does
    (the unroll, its cuts, the teacher, the objective's passes, the GAN terms, the
    discriminator updates), with the plan fixed to the step's worst one."""
    # lazy: train.trainer imports deepspeed; the estimate and the dry run import this module without
    # it
    from .trainer import Trainer

    # Any: the stand-ins (_Engine, _Guard, _Metrics, the fixed _plan) take the places of the
    # trainer's DeepSpeed engines, guards, metrics log and plan method by duck typing.
    trainer: Any = Trainer.__new__(Trainer)
    rows = step.latents.shape[0]
    trainer.config = config
    trainer.rank, trainer.world_size, trainer.is_main = 0, 1, False
    trainer.device = torch.device("cpu")
    trainer.compute_dtype = step.dtype
    trainer.engine = _Engine(step.network, config.run.grad_accum_steps)
    trainer.layout = NetworkLayout(config.model)
    trainer.guard = _Guard(step.network)
    trainer._gather_once = False
    trainer.faults = FaultPlan()  # none: the estimate is of a healthy step
    trainer.null_cond = step.cond.unconditional
    trainer.teacher = step.teacher if config.objective.teacher_weight > 0 else None
    trainer.teacher_seconds = 0.0
    trainer.loss_fn = loss_fn
    trainer.trajectory = step.trajectory
    trainer.trajectories = {step.trajectory.config.num_steps: step.trajectory}
    trainer._plan = lambda: (step.trajectory, step.plan)
    discriminator = step.discriminator if config.gan.enabled else None
    trainer.disc_engine = _Engine(discriminator, 1) if discriminator is not None else None
    trainer.disc_guard = _Guard(discriminator) if discriminator is not None else None
    trainer.loader = type("Loader", (), {"dataset": _Dataset(rows)})()
    trainer.step = 0
    trainer.counters = ReliabilityCounters()
    trainer.ema = None  # its shadow is a resident term; its update allocates nothing new
    trainer.metrics = _Metrics()
    trainer.history = []
    return trainer


def run_trainer_step(
    step: FakeStep, config: TrainConfig, loss_fn: Any, tracker: LiveTensorTracker
) -> None:
    """One ``Trainer.train_step`` on the fake models inside ``tracker``: the phase
    ``"generator"`` up to the discriminator's updates, then ``"discriminator"`` (if any).
    Enter the fake mode and :class:`UpperBoundShapes` first."""
    trainer = stand_in_trainer(step, config, loss_fn)
    generator = tracker.phase("generator")
    generator.__enter__()
    closed = False
    updates = trainer._discriminator_updates

    def discriminator_updates(
        real: torch.Tensor, fake: torch.Tensor, cond: Conditioning
    ) -> dict[str, float]:
        nonlocal closed
        generator.__exit__(None, None, None)
        closed = True
        with tracker.phase("discriminator"):
            return updates(real, fake, cond)

    trainer._discriminator_updates = discriminator_updates
    with _ScalarReads():
        trainer.train_step(iter([_batch(step)]))
    if not closed:
        generator.__exit__(None, None, None)
