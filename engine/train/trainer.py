"""The E2ED2 trainer: owns the loop; everything else is a component it calls.

One optimizer step (per rank, per micro-batch)::

    batch {latents z0, text states, mask}
      -> plan (start step, truncation; same on every rank) and per-sample noise (seeded by the
         sample's position in the global batch, so 1 rank with batch 2B and 2 ranks with batch B
         draw identical noise)
      -> trajectory: K sampler steps with gradients (checkpoint policy from the config)
      -> objective: L1/L2/LPIPS on ẑ0 (+ GAN term on decoded pixels)   | or the diffusion loss
      -> engine.backward / engine.step (DeepSpeed; ZeRO per ds config) -> EMA update
      -> GAN: discriminator updates on real vs (detached) generated pixels with its own engine

Reliability: a step whose loss or gradient is NaN/Inf on any rank is skipped by every rank (and
counted; ``run.max_consecutive_nonfinite_steps`` in a row write a checkpoint and stop the run);
bad data samples arrive already replaced by the dataset and are counted here against
``data.max_bad_sample_fraction``.

Size: over 400 lines because the loop's phases (build, resume, one step, GAN updates, logging,
sampling, export) share one state (step, engines, counters); each phase's mechanics live in its
own module (step_guard, metrics, fingerprint, checkpoint, export, distributed).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, TrainConfig, config_to_toml
from ..core.batch import Batch
from ..core.faults import FaultPlan
from ..core.layout import NetworkLayout
from ..core.loss_terms import DIFFUSION_KEY, TOTAL_KEY, GeneratorLoss, LossTerms, total_key
from ..core.models import build_autoencoder, build_denoiser
from ..core.network import Conditioning, repeat_conditioning
from ..core.sampler import build_schedule
from ..core.sampling import generate_pixels, save_grid
from ..core.step_cuts import CutUnroll, row_slices
from ..core.trajectory import Trajectory, TrajectoryPlan
from ..data import (
    batch_conditioning,
    build_dataloader,
    derive_seed,
    null_conditioning,
    sample_conditioning,
)
from ..data.storage import COMPUTE_DTYPES
from ..objectives.gan import (
    discriminator_loss,
    discriminator_pieces,
    generator_adversarial_loss,
)
from ..objectives.losses import E2ED2Loss, diffusion_loss
from ..objectives.teacher import NoisePairedTeacher
from .checkpoint import CheckpointStore, ProcessRng, use_weights_only_loading
from .checkpointed import MODEL, Checkpointed, DeepSpeedEngineState, RankPrivate, RankTensors
from .deepspeed_compat import skipped_steps
from .distributed import build_discriminator_engine, init_distributed
from .ema import ShardedEMA
from .export import gathered_state_dict, write_export
from .fingerprint import CheckpointMismatchError, run_fingerprint
from .gather_once import gathered_once
from .launch import check_launch
from .metrics import MetricsLog, mean_across_ranks, peak_memory_bytes
from .run_dir import apply_start, plan_start
from .signals import Interrupted, StopSignals
from .step_backward import backward_each, backward_in_pieces
from .step_guard import ReliabilityCounters, StepGuard, any_rank
from .validation import ValidationPrompts

if TYPE_CHECKING:
    from ..data.digits import DigitsDataset
    from ..data.prompts_source import PromptDataset
    from ..data.shards import LatentShardDataset

    # What the loader holds: one of data/batching.py's build_dataset's datasets.
    TrainingDataset = DigitsDataset | LatentShardDataset | PromptDataset

__all__ = ["CheckpointMismatchError", "DataError", "Interrupted", "NonFiniteError", "Trainer"]

log = logging.getLogger("e2ed2.train")


class NonFiniteError(RuntimeError):
    """``run.max_consecutive_nonfinite_steps`` optimizer steps in a row had a NaN/Inf."""


class DataError(RuntimeError):
    """More bad samples than ``data.max_bad_sample_fraction`` allows."""


class Trainer:
    """Builds every component from a :class:`TrainConfig` and runs the training loop."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        run = config.run
        self.rank, self.world_size = init_distributed()
        self.is_main = self.rank == 0
        # Test-only failures (a NaN loss at a step, ...), E2ED2_FAULTS; empty unless set.
        self.faults = FaultPlan.from_env()
        # Before any data or model: the DeepSpeed JSON for this world size and local paths.
        ds_config = check_launch(config, self.world_size)
        # run.zero3_gather_once: gather ZeRO-3 parameters once per micro-batch and keep them
        # across the K steps (train/gather_once.py).
        self._gather_once = run.zero3_gather_once

        accelerator = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(
            accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif run.cpu_threads:
            torch.set_num_threads(run.cpu_threads)
        torch.manual_seed(derive_seed(run.seed, "torch", self.rank))
        self.output_dir = Path(run.output_dir)
        # The resume decision reads the output folder only: nothing is written into it before,
        # so a refused start (another run, a mismatched or broken checkpoint) changes no file.
        zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.fingerprint = run_fingerprint(config, zero_stage)
        self.start = plan_start(config, self.fingerprint, self.world_size)
        if self.start.universal is not None:  # written by other ranks (train/reshard.py)
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        if dist.is_initialized():
            dist.barrier()  # every rank has decided before rank 0 moves anything
        if self.is_main:
            apply_start(self.start, self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(config_to_toml(config))
        if dist.is_initialized():
            dist.barrier()  # the moves are done before any rank reads a checkpoint

        # Data: the latent/text shapes decide the denoiser's input/caption sizes. Still before
        # any model: a dataset smaller than one global batch or with no usable shard is a
        # config error, reported in one line.
        try:
            self.loader, self.sampler_state = build_dataloader(
                config.data, run.batch_per_rank, self.rank, self.world_size
            )
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"[data] {err}") from err
        dataset = self._dataset()
        # With aspect-ratio buckets the latents have several shapes (one per global batch): a
        # denoiser built from config gets the square they are built around as sample_size,
        # the reference grid of PixArt's positional embedding, recomputed per input h x w.
        channels, latent_size = dataset.latent_shape[0], dataset.base_latent_size
        _, text_dim = dataset.text_shape
        try:  # classifier-free guidance's empty prompt (None: guidance off), before any model
            self.null_cond = null_conditioning(dataset, config.sampler.guidance_scale)
        except ValueError as err:
            raise ConfigError(f"[sampler] {err}") from err

        # Frozen modules are built plainly (never under zero.Init) and never wrapped. The VAE
        # runs in the compute dtype: the bf16/fp16 sample is decoded (LPIPS, GAN, sample grids)
        # at half the activation memory of fp32 (FrozenVAE.decode casts whatever it is given).
        self.compute_dtype = COMPUTE_DTYPES[run.precision]
        # run.validation_prompts: encoded once now, before the denoiser takes the device memory
        # (train/validation.py; the text encoder is freed again).
        self.validation = None
        if run.validation_prompts:
            self.validation = ValidationPrompts(config, dataset, self.device, self.compute_dtype)
        self.autoencoder = build_autoencoder(config.model).to(self.device, self.compute_dtype)
        # As a torch Module: diffusers' wrapped ModelMixin.to types without its bound self.
        denoiser: nn.Module = build_denoiser(
            config.model,
            latent_channels=channels,
            latent_size=latent_size,
            text_dim=text_dim,
            pooled_dim=getattr(dataset, "pooled_dim", None),  # SD3's pooled text embedding
        )
        num_steps = config.trajectory.num_steps
        self.schedule = build_schedule(config.sampler, num_steps)
        # The teacher copies the pretrained weights before DeepSpeed wraps (or, under ZeRO-3,
        # partitions) the denoiser; it stays a plain frozen module on every rank.
        self.teacher = None
        self.teacher_seconds = 0.0
        if config.objective.kind == "e2ed2" and config.objective.teacher_weight > 0:
            self.teacher = NoisePairedTeacher(denoiser, config.objective, config.sampler)
            self.teacher.to(self.device, self.compute_dtype)
        # gan.discriminator = "denoiser_features": heads on the frozen pretrained denoiser
        # (the teacher's copy when there is one), taken before adapters or DeepSpeed.
        frozen_base: nn.Module | None = None
        if config.gan.enabled and config.gan.discriminator == "denoiser_features":
            if self.teacher is not None:
                frozen_base = self.teacher.network
            else:
                frozen_base = copy.deepcopy(denoiser).requires_grad_(False).eval()
                frozen_base.to(self.device, self.compute_dtype)
        # After the teacher's copy: it samples with the pretrained weights, no adapters.
        self.layout = NetworkLayout(config.model)
        try:  # LoRA targets that match no module, or that the fused kernels would bypass
            module = self.layout.wrap(denoiser, num_steps)
        except ValueError as err:
            raise ConfigError(f"[model] {err}") from err
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=module,
            model_parameters=self.layout.trainable_parameters(module),
            config=ds_config,
        )
        use_weights_only_loading(self.engine)
        # ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers skip a step whose all-reduced gradient
        # norm is NaN/Inf (counted in engine.skipped_steps); plain fp32 without ZeRO does not,
        # so the trainer checks the gradients itself there (see train_step).
        self.guard = StepGuard(self.engine, self.device)
        ema_params = self.layout.ema_parameters(self.engine.module)
        self.ema = ShardedEMA(ema_params, config.ema.decay) if config.ema.enabled else None

        self.trajectory = Trajectory(config.trajectory, self.schedule)
        # trajectory.num_steps_choices: one trajectory per K, the step's K drawn in _plan.
        self.trajectories = {
            k: Trajectory(
                dataclasses.replace(config.trajectory, num_steps=k),
                build_schedule(config.sampler, k),
            )
            for k in config.trajectory.num_steps_choices
            if k != num_steps
        }
        self.trajectories[num_steps] = self.trajectory
        decode = None if config.model.vae_path is None else self.autoencoder.decode
        # decoder: the AutoencoderKL whose blocks objective.decode_checkpoint_blocks checkpoints.
        self.loss_fn = (
            E2ED2Loss(
                config.objective,
                decode,
                reward_dtype=self.compute_dtype,
                decoder=getattr(self.autoencoder, "vae", None),
            ).to(self.device)
            if config.objective.kind == "e2ed2"
            else None
        )

        self.disc_engine = self.disc_guard = None
        if config.gan.enabled:
            pixel_channels = channels if config.model.vae_path is None else 3
            self.disc_engine = build_discriminator_engine(
                config, pixel_channels, self.world_size, base=frozen_base, text_dim=text_dim
            )
            self.disc_guard = StepGuard(self.disc_engine, self.device)

        self.store = CheckpointStore(
            self.output_dir / "checkpoints",
            rank=self.rank,
            world_size=self.world_size,
            keep=run.keep_checkpoints,
            device=self.device,
            fingerprint=self.fingerprint,
        )
        self.step = 0
        self.counters = ReliabilityCounters()
        # Everything a checkpoint holds, registered once; the store saves and restores each
        # entry by its kind (train/checkpointed.py). The step is the checkpoint's own.
        self.checkpointed: Checkpointed = {MODEL: DeepSpeedEngineState(self.engine)}
        if self.disc_engine is not None:
            self.checkpointed["discriminator"] = DeepSpeedEngineState(self.disc_engine)
        if self.ema is not None:
            self.checkpointed["ema"] = RankTensors(self.ema, self.engine.module, label="EMA")
        self.checkpointed["rng"] = RankPrivate(ProcessRng())
        self.checkpointed["data"] = self.sampler_state
        self.checkpointed["counters"] = self.counters
        self.history: list[dict[str, float]] = []
        if self.start.checkpoint is not None:
            self._resume(self.start.checkpoint)
        self._last_checkpoint_step = self.step
        self.metrics = MetricsLog(
            self.output_dir,
            resume_step=self.step,
            enabled=self.is_main,
            report_to=run.report_to,
            wandb_project=run.wandb_project,
            run_config=dataclasses.asdict(config),  # the resolved config (wandb's run config)
        )

    # -- state ---------------------------------------------------------------------------------
    def _dataset(self) -> TrainingDataset:
        # build_dataloader builds the loader over build_dataset's dataset (the DataLoader's
        # attribute types as a plain Dataset).
        return cast("TrainingDataset", self.loader.dataset)

    def _resume(self, path: Path) -> None:
        # The fingerprint was checked by plan_start, before any model was built: loading a
        # differently shaped model would fail deep inside DeepSpeed instead of naming the key.
        state = self.store.load(path, self.checkpointed)
        self.step = state["step"]
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        self._last_checkpoint_step = self.step
        return self.store.save(
            self.step,
            self.checkpointed,
            # Each checkpoint carries its EMA as a diffusers export, so `e2ed2 sample` and
            # `from_pretrained` work on any checkpoint without DeepSpeed.
            write_extra=lambda staging: self.export(staging / "export"),
        )

    # -- one iteration -------------------------------------------------------------------------
    def _batch_to_device(
        self, batch: Batch
    ) -> tuple[torch.Tensor, Conditioning, torch.Tensor | None]:
        """Latents, conditioning and (when the objective scores prompts: the reward) labels."""
        latents = batch.latents.to(self.device, self.compute_dtype, non_blocking=True)
        # Text in the compute dtype; PixArt-MS's size conditions (shards) ride along in float32.
        cond = batch_conditioning(batch).with_unconditional(self.null_cond)
        cond = cond.to(self.device, self.compute_dtype)
        labels = None
        if self.loss_fn is not None and self.loss_fn.needs_labels:
            if batch.label is None:
                raise ValueError(
                    "objective.reward_weight > 0 needs a prompt label per sample (the digits "
                    "data); this batch has none"
                )
            labels = batch.label.to(self.device, torch.long, non_blocking=True)
        return latents, cond, labels

    def _plan(self) -> tuple[Trajectory, TrajectoryPlan]:
        """This step's trajectory (its K) and plan: the same on every rank, since both are part
        of the global batch's computation."""
        g = torch.Generator().manual_seed(derive_seed(self.config.run.seed, "plan", self.step))
        trajectory = self.trajectory
        choices = self.config.trajectory.num_steps_choices
        if choices:
            trajectory = self.trajectories[
                choices[int(torch.randint(len(choices), (1,), generator=g))]
            ]
        return trajectory, trajectory.plan(g)

    def _start_and_noise(
        self,
        trajectory: Trajectory,
        plan: TrajectoryPlan,
        latents: torch.Tensor,
        micro_step: int,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Start sample and per-step noise, each sample seeded by its global batch position."""
        generators = self._generators("noise", latents, micro_step)
        return trajectory.draw_noise_per_sample(plan, latents, generators)

    def _generators(
        self, purpose: str, latents: torch.Tensor, micro_step: int
    ) -> list[torch.Generator]:
        """One generator per row, seeded by the row's position in the global batch: 1 rank with
        batch 2B and 2 ranks with batch B draw identical noise."""
        batch = latents.shape[0]
        first = (micro_step * self.world_size + self.rank) * batch
        return [
            torch.Generator(device=self.device).manual_seed(
                derive_seed(self.config.run.seed, purpose, self.step, first + j)
            )
            for j in range(batch)
        ]

    def _networks(self) -> nn.Module:
        return self.layout.networks(self.engine)

    def _generator_loss(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        micro_step: int,
        labels: torch.Tensor | None = None,
        captions: list[str] | None = None,
        unroll: CutUnroll | None = None,
    ) -> GeneratorLoss:
        """Total loss of one micro-batch, its logged terms, and (GAN) real/fake pixels
        (``unroll``: the unroll cut for a backward in pieces, train/step_backward.py)."""
        config = self.config
        if config.objective.kind == "diffusion":
            seed = derive_seed(config.run.seed, "diffusion", self.step, micro_step, self.rank)
            g = torch.Generator(device=self.device).manual_seed(seed)
            loss = diffusion_loss(self._networks(), latents, cond, config.sampler, generator=g)
            return GeneratorLoss(LossTerms(loss, {DIFFUSION_KEY: loss.item()}, DIFFUSION_KEY))
        # objective.kind = "e2ed2" (the only other kind): __init__ built its loss module.
        assert self.loss_fn is not None

        # m trajectories per prompt: one batch of B·m rows, prompt i in rows i·m .. i·m+m-1,
        # each row with its own seeded start and step noise.
        m = config.trajectory.samples_per_prompt
        latents = latents.repeat_interleave(m, dim=0)
        cond = repeat_conditioning(cond, m)
        if labels is not None:
            labels = labels.repeat_interleave(m, dim=0)
        if captions is not None:
            captions = [caption for caption in captions for _ in range(m)]
        trajectory, plan = self._plan()
        start, noises = self._start_and_noise(trajectory, plan, latents, micro_step)
        if unroll is None:
            sample = trajectory.run(self._networks(), cond, start, noises, plan)
        else:
            sample = unroll.run(trajectory, self._networks(), cond, start, noises, plan)
        teacher_sample = None
        if self.teacher is not None:
            started = time.perf_counter()
            teacher_sample = self.teacher.sample(
                cond,
                start,
                trajectory.schedule,
                noises,
                self._generators("teacher-noise", latents, micro_step),
            )
            self.teacher_seconds += time.perf_counter() - started
        fake_pixels = real_pixels = None
        needs_pixels = config.gan.enabled or self.loss_fn.needs_pixels
        crops = None
        if needs_pixels:  # objective.pixel_crop: seeded per step / micro-step / rank (resumable)
            seed = derive_seed(config.run.seed, "pixel-crop", self.step, micro_step, self.rank)
            # latents are (B, C, h, w): the last two sizes are the latent's (h, w).
            hw = cast("tuple[int, int]", latents.shape[-2:])
            crops = self.loss_fn.draw_crops(len(latents), hw, seed, m)
        if needs_pixels and config.objective.pixel_rows_per_pass:
            # objective.pixel_rows_per_pass: the pixel terms (GAN generator term included) a
            # pass of rows at a time, each backpropagated to the cut final latent (losses.py).
            passed = self.loss_fn.terms_in_passes(
                sample,
                latents,
                samples_per_prompt=m,
                teacher_sample=teacher_sample,
                labels=labels,
                captions=captions,
                crops=crops,
                adversarial=self._adversarial if config.gan.enabled else None,
                adversarial_weight=config.gan.weight_at(self.step),
                keep_pixels=config.gan.enabled,
            )
            logged = {name: value.item() for name, value in passed.terms.items()}
            if "adversarial" in logged:
                logged["gan_generator"] = logged.pop("adversarial")
            return GeneratorLoss(
                LossTerms(passed.loss, logged), passed.target_pixels, passed.sample_pixels
            )
        if needs_pixels:
            fake_pixels = self.loss_fn.decode_sample(self.loss_fn.crop(sample, crops))
            real_pixels = self.loss_fn.decode_target(self.loss_fn.crop(latents, crops))
        terms = self.loss_fn(
            sample,
            latents,
            sample_pixels=fake_pixels,
            target_pixels=real_pixels,
            samples_per_prompt=m,
            teacher_sample=teacher_sample,
            labels=labels,
            captions=captions,
        )
        total = terms[TOTAL_KEY]
        logged = {name: value.item() for name, value in terms.items()}
        if config.gan.enabled:
            # gan.enabled: __init__ built the discriminator's engine; the pixels are decoded above.
            assert self.disc_engine is not None and fake_pixels is not None
            adversarial = generator_adversarial_loss(
                self.disc_engine.module,
                fake_pixels,
                loss=config.gan.loss,
                cond=cond if config.gan.discriminator == "denoiser_features" else None,
            )
            # gan.weight_schedule: the weight at this (0-based) optimizer step.
            total = total + config.gan.weight_at(self.step) * adversarial
            logged["gan_generator"] = adversarial.item()
            logged[TOTAL_KEY] = total.item()
        return GeneratorLoss(LossTerms(total, logged), real_pixels, fake_pixels)

    def _adversarial(self, pixels: torch.Tensor) -> torch.Tensor:
        """Eq. 8's generator term on generated pixels (the discriminator frozen)."""
        assert self.disc_engine is not None  # passed as the adversarial term when gan.enabled
        return generator_adversarial_loss(
            self.disc_engine.module, pixels, loss=self.config.gan.loss
        )

    def _discriminator_updates(
        self, real: torch.Tensor, fake: torch.Tensor, cond: Conditioning
    ) -> dict[str, float]:
        """Paper App. C.2: several discriminator updates per generator update (each in passes
        of objective.pixel_rows_per_pass rows, one micro-step each, when set). ``cond``: the
        micro-batch's prompts (one row each), read by gan.discriminator='denoiser_features'."""
        rows_cond = None
        if self.config.gan.discriminator == "denoiser_features":
            rows_cond = repeat_conditioning(cond, self.config.trajectory.samples_per_prompt)
        # Called only with the discriminator's engine and guard (built together, gan.enabled).
        assert self.disc_engine is not None and self.disc_guard is not None
        losses = []
        rows_per_pass = self.config.objective.pixel_rows_per_pass
        for _ in range(self.config.gan.disc_steps_per_gen_step):
            if 0 < rows_per_pass < len(real):
                pieces = discriminator_pieces(
                    self.disc_engine,
                    real,
                    fake.detach(),
                    self.config.gan.loss,
                    rows_per_pass=rows_per_pass,
                    cond=rows_cond,
                )
                count = len(row_slices(len(real), rows_per_pass))
                values = backward_each(self.disc_engine, pieces, count, last_micro_batch=True)
                loss = torch.stack(values).sum()
            else:
                loss = discriminator_loss(
                    self.disc_engine, real, fake.detach(), loss=self.config.gan.loss, cond=rows_cond
                )
                self.disc_engine.backward(loss)
            # Plain data parallel: the guard skips a non-finite fp32 step on every rank alike
            # (DeepSpeed does in bf16/fp16), so a NaN never reaches the discriminator weights.
            if self.disc_guard.step():
                self.counters.skipped_disc_steps += 1
                if self.is_main:
                    log.warning(
                        "step %d: NaN/Inf discriminator gradient, discriminator step skipped "
                        "(%d in total)",
                        self.step + 1,
                        self.counters.skipped_disc_steps,
                    )
                continue
            losses.append(loss.item())
        if not losses:  # every discriminator step of this micro-batch was skipped (logged)
            return {}
        return {"gan_discriminator": sum(losses) / len(losses)}

    def _cut_unroll(self, batch: int) -> CutUnroll | None:
        """How this micro-batch's unroll is cut; None: one unroll, one backward (the default)."""
        traj = self.config.trajectory
        rows = batch * traj.samples_per_prompt
        passes = 0 < traj.rows_per_pass < rows
        if not (traj.per_step_backward or passes):  # the config refused both for diffusion
            return None
        return CutUnroll(per_step=traj.per_step_backward, rows_per_pass=traj.rows_per_pass)

    def _count_bad_samples(self, batch: Batch) -> int:
        for where in batch.bad_sample or ():
            if where:
                log.warning("step %d: skipped bad sample %s", self.step + 1, where)
        counts = batch.bad_count
        return 0 if counts is None else int(counts.sum())

    def train_step(self, batches: Iterator[Batch]) -> dict[str, float]:
        """One optimizer step (``grad_accum_steps`` micro-batches); returns rank-mean scalars.

        A NaN/Inf loss on any rank, or a NaN/Inf gradient, skips the optimizer step on every
        rank (see :mod:`~e2ed2.engine.train.step_guard`): the loss is poisoned to NaN so that the
        gradient norm DeepSpeed all-reduces is NaN everywhere.
        """
        terms: dict[str, float] = {}
        run = self.config.run
        accum = run.grad_accum_steps
        skipped_before = skipped_steps(self.engine)
        cleared = local_nonfinite = False
        bad = drawn = 0
        if self.loss_fn is not None:  # objective.energy_weight_schedule reads the step
            self.loss_fn.set_step(self.step)
        for micro_step in range(accum):
            batch = next(batches)
            bad += self._count_bad_samples(batch)
            drawn += len(batch)
            latents, cond, labels = self._batch_to_device(batch)
            # Labels, captions and the unroll cut go by keyword, only when they are used.
            extra: dict[str, Any] = {} if labels is None else {"labels": labels}
            if self.loss_fn is not None and self.loss_fn.needs_captions:
                # The CLIP reward scores each sample against its caption string (the dataset's,
                # by the sample's index: bad samples arrive replaced, with their own index).
                captions = self._dataset().captions
                extra["captions"] = [captions[int(i)] for i in batch.index]
            # trajectory.per_step_backward / rows_per_pass: the unroll is cut at every sampler
            # step and / or run in passes of rows, each backward piece a DeepSpeed micro-step
            # of its own (train/step_backward.py).
            unroll = self._cut_unroll(len(latents))
            if unroll is not None:
                extra["unroll"] = unroll
            with gathered_once(self.engine.module, enabled=self._gather_once):
                generated = self.faults.on_generator_loss(
                    self._generator_loss(latents, cond, micro_step, **extra),
                    step=self.step + 1,
                    rank=self.rank,
                )
                loss, logged = generated.terms.total, dict(generated.terms.logged)
                real, fake = generated.real_pixels, generated.fake_pixels
                if not generated.terms.finite:
                    local_nonfinite = True
                    loss = loss * float("nan")
                if unroll is None:
                    self.engine.backward(loss)
                else:
                    last = micro_step == accum - 1
                    backward_in_pieces(self.engine, unroll, loss, last_micro_batch=last)
            cleared = self.guard.step() or cleared
            # The discriminator learns from this micro-batch's generated pixels only if they
            # are finite on every rank (its engine is plain data parallel: NaN would spread).
            if self.disc_engine is not None and not any_rank(local_nonfinite, self.device):
                # gan.enabled: the generator loss decoded both (kept by its passes, if any).
                assert real is not None and fake is not None
                logged.update(self._discriminator_updates(real, fake, cond))
            for name, value in logged.items():
                terms[name] = terms.get(name, 0.0) + value / accum
        skipped = cleared or skipped_steps(self.engine) > skipped_before
        # One small all-reduce per step: every rank must agree on the skip (a disagreement
        # would be a DeepSpeed bug that silently desynchronises the replicas) and the data
        # counters are global.
        stats = torch.tensor([float(skipped), float(bad), float(drawn)], dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            stats = stats.to(self.device)
            dist.all_reduce(stats)
        ranks_skipping, bad, drawn = (int(v) for v in stats.tolist())
        if 0 < ranks_skipping < self.world_size:
            raise RuntimeError(
                f"step {self.step + 1}: {ranks_skipping} of {self.world_size} ranks skipped the "
                "optimizer step; the replicas are no longer in sync"
            )
        self.step += 1
        counters = self.counters
        if skipped:
            counters.skipped_steps += 1
            counters.consecutive_skipped_steps += 1
            if self.is_main:
                log.warning(
                    "step %d: NaN/Inf %s, optimizer step skipped (%d in a row, %d in total)",
                    self.step,
                    "loss" if local_nonfinite else "loss or gradient on some rank",
                    counters.consecutive_skipped_steps,
                    counters.skipped_steps,
                )
        else:
            counters.consecutive_skipped_steps = 0
            if self.ema is not None:
                self.ema.update()
        counters.bad_samples += bad
        counters.samples_drawn += drawn
        if skipped or bad:
            self.metrics.scalar("train/skipped_nonfinite_steps", counters.skipped_steps, self.step)
            self.metrics.scalar("data/bad_samples", counters.bad_samples, self.step)
        self._check_bad_fraction()
        return terms

    def _check_bad_fraction(self) -> None:
        limit = self.config.data.max_bad_sample_fraction
        # Relative to the dataset until an epoch has been drawn: a few bad files among the
        # first batches are a small share of the data, not half of it.
        counters = self.counters
        share = counters.bad_samples / max(counters.samples_drawn, len(self._dataset()))
        if share > limit:
            self.metrics.flush()
            raise DataError(
                f"{counters.bad_samples} of {counters.samples_drawn} samples drawn were bad (share "
                f"{share:.4f} > data.max_bad_sample_fraction={limit}); the log names each one. "
                "Fix or re-run `e2ed2 precompute` on the data, or raise the limit"
            )

    # -- sampling and export -------------------------------------------------------------------
    def write_samples(self) -> Path | None:
        """A PNG grid of EMA samples (all ranks run the forward: ZeRO-3 gathers collectively)."""
        count = self.config.run.num_sample_images
        if count == 0:
            return None
        cond, _ = sample_conditioning(self.loader.dataset, count)
        cond = cond.with_unconditional(self.null_cond)
        context = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        self.engine.eval()
        with context:
            pixels = generate_pixels(
                self._networks(),
                self.schedule,
                self.autoencoder.decode,
                cond,
                self._dataset().latent_shape,
                seed=self.config.run.seed,
                device=self.device,
                dtype=self.compute_dtype,
            )
        self.engine.train()
        if not self.is_main:
            return None
        path = self.output_dir / "samples" / f"step{self.step:08d}.png"
        grid = save_grid(pixels, path)
        self.metrics.image("samples", grid, self.step)
        return path

    def write_validation(self) -> list[Path]:
        """The validation prompts' captioned grids, one per K (all ranks sample; rank 0 writes
        and logs them to the trackers)."""
        if self.validation is None:
            return []
        context = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        self.engine.eval()
        with context:
            pixels = self.validation.sample(
                self._networks(),
                self.autoencoder.decode,
                self.null_cond,
                device=self.device,
                dtype=self.compute_dtype,
            )
        self.engine.train()
        if not self.is_main:
            return []
        return self.validation.write(pixels, self.output_dir, self.step, self.metrics)

    def export(self, directory: Path) -> Path | None:
        """The EMA weights (else the trained ones) as a diffusers folder, from rank 0."""
        context = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        module = self.engine.module
        with context:
            state = gathered_state_dict(module, on_this_rank=self.is_main)
        if not self.is_main:
            return None
        assert state is not None  # gathered on this rank (on_this_rank=is_main)
        return write_export(directory, self.config, module, state)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Trains to ``run.max_steps``; SIGTERM / SIGINT stop it after a step (see signals.py)."""
        with StopSignals() as stop:
            try:
                return self._train_loop(stop)
            finally:
                # Ends the progress bar's line, so an error message starts on its own line.
                self._progress.close()

    def _stop_for_signal(self, signum: int) -> None:
        """Checkpoints unless the newest is recent (run.signal_checkpoint_min_steps), raises."""
        min_steps = self.config.run.signal_checkpoint_min_steps
        if min_steps and self.step - self._last_checkpoint_step >= min_steps:
            where = f"checkpoint {self.save_checkpoint()} written"
        elif self._last_checkpoint_step:
            where = f"the newest checkpoint is step {self._last_checkpoint_step}"
        else:
            where = "no checkpoint written (run.signal_checkpoint_min_steps=0)"
        self.metrics.close()
        raise Interrupted(
            signum, f"stopped after step {self.step}: {where}; rerun the same command to resume"
        )

    def _train_loop(self, stop: StopSignals) -> list[dict[str, float]]:
        run = self.config.run
        batches = iter(self.loader)
        images_per_step = run.batch_per_rank * run.grad_accum_steps * self.world_size
        self._progress = progress = tqdm(
            total=run.max_steps,
            initial=self.step,
            desc="e2ed2 train",
            disable=not self.is_main,
            dynamic_ncols=True,
        )
        self.engine.train()
        last_log = time.perf_counter()
        steps_since_log = 0
        while self.step < run.max_steps:
            terms = self.train_step(batches)
            steps_since_log += 1
            progress.update(1)
            if self.step % run.log_every_steps == 0 or self.step == run.max_steps:
                now = time.perf_counter()
                terms = mean_across_ranks(terms, self.device)
                images_per_s = steps_since_log * images_per_step / (now - last_log)
                last_log, steps_since_log = now, 0
                record = {
                    "step": self.step,
                    **terms,
                    "images_per_s": images_per_s,
                    "skipped_nonfinite_steps": self.counters.skipped_steps,
                    "bad_samples": self.counters.bad_samples,
                }
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None and math.isfinite(float(grad_norm)):
                    record["grad_norm"] = float(grad_norm)
                record["lr"] = self.engine.get_lr()[0]
                record["peak_memory_bytes"] = peak_memory_bytes(self.device)
                self.history.append(record)
                if self.is_main:
                    loss_key = total_key(self.config.objective.kind)
                    progress.set_postfix(loss=f"{terms[loss_key]:.4f}")
                self.metrics.record(self.step, record, terms)
            if self.counters.consecutive_skipped_steps >= run.max_consecutive_nonfinite_steps:
                path = self.save_checkpoint()
                self.metrics.flush()
                raise NonFiniteError(
                    f"{self.counters.consecutive_skipped_steps} optimizer steps in a row (up to step "
                    f"{self.step}) had a NaN/Inf loss or gradient and were skipped "
                    f"(run.max_consecutive_nonfinite_steps={run.max_consecutive_nonfinite_steps});"
                    f" the weights of the last good step are in {path}. Lower optim.lr, check "
                    "the data, or use run.precision='fp32'"
                )
            if self.step % run.checkpoint_every_steps == 0 or self.step == run.max_steps:
                self.save_checkpoint()
            if self.step % run.sample_every_steps == 0 or self.step == run.max_steps:
                self.write_samples()
                self.write_validation()
            if self.step < run.max_steps and stop.requested(self.device):
                # requested() is True: the signal's number is set (a peer's: SIGTERM).
                self._stop_for_signal(cast(int, stop.signum))
        progress.close()
        if run.export_at_end:
            self.export(self.output_dir / "export")
        self.metrics.close()
        return self.history
