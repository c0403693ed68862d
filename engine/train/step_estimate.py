"""The whole optimizer step's memory per rank, estimated from ``config.json`` files alone.

``e2ed2 estimate`` and ``e2ed2 train --dry-run`` print it before any weight is read. Every model
of the resolved config (the denoiser, LoRA adapters, the VAE, the teacher's copy, the LPIPS net,
the CLIP / digit reward, the GAN discriminator) is built from its config under
``FakeTensorMode`` in the dtype the trainer gives it, and the trainer's own ``train_step`` is
*run* on them (train/fake_step.py): the trajectory under its checkpoint policy and cuts, the
teacher's sampling, the decode, the objective's own
:class:`~e2ed2.engine.objectives.losses.E2ED2Loss` with its passes, the GAN terms, the backward
in the trainer's pieces, every discriminator update. A
:class:`~e2ed2.engine.core.memory.LiveTensorTracker` counts the live bytes of each phase, so
whatever the objective code does (its checkpoints, passes, resizes, crops) is what is measured;
nothing here models a loss term by hand.

Per rank, the step's device peak is

    resident bytes (ZeRO-partitioned state, EMA shadow, frozen models' weights, discriminator
                    weights and AdamW state: alive in every phase)
  + max over the phases that do not overlap:
      generator: gathered weights (ZeRO-3) + buckets + the measured peak of unroll, objective
                 and backward (every term together, as the trainer runs them)
      discriminator: the measured peak of one discriminator update on the detached real and
                 generated pixels (each of the ``gan.disc_steps_per_gen_step`` updates has the
                 same peak)

and each term is also printed on its own line: the resident ones by their bytes, the activation
ones as measured *alone* (the unroll with a latent L2 loss, the decode, each pixel term with its
decode, the teacher's sampling), so the largest can be named. Those lines do not add up to the
peak: the phases' measured peaks are the estimate. Host bytes: ZeRO-Offload's partitions and the
offloading checkpoint policies' saved activations (measured).

Not counted: the CUDA context and allocator fragmentation (a few hundred MiB to a few GiB; hence
the 92% limit of :func:`check_fits`), the optimizer update's temporaries (one parameter group
at a time), the data loader's pinned batches, the sample grids' inference (no graph, K network
calls on ``run.num_sample_images`` rows, smaller than the training step).

The loss models' weights are never read: LPIPS is built with a random backbone, CLIP from its
``config.json`` (weights do not change bytes), the digit reward at its default width.

Size: over 400 lines because the table, the refusal and the terms' labels and keys live with the
accounting they describe (one term per line, the keys that cut it beside it); the fake models and
the step's run are in train/fake_step.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrainConfig
from ..core.estimate import UpperBoundShapes, drop_full_grads
from ..core.layout import NetworkLayout
from ..core.memory import LiveTensorTracker
from .distributed import build_ds_config
from .fake_step import (
    FakeStep,
    build_fake_loss,
    build_fake_step,
    measure,
    one_term,
    param_bytes,
    param_count,
    rows_of,
    run_trainer_step,
)

__all__ = [
    "DEVICE_MEMORY_FRACTION",
    "StepEstimate",
    "TermBytes",
    "check_fits",
    "estimate_step",
    "format_estimate",
]

#: A config whose estimated device peak exceeds this share of the device memory is refused: the
#: CUDA context, the allocator's block rounding and fragmentation live in the rest.
DEVICE_MEMORY_FRACTION = 0.92
GIB = 2**30


@dataclass(frozen=True)
class TermBytes:
    """One labelled line of the estimate: bytes per rank and the phase it belongs to."""

    name: str
    device_bytes: int
    host_bytes: int = 0
    phase: str = "resident"  # "resident" (every phase), "generator" or "discriminator"
    alone: bool = False  # measured on its own: a line to read, not a part of its phase's sum
    keys: tuple[str, ...] = ()  # config keys that cut it
    measured: bool = False  # a phase's tracked peak (not a modelled term)


@dataclass
class StepEstimate:
    """The whole step per rank: its terms and the peak over its phases."""

    world_size: int
    summary: str  # what was estimated (model, size, batch, K, policy, ZeRO stage)
    terms: list[TermBytes] = field(default_factory=list)

    @property
    def phases(self) -> list[str]:
        return [p for p in ("generator", "discriminator") if any(t.phase == p for t in self.terms)]

    def phase_device_bytes(self, phase: str) -> int:
        """Device bytes of ``phase`` ("resident" alone, or a phase with the resident bytes)."""
        own = sum(t.device_bytes for t in self.terms if t.phase == phase and not t.alone)
        return own if phase == "resident" else self.phase_device_bytes("resident") + own

    def phase_host_bytes(self, phase: str) -> int:
        own = sum(t.host_bytes for t in self.terms if t.phase == phase and not t.alone)
        return own if phase == "resident" else self.phase_host_bytes("resident") + own

    @property
    def peak_device_bytes(self) -> int:
        """Max over the phases (they do not overlap), not their sum."""
        return max(self.phase_device_bytes(p) for p in (*self.phases, "resident"))

    @property
    def peak_host_bytes(self) -> int:
        return max(self.phase_host_bytes(p) for p in (*self.phases, "resident"))

    @property
    def measured_peak_bytes(self) -> int:
        """The largest tracked phase peak alone: what a real step allocates beyond what exists
        before it (weights, optimizer state, EMA, ZeRO's preallocated buckets), the figure a
        tracker around a real step checks."""
        return max((t.device_bytes for t in self.terms if t.measured), default=0)

    def largest_terms(self, count: int = 3) -> list[TermBytes]:
        """The terms with the most device bytes (measured-alone lines and resident ones)."""
        named = [t for t in self.terms if t.device_bytes > 0 and t.name != _ALL_TERMS]
        return sorted(named, key=lambda t: t.device_bytes, reverse=True)[:count]

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "summary": self.summary,
            "terms": [dataclasses.asdict(t) for t in self.terms],
            "phase_device_bytes": {p: self.phase_device_bytes(p) for p in self.phases},
            "phase_host_bytes": {p: self.phase_host_bytes(p) for p in self.phases},
            "peak_device_bytes": self.peak_device_bytes,
            "peak_host_bytes": self.peak_host_bytes,
        }


_ALL_TERMS = "unroll + objective + backward, every term together (measured)"
_D_STEP = "discriminator update on real + generated pixels (measured)"


def _gib(nbytes: int) -> str:
    if nbytes < GIB:
        return f"{nbytes / 2**20:8.1f} MiB"
    return f"{nbytes / GIB:8.2f} GiB"


def format_estimate(estimate: StepEstimate) -> str:
    """The per-term table (one labelled line per term), the phases and the peak."""
    labels = [f"{t.name}{' (alone)' if t.alone else ''}" for t in estimate.terms]
    width = max([56, *(len(label) for label in labels)])
    lines = [f"whole-step memory per rank: {estimate.summary}"]
    lines.append(f"  {'term':<{width + 2}} {'device':>12} {'host':>12}")
    for phase, title in (
        ("resident", "resident in every phase"),
        ("generator", "generator phase"),
        ("discriminator", "discriminator phase"),
    ):
        rows = [
            (label, t) for label, t in zip(labels, estimate.terms, strict=True) if t.phase == phase
        ]
        if not rows:
            continue
        lines.append(f"  {title}:")
        for label, t in rows:
            lines.append(
                f"    {label:<{width}} {_gib(t.device_bytes):>12} {_gib(t.host_bytes):>12}"
            )
        label = f"= {phase}" + ("" if phase == "resident" else " phase, resident included")
        lines.append(
            f"    {label:<{width}} {_gib(estimate.phase_device_bytes(phase)):>12} "
            f"{_gib(estimate.phase_host_bytes(phase)):>12}"
        )
    lines.append(
        f"  {'peak (max over the phases, not their sum)':<{width + 2}} "
        f"{_gib(estimate.peak_device_bytes):>12} {_gib(estimate.peak_host_bytes):>12}"
    )
    return "\n".join(lines)


def check_fits(estimate: StepEstimate, device_memory_gib: float) -> str | None:
    """None if the peak fits ``DEVICE_MEMORY_FRACTION`` of the device; else the reason (one line,
    naming the largest terms and the keys that cut them)."""
    limit = DEVICE_MEMORY_FRACTION * device_memory_gib * GIB
    peak = estimate.peak_device_bytes
    if peak <= limit:
        return None
    parts = []
    for term in estimate.largest_terms():
        cut = f" (cut by {', '.join(term.keys)})" if term.keys else ""
        parts.append(f"{term.name} {_gib(term.device_bytes).strip()}{cut}")
    return (
        f"the whole step needs an estimated {peak / GIB:.2f} GiB per rank, over "
        f"{DEVICE_MEMORY_FRACTION:.0%} of run.device_memory_gib={device_memory_gib:g} "
        f"({limit / GIB:.2f} GiB); largest terms: {'; '.join(parts)}"
    )


def _zero_terms(
    step: FakeStep, ds_config: dict[str, Any], world_size: int, loss_fn: Any
) -> list[TermBytes]:
    """Resident and fixed per-phase bytes: ZeRO's partitions, gathered weights, buckets, EMA,
    frozen models, the discriminator's state (from the built models' parameter counts)."""
    config = step.config
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    fp32 = config.run.precision == "fp32"
    element = 4 if fp32 else 2
    trainable = param_count(step.network, trainable=True)
    total = param_count(step.network)

    def part(n: int) -> int:
        return -(-n // world_size)  # ZeRO pads partitions to equal size

    params = element * (part(total) if stage == 3 else total)
    grads = element * part(trainable) if stage >= 2 else 0  # stage 0/1: measured in the phase
    optimizer = (8 if fp32 else 12) * (part(trainable) if stage >= 1 else trainable)
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    offload_par = zero.get("offload_param", {}).get("device", "none") == "cpu"
    lora = " LoRA adapters," if NetworkLayout(config.model).lora else ""
    terms = [
        TermBytes(
            f"ZeRO-{stage} state: weights, gradients, AdamW (1/{world_size} where partitioned)",
            params * (not offload_par) + grads + optimizer * (not offload_opt),
            params * offload_par + optimizer * offload_opt,
            keys=(
                "run.deepspeed_config (zero3 / zero3_offload)",
                "--world-size",
                "model.lora_rank",
            ),
        )
    ]
    if config.ema.enabled:
        ema_count = trainable if NetworkLayout(config.model).lora else total
        ema = 4 * (part(ema_count) if stage == 3 else ema_count)
        terms.append(
            TermBytes(f"EMA shadow (fp32,{lora} this rank's share)", ema, keys=("ema.enabled",))
        )
    frozen = [
        ("frozen VAE weights", param_bytes(step.autoencoder)),
        (
            "frozen teacher weights (a full copy of the denoiser)",
            param_bytes(step.teacher.network) if step.teacher is not None else 0,
        ),
        ("frozen LPIPS network weights", param_bytes(loss_fn.lpips_network) if loss_fn else 0),
        (
            "frozen reward model weights (CLIP / digit)",
            param_bytes(loss_fn.reward_model) if loss_fn else 0,
        ),
    ]
    terms += [TermBytes(name, n) for name, n in frozen if n]
    if step.discriminator is not None:
        d = param_count(step.discriminator)
        terms.append(
            TermBytes(
                "GAN discriminator weights + AdamW state",
                param_bytes(step.discriminator) + (8 if fp32 else 12) * d,
                keys=("gan.enabled", "gan.base_channels"),
            )
        )
    if stage == 3:
        max_live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
        gathered = element * (total if config.run.zero3_gather_once else min(total, max_live))
        terms.append(
            TermBytes(
                "ZeRO-3 gathered weights (during the unroll and its backward)",
                gathered * (not offload_par),
                phase="generator",
            )
        )
    if stage >= 2:
        second = "stage3_prefetch_bucket_size" if stage == 3 else "allgather_bucket_size"
        buckets = element * (
            int(zero.get("reduce_bucket_size", 500_000_000)) + int(zero.get(second, 50_000_000))
        )
        terms.append(
            TermBytes(
                "ZeRO communication buckets (reduce + prefetch / all-gather)",
                min(buckets, 2 * total * element),
                phase="generator",
            )
        )
    return terms


def _has(config: TrainConfig, dotted: str) -> bool:
    section, key = dotted.split(".")
    return any(f.name == key for f in dataclasses.fields(getattr(config, section)))


def _keys(config: TrainConfig, *dotted: str) -> tuple[str, ...]:
    """The config keys among ``dotted`` this version has (keys other work adds appear when they
    exist)."""
    return tuple(key for key in dotted if _has(config, key))


def estimate_step(
    config: TrainConfig,
    *,
    world_size: int = 1,
    resolution_px: int | None = None,
    alone_lines: bool = True,
) -> StepEstimate:
    """The whole optimizer step per rank for ``config`` at ``world_size`` (see the module doc).

    ``resolution_px``: the image side to estimate (default: the data's largest bucket, else the
    denoiser's ``sample_size``). ``alone_lines``: also measure each activation term alone (one
    more fake run per term) for the per-term lines.
    """
    ds_config = build_ds_config(
        config.run.deepspeed_config,
        batch_per_rank=config.run.batch_per_rank,
        grad_accum_steps=config.run.grad_accum_steps,
        world_size=world_size,
        optim=config.optim,
        precision=config.run.precision,
        total_steps=config.run.max_steps,
    )
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    step = build_fake_step(config, resolution_px)
    objective = config.objective
    e2ed2 = objective.kind == "e2ed2"
    loss_fn = build_fake_loss(step, objective) if e2ed2 else None
    terms = _zero_terms(step, ds_config, world_size, loss_fn)
    keep_grads = stage < 2  # ZeRO-0/1 keep full gradients until the step; 2/3 reduce them away
    batch_keys = ("run.batch_per_rank", "run.grad_accum_steps")

    grads = contextlib.nullcontext() if keep_grads else drop_full_grads(step.network)
    with step.mode, LiveTensorTracker(track_cuda=False) as tracker, UpperBoundShapes(), grads:
        # The trainer's own train_step on the fake models (train/fake_step.py): every cut,
        # pass and term as training runs them; all of the discriminator's updates.
        run_trainer_step(step, config, loss_fn, tracker)
    phases = {p.name: p for p in tracker.phases}
    gen = phases["generator"]
    traj = config.trajectory
    unroll_keys = _keys(
        config,
        "trajectory.checkpoint",
        "trajectory.per_step_backward",
        "trajectory.rows_per_pass",
        "objective.decode_checkpoint",
        "objective.lpips_checkpoint",
        "objective.pixel_rows_per_pass",
        "objective.lpips_resolution",
        "objective.pixel_crop",
        *batch_keys,
    )
    terms.append(
        TermBytes(
            _ALL_TERMS,
            gen.peak_bytes,
            gen.host_peak_bytes,
            "generator",
            keys=unroll_keys,
            measured=True,
        )
    )
    if "discriminator" in phases:
        d = phases["discriminator"]
        terms.append(
            TermBytes(
                f"{_D_STEP}, x{config.gan.disc_steps_per_gen_step} per step",
                d.peak_bytes,
                d.host_peak_bytes,
                "discriminator",
                keys=("gan.enabled", "gan.base_channels", *batch_keys),
                measured=True,
            )
        )
    if alone_lines and e2ed2:
        terms += _alone_terms(step, config, keep_grads)
    hw = tuple(step.latents.shape[-2:])
    px = hw if config.model.vae_path is None else (8 * hw[0], 8 * hw[1])
    summary = (
        f"world size {world_size}, {config.run.precision}, ZeRO-{stage}, {px[0]}x{px[1]} px, "
        f"batch {config.run.batch_per_rank} x m {traj.samples_per_prompt}, "
        f"K={step.trajectory.config.num_steps} ({step.plan.num_grad_steps} with gradients), "
        f"checkpoint {traj.checkpoint!r}"
        + (", per-step backward" if traj.per_step_backward else "")
        + (f", rows per pass {traj.rows_per_pass}" if traj.rows_per_pass else "")
        + (f", LoRA rank {config.model.lora_rank}" if NetworkLayout(config.model).lora else "")
    )
    return StepEstimate(world_size=world_size, summary=summary, terms=terms)


def _alone_terms(step: FakeStep, config: TrainConfig, keep: bool) -> list[TermBytes]:
    """The lines that name the largest term: the trainer's step with the latent L2 loss alone
    (the unroll), then with each pixel term alone, printed as what it adds to the unroll's
    peak (its decode, passes, crops and checkpoints as the objective runs them)."""
    objective = config.objective
    batch_keys = ("run.batch_per_rank",)
    no_gan = dataclasses.replace(config.gan, enabled=False)

    def peak_with(objective_alone: Any, gan: Any) -> tuple[int, int]:
        alone = dataclasses.replace(config, objective=objective_alone, gan=gan)
        loss = build_fake_loss(step, objective_alone)
        grads = contextlib.nullcontext() if keep else drop_full_grads(step.network)
        with step.mode, LiveTensorTracker(track_cuda=False) as tracker, UpperBoundShapes(), grads:
            run_trainer_step(step, alone, loss, tracker)
        generator = next(p for p in tracker.phases if p.name == "generator")
        return generator.peak_bytes, generator.host_peak_bytes

    latent_only = one_term(objective, "l2")
    unroll, unroll_host = peak_with(latent_only, no_gan)
    out = [
        TermBytes(
            f"unroll: K steps under {config.trajectory.checkpoint!r} + backward (latent L2)",
            unroll,
            unroll_host,
            "generator",
            alone=True,
            keys=_keys(
                config,
                "trajectory.checkpoint",
                "trajectory.per_step_backward",
                "trajectory.rows_per_pass",
                *batch_keys,
            ),
        )
    ]
    pixel_keys = _keys(
        config,
        "objective.pixel_rows_per_pass",
        "objective.decode_checkpoint",
        "objective.decode_checkpoint_blocks",
        "objective.pixel_crop",
        "objective.loss_decoder_path",
        *batch_keys,
    )
    decode = "" if config.model.vae_path is None else " + its decode"
    named = {
        "lpips": (
            f"LPIPS{decode}, added to the unroll's peak",
            _keys(config, "objective.lpips_checkpoint", "objective.lpips_resolution"),
        ),
        "reward": (
            f"{objective.reward_kind} reward{decode}, added to the unroll's peak",
            _keys(config, "objective.reward_checkpoint"),
        ),
        "energy": (
            f"energy score over m={config.trajectory.samples_per_prompt} samples "
            f"({objective.energy_space}), added to the unroll's peak",
            _keys(config, "objective.energy_space", "trajectory.samples_per_prompt"),
        ),
    }
    for term, (label, keys) in named.items():
        if term in objective.weights:
            device, host = peak_with(one_term(objective, term), no_gan)
            out.append(
                TermBytes(
                    label,
                    max(0, device - unroll),
                    max(0, host - unroll_host),
                    "generator",
                    alone=True,
                    keys=keys + pixel_keys,
                )
            )
    if config.gan.enabled:
        device, host = peak_with(latent_only, config.gan)
        out.append(
            TermBytes(
                f"GAN generator term{decode}, added to the unroll's peak",
                max(0, device - unroll),
                max(0, host - unroll_host),
                "generator",
                alone=True,
                keys=("gan.enabled",) + pixel_keys,
            )
        )
    if step.teacher is not None:
        latents, cond, _ = rows_of(step)

        def teacher_sampling() -> None:
            generators = [torch.Generator().manual_seed(j) for j in range(latents.shape[0])]
            start, noises = step.trajectory.draw_noise_per_sample(step.plan, latents, generators)
            step.teacher.sample(cond, start, step.trajectory.schedule, noises, generators)

        device, host = measure(step, teacher_sampling)
        out.append(
            TermBytes(
                f"teacher sampling: {objective.teacher_steps} steps, no graph",
                device,
                host,
                "generator",
                alone=True,
                keys=("objective.teacher_steps",) + batch_keys,
            )
        )
    return out
