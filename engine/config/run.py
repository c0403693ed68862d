"""``[run]``: length, batch, precision, outputs and cadence of one training run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import check_fields

__all__ = ["TRACKERS", "VALIDATION_PROMPT_FILES", "Precision", "RunConfig"]

Precision = Literal["fp32", "bf16", "fp16"]
#: What ``run.report_to`` may name (train/trackers.py).
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb")
#: ``run.validation_prompts`` as a file: one prompt a line, or one JSON object a line.
VALIDATION_PROMPT_FILES: tuple[str, ...] = (".txt", ".jsonl")


@dataclass(frozen=True)
class RunConfig:
    """What one training run does: length, batch, precision, outputs and their cadence."""

    output_dir: str = "runs/e2ed2"
    """Where the run writes config, metrics, TensorBoard, samples, checkpoints and the export."""
    max_steps: int = 400
    """optimizer steps"""
    batch_per_rank: int = 8
    """micro-batch per rank (the paper: 8 per GPU)"""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed of the run's draws (weights init, plans, noise; derived per purpose)."""
    precision: Precision = "fp32"
    """Compute precision of the denoiser: fp32, bf16 or fp16 (DeepSpeed's mixed precision)."""
    deepspeed_config: str = "zero2"
    """A shipped DeepSpeed config by name (ds_configs/<name>.json) or a path to a JSON file."""
    zero3_gather_once: bool = False
    """ZeRO-3 only: gather each partitioned parameter once per micro-batch and keep it across the
    K sampler steps (forwards, recomputes, backwards), instead of up to 3K all-gathers per
    iteration. Costs the full low-precision weights on every rank during the iteration
    (PixArt-α-XL/2: 1.2 GB in bf16); gradients are unchanged (benchmarks/README.md, section 4).
    """
    log_every_steps: int = 10
    """Optimizer steps between metrics.jsonl / TensorBoard records."""
    checkpoint_every_steps: int = 200
    """Optimizer steps between checkpoints (and one at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    sample_every_steps: int = 200
    """Optimizer steps between sample grids (and one at the end)."""
    num_sample_images: int = 20
    """Images in each sample grid (0 = no grids)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in output_dir, if there is one (an incomplete or
    corrupt newer one is moved aside to checkpoints/corrupt-stepN with a warning). False: start
    fresh, which an output_dir that already holds a run refuses unless overwrite is set.
    """
    resume_from: int | str | None = None
    """Resume from this checkpoint instead of the newest: a step (200 = checkpoints/step00000200 in
    output_dir) or a checkpoint folder's path. Newer checkpoints of output_dir are moved aside to
    checkpoints/superseded-<time>/, never deleted. None = the newest complete one.
    """
    overwrite: bool = False
    """Start fresh in an output_dir that holds another run: the old run is first moved aside to
    <output_dir>.replaced-<time> (never deleted, never mixed with the new one).
    """
    signal_checkpoint_min_steps: int = 1
    """On SIGTERM / SIGINT the run finishes its current step, writes a checkpoint if the newest one
    is at least this many steps old (0 = never), and exits 143 / 130. A second signal abandons the
    step (and any save in progress) at once.
    """
    export_at_end: bool = True
    """Write the EMA (or, with ema disabled, the trained) weights as a diffusers folder at the end."""
    cpu_threads: int = 0
    """CPU runs only: torch's intra-op threads per process (0 = torch's default, one per core).
    Tiny models are faster on 1: OpenMP's thread handoff costs more than a 64-wide matmul, and
    on a busy machine a spinning second thread can slow every op tenfold."""
    device_memory_gib: float | None = None
    """Memory of one accelerator in GiB (e.g. 80 for an 80 GB H100): ``e2ed2 train --dry-run``
    and ``e2ed2 estimate`` refuse the config (exit 2) when the estimated whole-step peak per rank
    exceeds 92% of it (train/step_estimate.py). None = no check."""
    compare_with_base: bool = False
    """After training (digits data with model.pretrained_path): sample the export and the base
    at K = 1, 2, 4 on the same seeds and prompts, write compare_base_vs_finetuned.png / .json
    into output_dir and print the FD of both (eval/report.py)."""
    max_consecutive_nonfinite_steps: int = 25
    """Optimizer steps in a row whose loss or gradient is NaN/Inf (each one skipped) after which
    the run writes a checkpoint and stops. fp16's dynamic loss scale also skips steps while it
    calibrates (one per halving of its initial scale, 2**16 by default), which count too.
    """
    report_to: tuple[str, ...] = ("tensorboard",)
    """Trackers rank 0 logs scalars and sample / validation images to, besides metrics.jsonl:
    "tensorboard" (output_dir/tensorboard) and / or "wandb" (the optional wandb package, ``pip
    install e2ed2[wandb]``; the resolved config as the wandb run's config; WANDB_MODE=offline
    and the other WANDB_* variables apply). [] = metrics.jsonl only."""
    wandb_project: str = "e2ed2"
    """report_to with "wandb": the wandb project; the run is named after output_dir's folder."""
    validation_prompts: tuple[str, ...] | str = ()
    """Prompts sampled every sample_every_steps into captioned PNG grids
    (samples/validation-K<k>-step<N>.png) and logged to every tracker: a list in the TOML, or a
    path to a .txt (one prompt a line) or .jsonl ({"prompt": ...} or {"text": ...} a line)
    file. Encoded once at start-up by the run's text encoder (the digits' tiny T5; for shards,
    the text encoder recorded in their index.json). Each prompt keeps its seed across the run,
    so the grids of two steps differ only by the training in between. () = none."""
    validation_num_steps: tuple[int, ...] = ()
    """The K values the validation prompts are sampled at, one grid each (e.g. [1, 2, 4]);
    () = the run's trajectory.num_steps."""

    def __post_init__(self) -> None:
        check_fields("run", self)
        positive = (
            "max_steps",
            "batch_per_rank",
            "grad_accum_steps",
            "log_every_steps",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "sample_every_steps",
            "max_consecutive_nonfinite_steps",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.cpu_threads < 0:
            raise ValueError(f"run.cpu_threads must be >= 0, got {self.cpu_threads}")
        gib = self.device_memory_gib
        if gib is not None and (
            isinstance(gib, bool) or not isinstance(gib, int | float) or gib <= 0
        ):
            raise ValueError(f"run.device_memory_gib must be a number > 0, got {gib!r}")
        if self.num_sample_images < 0:
            raise ValueError(f"run.num_sample_images must be >= 0, got {self.num_sample_images}")
        if not self.output_dir:
            raise ValueError("run.output_dir must not be empty")
        if self.signal_checkpoint_min_steps < 0:
            raise ValueError(
                f"run.signal_checkpoint_min_steps must be >= 0, got {self.signal_checkpoint_min_steps}"
            )
        if self.resume_from is not None:
            if isinstance(self.resume_from, bool) or self.resume_from in ("", 0):
                raise ValueError(
                    f"run.resume_from must be a step >= 1 or a checkpoint folder, got "
                    f"{self.resume_from!r}"
                )
            if isinstance(self.resume_from, int) and self.resume_from < 1:
                raise ValueError(f"run.resume_from must be a step >= 1, got {self.resume_from}")
            if not self.resume:
                raise ValueError(
                    "run.resume_from is set but run.resume=false; unset one of them "
                    "(run.resume_from=none)"
                )
        self._check_trackers_and_validation()

    def _check_trackers_and_validation(self) -> None:
        for name in self.report_to:
            if name not in TRACKERS:
                raise ValueError(f"run.report_to: {name!r} is not one of {list(TRACKERS)}")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"run.report_to names a tracker twice: {list(self.report_to)}")
        if not self.wandb_project:
            raise ValueError("run.wandb_project must not be empty")
        prompts = self.validation_prompts
        if isinstance(prompts, str):
            if not prompts.endswith(VALIDATION_PROMPT_FILES):
                raise ValueError(
                    f"run.validation_prompts={prompts!r}: a prompt file must end in "
                    f"{' or '.join(VALIDATION_PROMPT_FILES)} (or give a list of prompts)"
                )
        elif not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(
                f"run.validation_prompts must be non-empty strings, got {list(prompts)!r}"
            )
        for k in self.validation_num_steps:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"run.validation_num_steps must be integers >= 1, got {k!r}")
