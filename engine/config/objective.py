"""``[objective]``: what the trainer minimises (see objectives/)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .base import check_fields, check_int
from .schedule import ScheduleKind, WeightSchedule

__all__ = [
    "LPIPS_MIN_SIZE_PX",
    "PIXEL_CROP_STEP_PX",
    "TORCHVISION_MODELS",
    "ObjectiveConfig",
    "ObjectiveKind",
]

ObjectiveKind = Literal["e2ed2", "diffusion"]
LpipsNet = Literal["vgg", "alex", "squeeze"]
EnergySpace = Literal["latent", "pixels"]
TeacherSampler = Literal["ddim", "lcm", "flow_euler", "dpm_solver"]
TeacherPath = Literal["start", "student"]
RewardKind = Literal["digit", "clip"]

_WEIGHTS = (
    "l1_weight",
    "l2_weight",
    "lpips_weight",
    "energy_weight",
    "teacher_weight",
    "reward_weight",
)
#: The smallest image side (pixels) each LPIPS backbone accepts: below it a pooling layer sees an
#: empty input. Measured with the lpips 0.1.4 networks.
LPIPS_MIN_SIZE_PX: dict[str, int] = {"vgg": 16, "alex": 31, "squeeze": 17}
#: The torchvision model whose ``features`` each LPIPS backbone slices.
TORCHVISION_MODELS: dict[str, str] = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}
#: objective.pixel_crop is cut in latent cells: a multiple of the SD-family VAEs' 8 px per cell.
PIXEL_CROP_STEP_PX = 8


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the trainer minimises. Weights apply to ``kind='e2ed2'`` (eq. 7); each is >= 0.

    ``lpips_backbone_path``: a local torchvision state dict of the LPIPS backbone (``vgg16``,
    ``alexnet`` or ``squeezenet1_1``, e.g. the file torchvision caches as ``vgg16-397923af.pth``;
    only its ``features.*`` entries are used). The LPIPS linear heads ship inside the ``lpips``
    package. ``lpips_random_backbone``: keep the backbone randomly initialised instead (tests and
    tiny presets only: the distance is then not perceptual).
    ``decode_checkpoint``: activation-checkpoint the sample's VAE decode (keep only the latent,
    re-run the decoder in backward). ``lpips_checkpoint``: likewise for the LPIPS network on the
    decoded pixels (its activations at 512 px and up are several GB per batch).
    """

    kind: ObjectiveKind = "e2ed2"
    """``e2ed2``: a loss on the final sample of the unroll; ``diffusion``: the standard one-
    timestep loss.
    """
    l1_weight: float = 0.0
    """Weight of the L1 distance between final and target latents (eq. 7)."""
    l2_weight: float = 1.0
    """Weight of the squared L2 distance between final and target latents (eq. 7)."""
    lpips_weight: float = 0.0
    """Weight of LPIPS between the decoded final sample and the decoded target (eq. 7)."""
    lpips_net: LpipsNet = "vgg"
    """LPIPS backbone: vgg, alex or squeeze."""
    lpips_backbone_path: str | None = None
    """Local torchvision state dict of the LPIPS backbone (only its features.* are used)."""
    lpips_random_backbone: bool = False
    """Keep the LPIPS backbone randomly initialised (tests and tiny presets only)."""
    decode_checkpoint: bool = True
    """Activation-checkpoint the sample's VAE decode (keep the latent, re-run the decoder in
    backward).
    """
    lpips_checkpoint: bool = True
    """Activation-checkpoint the LPIPS network on the decoded pixels."""
    energy_weight: float = 0.0
    """Weight of the energy score over the m = trajectory.samples_per_prompt samples of each
    prompt (De Bortoli et al. 2025; objectives/energy.py): strictly proper for
    energy_lambda = 1, so its minimiser is the data distribution, not the mean image. Needs
    m >= 2.
    """
    energy_beta: float = 1.0
    """Exponent β in (0, 2) of the energy score's distances."""
    energy_lambda: float = 1.0
    """Weight λ in [0, 1] of the energy score's spread term (1 = strictly proper)."""
    energy_space: EnergySpace = "latent"
    """Where the energy score measures distances: the final latents, or decoded pixels."""
    energy_weight_schedule: ScheduleKind = "constant"
    """The factor on energy_weight by optimizer step: ``constant`` (1), or ``linear_warmup`` (0
    for energy_weight_start_step steps, then a linear ramp to 1 over energy_weight_warmup_steps;
    config/schedule.py)."""
    energy_weight_start_step: int = 0
    """linear_warmup: optimizer steps with the energy score's weight at 0."""
    energy_weight_warmup_steps: int = 0
    """linear_warmup: optimizer steps of the energy weight's linear ramp after its start step."""
    teacher_weight: float = 0.0
    """Weight of the squared L2 distance to a noise-paired teacher target: a frozen copy of the
    pretrained denoiser's sample from the same start noise with teacher_steps steps
    (Luhman & Luhman 2021; objectives/teacher.py). Needs trajectory.start = "noise".
    """
    teacher_steps: int = 32
    """Sampler steps of the teacher (more than trajectory.num_steps: a better sample)."""
    teacher_sampler: TeacherSampler = "ddim"
    """The teacher's sampler: deterministic DDIM over the student's schedule (trailing spacing,
    eta 0), or the student's own sampler (then teacher_steps = K reproduces the student). A flow
    matching student (sampler.kind = "flow_euler", itself deterministic) needs "flow_euler".
    ``dpm_solver``: diffusers' DPM-Solver++(2M) over the same schedule, deterministic (a second-
    order multistep solver: the DDIM teacher's quality in about half the network calls on the
    digits base; objectives/teacher.py); with teacher_path = "start" only.
    """
    teacher_path: TeacherPath = "start"
    """``start``: the teacher samples from the student's start noise alone (its own path).
    ``student`` (the LCM-path teacher, objectives/teacher.py): it walks the student's path with
    the same start and injected noises, each x0 prediction replaced by a deterministic DDIM solve
    of the base from that state (teacher_steps from pure noise, fewer in proportion to the noise
    level left); needs teacher_sampler = "ddim" and an LCM or DDIM student.
    """
    reward_weight: float = 0.0
    """Weight of the differentiable reward term, -mean reward of the decoded final sample
    (DRaFT / AlignProp; objectives/reward.py, objectives/clip_reward.py). reward_kind "digit":
    the log-probability of the prompted digit under the frozen classifier in reward_path (not the
    evaluator's network); "clip": the cosine similarity of CLIP's image and caption embeddings
    (real data). Combine with
    trajectory.truncation = last_k / random_k (DRaFT-K / AlignProp) to backpropagate through the
    last sampler steps only. Regulariser against reward hacking, the distance to the frozen base:
    teacher_weight > 0 with teacher_sampler = "lcm" and teacher_steps = trajectory.num_steps
    (the base model's own K-step sample from the same noise).
    """
    reward_kind: RewardKind = "digit"
    """The reward model: "digit" (the embedded digits: a prompted-digit classifier reading each
    sample's label) or "clip" (any data with captions: cosine similarity of a frozen CLIP model's
    embeddings of the decoded sample and its caption; objectives/clip_reward.py).
    """
    reward_path: str | None = None
    """The local reward model (needed when reward_weight > 0). reward_kind "digit": a
    safetensors file written by `python -m e2ed2.engine.cli.reward_model OUT.safetensors`;
    "clip": a folder with a transformers CLIPModel and its CLIPProcessor saved by save_pretrained
    (config.json, weights, preprocessor and tokenizer files; e.g. openai/clip-vit-large-patch14).
    """
    reward_checkpoint: bool = True
    """Activation-checkpoint the reward model on the decoded pixels: keep only the pixels and
    re-run CLIP's image tower in backward (one more forward). CLIP ViT-L/14 in bf16 otherwise
    keeps 174 MiB per image for backward (measured under fake tensors) while the other terms'
    graphs (GAN, an uncheckpointed LPIPS) are held too.
    """
    decode_checkpoint_blocks: bool = True
    """With decode_checkpoint: checkpoint the decoder one block at a time (diffusers' own
    gradient checkpointing of an AutoencoderKL decoder: its mid block and each up block) instead
    of as a whole. The same single extra decoder forward; the backward then holds one block's
    activations instead of the whole decoder's (benchmarks/bench_pixel_terms.py).
    """
    pixel_rows_per_pass: int = 0
    """Compute the terms on decoded pixels (LPIPS, the reward, pixel-space energy, the GAN's
    generator term and the discriminator's updates) a pass of at most this many rows at a time:
    decode, terms, backward to the final latent, free, next pass. Their activation memory is then
    that of this many images whatever the batch. 0 = the whole micro-batch at once. Rounded up to
    a multiple of trajectory.samples_per_prompt when the energy score is in pixel space (a
    prompt's m samples are compared with each other).
    """
    lpips_resolution: int = 0
    """Resize both images so that their shorter side is this many pixels (antialiased bilinear)
    before LPIPS, when they are larger: LPIPS's networks were trained on 64-256 px patches, and
    the trunk's activations shrink with the square of the side. 0 = native resolution.
    """
    loss_decoder_path: str | None = None
    """A local diffusers AutoencoderTiny folder (e.g. a copy of madebyollin/taesd) that decodes the
    final latents for the loss terms only (LPIPS, reward, pixel energy, GAN): a much smaller
    differentiable decoder. Samples, grids and evaluation still use model.vae_path.
    """
    pixel_crop: int = 0
    """The pixel terms see a random square crop of this many pixels of each prompt's sample and
    target (the same crop for a prompt's m samples and its target), drawn from the run's seeded
    generator. The crop is taken in latent space (a multiple of 8 pixels: one latent cell) and
    only the crop is decoded. 0 = the whole image.
    """

    def __post_init__(self) -> None:
        # The weights first: their message says the whole rule (finite and >= 0).
        for key in _WEIGHTS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"objective.{key} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"objective.{key} must be a finite number >= 0, got {value}")
        check_fields("objective", self)
        if self.kind == "e2ed2" and not any(getattr(self, key) > 0 for key in _WEIGHTS):
            raise ValueError(
                f"objective: kind='e2ed2' needs at least one positive weight among {list(_WEIGHTS)}"
            )
        if not 0 < self.energy_beta < 2:
            raise ValueError(f"objective.energy_beta must be in (0, 2), got {self.energy_beta}")
        if not 0 <= self.energy_lambda <= 1:
            raise ValueError(f"objective.energy_lambda must be in [0, 1], got {self.energy_lambda}")
        if self.teacher_steps < 1:
            raise ValueError(f"objective.teacher_steps must be >= 1, got {self.teacher_steps}")
        _ = self.energy_factors  # validates the schedule keys (the message names them)
        if self.teacher_path == "student" and self.teacher_sampler != "ddim":
            raise ValueError(
                "objective.teacher_path='student' solves each state with deterministic DDIM: set "
                f"objective.teacher_sampler='ddim', got {self.teacher_sampler!r}"
            )
        if self.kind == "diffusion":
            for key in _WEIGHTS:
                if key == "l2_weight":
                    continue
                if getattr(self, key) > 0:
                    raise ValueError(
                        f"objective.{key} applies to kind='e2ed2' only; kind='diffusion' is the "
                        "MSE of the network's prediction (eq. 3), set it to 0"
                    )
        if self.reward_path is not None and not self.reward_path:
            raise ValueError("objective.reward_path is empty; leave it unset instead")
        if self.reward_weight > 0 and self.reward_path is None:
            what = (
                "a local CLIPModel folder saved with save_pretrained, with its CLIPProcessor"
                if self.reward_kind == "clip"
                else "a local reward model file; `python -m e2ed2.engine.cli.reward_model "
                "OUT.safetensors` writes one"
            )
            raise ValueError(
                f"objective.reward_weight > 0 with reward_kind={self.reward_kind!r} needs "
                f"objective.reward_path ({what})"
            )
        for key in ("pixel_rows_per_pass", "lpips_resolution", "pixel_crop"):
            check_int(f"objective.{key}", getattr(self, key), minimum=0)
        if 0 < self.lpips_resolution < LPIPS_MIN_SIZE_PX[self.lpips_net]:
            raise ValueError(
                f"objective.lpips_resolution={self.lpips_resolution} is below the "
                f"{LPIPS_MIN_SIZE_PX[self.lpips_net]} px that objective.lpips_net="
                f"{self.lpips_net!r} accepts (0 = native resolution)"
            )
        if self.pixel_crop % PIXEL_CROP_STEP_PX:
            raise ValueError(
                f"objective.pixel_crop={self.pixel_crop} must be a multiple of "
                f"{PIXEL_CROP_STEP_PX} pixels (the crop is cut in latent cells; 0 = whole image)"
            )
        if self.loss_decoder_path is not None and not self.loss_decoder_path:
            raise ValueError("objective.loss_decoder_path is empty; leave it unset instead")
        if self.lpips_backbone_path is not None and not self.lpips_backbone_path:
            raise ValueError("objective.lpips_backbone_path is empty; leave it unset instead")
        if self.lpips_backbone_path is not None and self.lpips_random_backbone:
            raise ValueError(
                "objective.lpips_backbone_path and objective.lpips_random_backbone=true both set; "
                "choose one"
            )
        if (
            self.lpips_weight > 0
            and self.lpips_backbone_path is None
            and not self.lpips_random_backbone
        ):
            raise ValueError(
                "objective.lpips_weight > 0 needs objective.lpips_backbone_path (a local "
                f"torchvision {TORCHVISION_MODELS[self.lpips_net]} state dict) or "
                "objective.lpips_random_backbone=true"
            )

    @property
    def energy_factors(self) -> WeightSchedule:
        """The schedule of ``energy_weight`` (its factor at each optimizer step)."""
        return WeightSchedule(
            self.energy_weight_schedule,
            self.energy_weight_start_step,
            self.energy_weight_warmup_steps,
            "objective.energy_weight",
        )

    @property
    def needs_pixels(self) -> bool:
        """Whether the objective reads decoded pixels (LPIPS, the reward, or the energy score in
        pixel space). The GAN needs them too."""
        return self.kind == "e2ed2" and (
            self.lpips_weight > 0
            or self.reward_weight > 0
            or (self.energy_weight > 0 and self.energy_space == "pixels")
        )

    @property
    def needs_labels(self) -> bool:
        """Whether the objective reads each sample's prompt label (the digit reward)."""
        return self.kind == "e2ed2" and self.reward_weight > 0 and self.reward_kind == "digit"

    @property
    def needs_captions(self) -> bool:
        """Whether the objective reads each sample's caption string (the CLIP reward)."""
        return self.kind == "e2ed2" and self.reward_weight > 0 and self.reward_kind == "clip"

    @property
    def weights(self) -> dict[str, float]:
        """The positive weights of the terms on the final sample, by term name."""
        named = {
            "l1": self.l1_weight,
            "l2": self.l2_weight,
            "lpips": self.lpips_weight,
            "energy": self.energy_weight,
            "teacher": self.teacher_weight,
            "reward": self.reward_weight,
        }
        return {name: float(w) for name, w in named.items() if w > 0}
