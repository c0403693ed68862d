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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointStore
from .config import TrainConfig, config_to_toml
from .data import build_dataloader, derive_seed
from .distributed import build_ds_config, init_distributed
from .ema import ShardedEMA
from .gan import build_discriminator, discriminator_loss, generator_adversarial_loss
from .models import build_autoencoder, build_denoiser
from .network import Conditioning, per_step_networks
from .objectives import E2ED2Loss, diffusion_loss
from .sample import generate_pixels, sample_conditioning, save_grid
from .sampler import build_schedule
from .trajectory import Trajectory, TrajectoryPlan, run_steps

__all__ = ["Trainer"]

log = logging.getLogger("e2ed2.train")


def _mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
        packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # CPU: the process's peak resident set (ru_maxrss is KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Trainer:
    """Builds every component from a :class:`TrainConfig` and runs the training loop."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        run = config.run
        self.rank, self.world_size = init_distributed()
        self.is_main = self.rank == 0
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(
            accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(derive_seed(run.seed, "torch", self.rank))
        self.output_dir = Path(run.output_dir)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(config_to_toml(config))

        # Data: the latent/text shapes decide the denoiser's input/caption sizes.
        self.loader, self.sampler_state = build_dataloader(
            config.data, run.batch_per_rank, self.rank, self.world_size
        )
        dataset = self.loader.dataset
        channels, latent_size, _ = dataset.latent_shape
        _, text_dim = dataset.text_shape

        # Frozen modules are built plainly (never under zero.Init) and never wrapped.
        self.autoencoder = build_autoencoder(config.model).to(self.device)
        denoiser = build_denoiser(
            config.model, latent_channels=channels, latent_size=latent_size, text_dim=text_dim
        )
        num_steps = config.trajectory.num_steps
        module: nn.Module = (
            denoiser if config.model.share_across_steps else per_step_networks(denoiser, num_steps)
        )
        ds_config = build_ds_config(
            run.deepspeed_config,
            batch_per_rank=run.batch_per_rank,
            grad_accum_steps=run.grad_accum_steps,
            world_size=self.world_size,
            optim=config.optim,
            precision=run.precision,
        )
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=ds_config,
        )
        self.compute_dtype = {
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
        }[run.precision]
        self.ema = (
            ShardedEMA(list(self.engine.module.parameters()), config.ema.decay)
            if config.ema.enabled
            else None
        )

        self.schedule = build_schedule(config.sampler, num_steps)
        self.trajectory = Trajectory(config.trajectory, self.schedule)
        decode = None if config.model.vae_path is None else self.autoencoder.decode
        self.loss_fn = (
            E2ED2Loss(config.objective, decode).to(self.device)
            if config.objective.kind == "e2ed2"
            else None
        )

        self.disc_engine = None
        if config.gan.enabled:
            pixel_channels = channels if config.model.vae_path is None else 3
            disc = build_discriminator(config.gan, pixel_channels)
            disc_ds = build_ds_config(
                "none",
                batch_per_rank=run.batch_per_rank,
                grad_accum_steps=1,
                world_size=self.world_size,
                optim=dataclasses.replace(
                    config.optim,
                    lr=config.gan.lr,
                    beta1=config.gan.beta1,
                    beta2=config.gan.beta2,
                    weight_decay=config.gan.weight_decay,
                    warmup_steps=0,
                ),
                precision=run.precision,
            )
            self.disc_engine, _, _, _ = deepspeed.initialize(
                model=disc, model_parameters=list(disc.parameters()), config=disc_ds
            )

        self.store = CheckpointStore(
            self.output_dir / "checkpoints",
            rank=self.rank,
            world_size=self.world_size,
            keep=run.keep_checkpoints,
        )
        self.step = 0
        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        self.history: list[dict[str, float]] = []
        if run.resume and (latest := self.store.latest()) is not None:
            self._resume(latest)

    # -- state ---------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """The config parts a checkpoint must agree with to be resumed."""
        c = self.config
        return {
            "model": dataclasses.asdict(c.model),
            "trajectory.num_steps": c.trajectory.num_steps,
            "data.source": c.data.source,
            "gan.enabled": c.gan.enabled,
            "ema.enabled": c.ema.enabled,
        }

    def _resume(self, path: Path) -> None:
        state, ema_state = self.store.load(path, engine=self.engine, disc_engine=self.disc_engine)
        mismatched = [
            k
            for k, v in self._fingerprint().items()
            if json.loads(json.dumps(v)) != state["fingerprint"].get(k)
        ]
        if mismatched:
            raise ValueError(
                f"checkpoint {path} was written with a different config: {mismatched} differ "
                "(start a new run.output_dir or set run.resume=false)"
            )
        if self.ema is not None:
            if ema_state is None:
                raise FileNotFoundError(f"checkpoint {path} has no EMA for rank {self.rank}")
            self.ema.load_state_dict(ema_state)
        self.sampler_state.load_state_dict(state["data"])
        self.step = state["step"]
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        return self.store.save(
            self.step,
            engine=self.engine,
            disc_engine=self.disc_engine,
            ema_state=self.ema.state_dict() if self.ema is not None else None,
            trainer_state={
                "step": self.step,
                "data": self.sampler_state.state_dict(),
                "fingerprint": self._fingerprint(),
            },
            # Each checkpoint carries its EMA as a diffusers export, so `e2ed2 sample` and
            # `from_pretrained` work on any checkpoint without DeepSpeed.
            write_extra=lambda staging: self.export(staging / "export"),
        )

    # -- one iteration -------------------------------------------------------------------------
    def _batch_to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Conditioning]:
        latents = batch["latents"].to(self.device, self.compute_dtype, non_blocking=True)
        cond = Conditioning(
            batch["encoder_hidden_states"].to(self.device, self.compute_dtype, non_blocking=True),
            batch["encoder_attention_mask"].to(self.device, non_blocking=True),
        )
        return latents, cond

    def _plan(self) -> TrajectoryPlan:
        # The same on every rank: the plan is part of the global batch's computation.
        g = torch.Generator().manual_seed(derive_seed(self.config.run.seed, "plan", self.step))
        return self.trajectory.plan(g)

    def _start_and_noise(
        self, plan: TrajectoryPlan, latents: torch.Tensor, micro_step: int
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Start sample and per-step noise, each sample seeded by its global batch position."""
        batch = latents.shape[0]
        first = (micro_step * self.world_size + self.rank) * batch
        starts, noises = [], []
        for j in range(batch):
            seed = derive_seed(self.config.run.seed, "noise", self.step, first + j)
            g = torch.Generator(device=self.device).manual_seed(seed)
            start, step_noise = self.trajectory.draw_noise(
                plan, latents[j : j + 1].shape, clean=latents[j : j + 1], generator=g
            )
            starts.append(start)
            noises.append(step_noise)
        per_step = [
            None if noises[0][i] is None else torch.cat([n[i] for n in noises])
            for i in range(self.schedule.num_steps)
        ]
        return torch.cat(starts), per_step

    def _networks(self) -> nn.Module:
        # Shared: call through the engine (ZeRO-3 gathers via its hooks either way); per-step:
        # the ModuleList inside it, indexed by the trajectory.
        return self.engine if self.config.model.share_across_steps else self.engine.module

    def _generator_loss(
        self, latents: torch.Tensor, cond: Conditioning, micro_step: int
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None, torch.Tensor | None]:
        """Total loss of one micro-batch, its logged terms, and (GAN) real/fake pixels."""
        config = self.config
        if config.objective.kind == "diffusion":
            seed = derive_seed(config.run.seed, "diffusion", self.step, micro_step, self.rank)
            g = torch.Generator(device=self.device).manual_seed(seed)
            loss = diffusion_loss(self._networks(), latents, cond, config.sampler, generator=g)
            return loss, {"diffusion": loss.item()}, None, None

        plan = self._plan()
        start, noises = self._start_and_noise(plan, latents, micro_step)
        sample = run_steps(
            self._networks(),
            self.schedule,
            cond,
            start,
            start_index=plan.start_index,
            grad_start_index=plan.grad_start_index,
            noises=noises,
            checkpoint_policy=config.trajectory.checkpoint,
            offload_device=config.trajectory.offload_device,
        )
        fake_pixels = real_pixels = None
        needs_pixels = config.gan.enabled or self.loss_fn.needs_pixels
        if needs_pixels:
            fake_pixels = self.loss_fn.decode_sample(sample)
            real_pixels = self.loss_fn.decode_target(latents)
        terms = self.loss_fn(sample, latents, sample_pixels=fake_pixels, target_pixels=real_pixels)
        total = terms["total"]
        logged = {name: value.item() for name, value in terms.items()}
        if config.gan.enabled:
            adversarial = generator_adversarial_loss(
                self.disc_engine.module, fake_pixels, loss=config.gan.loss
            )
            total = total + config.gan.weight * adversarial
            logged["gan_generator"] = adversarial.item()
            logged["total"] = total.item()
        return total, logged, real_pixels, fake_pixels

    def _discriminator_updates(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """Paper App. C.2: several discriminator updates per generator update."""
        losses = []
        for _ in range(self.config.gan.disc_steps_per_gen_step):
            loss = discriminator_loss(
                self.disc_engine, real, fake.detach(), loss=self.config.gan.loss
            )
            self.disc_engine.backward(loss)
            self.disc_engine.step()
            losses.append(loss.item())
        return {"gan_discriminator": sum(losses) / len(losses)}

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step (``grad_accum_steps`` micro-batches); returns rank-mean scalars."""
        terms: dict[str, float] = {}
        accum = self.config.run.grad_accum_steps
        for micro_step in range(accum):
            latents, cond = self._batch_to_device(next(batches))
            loss, logged, real, fake = self._generator_loss(latents, cond, micro_step)
            self.engine.backward(loss)
            self.engine.step()
            if self.disc_engine is not None:
                logged.update(self._discriminator_updates(real, fake))
            for name, value in logged.items():
                terms[name] = terms.get(name, 0.0) + value / accum
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return terms

    # -- sampling and export -------------------------------------------------------------------
    def write_samples(self) -> Path | None:
        """A PNG grid of EMA samples (all ranks run the forward: ZeRO-3 gathers collectively)."""
        count = self.config.run.num_sample_images
        if count == 0:
            return None
        cond, _ = sample_conditioning(self.loader.dataset, count)
        context = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        self.engine.eval()
        with context:
            pixels = generate_pixels(
                self._networks(),
                self.schedule,
                self.autoencoder.decode,
                cond,
                self.loader.dataset.latent_shape,
                seed=self.config.run.seed,
                device=self.device,
                dtype=self.compute_dtype,
            )
        self.engine.train()
        if not self.is_main:
            return None
        path = self.output_dir / "samples" / f"step{self.step:08d}.png"
        grid = save_grid(pixels, path)
        self.writer.add_image("samples", grid, self.step)
        return path

    def export(self, directory: Path) -> Path | None:
        """The EMA weights (else the trained ones) as a diffusers folder, from rank 0."""
        context = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        module = self.engine.module
        with context:
            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = (
                    {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
                    if self.is_main
                    else None
                )
        if not self.is_main:
            return None
        from .export import write_export

        return write_export(directory, self.config, module, state)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        from tqdm.auto import tqdm

        run = self.config.run
        batches = iter(self.loader)
        images_per_step = run.batch_per_rank * run.grad_accum_steps * self.world_size
        progress = tqdm(
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
                terms = _mean_across_ranks(terms, self.device)
                images_per_s = steps_since_log * images_per_step / (now - last_log)
                last_log, steps_since_log = now, 0
                record = {"step": self.step, **terms, "images_per_s": images_per_s}
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None and math.isfinite(float(grad_norm)):
                    record["grad_norm"] = float(grad_norm)
                record["lr"] = self.engine.get_lr()[0]
                record["peak_memory_bytes"] = _peak_memory_bytes(self.device)
                self.history.append(record)
                if self.is_main:
                    progress.set_postfix(loss=f"{terms.get('total', terms.get('diffusion')):.4f}")
                    for name, value in record.items():
                        if name == "step":
                            continue
                        tag = f"loss/{name}" if name in terms else f"train/{name}"
                        self.writer.add_scalar(tag, value, self.step)
                    self.writer.flush()
                    with open(self.output_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
            if self.step % run.checkpoint_every_steps == 0 or self.step == run.max_steps:
                self.save_checkpoint()
            if self.step % run.sample_every_steps == 0 or self.step == run.max_steps:
                self.write_samples()
        progress.close()
        if run.export_at_end:
            self.export(self.output_dir / "export")
        if self.writer is not None:
            self.writer.close()
        return self.history
