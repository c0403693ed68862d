"""``TrainConfig``: every section of a run, and the checks that span sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import ConfigError
from .data import DataConfig
from .ema import EmaConfig
from .gan import GanConfig
from .model import ModelConfig
from .objective import ObjectiveConfig
from .optim import OptimConfig
from .run import RunConfig
from .sampler import SamplerConfig, check_num_steps
from .trajectory import TrajectoryConfig

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The embedded default trains from scratch in pixel space; v-prediction keeps the x0 estimate
    # bounded at t = 999, where epsilon-prediction divides by sqrt(alphas_cumprod) ~ 0.006.
    # Presets for pretrained PixArt set prediction_type = "epsilon" (its training target).
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(prediction_type="v_prediction")
    )
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        traj, sampler = self.trajectory, self.sampler
        try:
            check_num_steps(sampler, traj.num_steps, "trajectory.num_steps")
            for k in traj.num_steps_choices:
                check_num_steps(sampler, k, "trajectory.num_steps_choices")
            for k in self.run.validation_num_steps:
                check_num_steps(sampler, k, "run.validation_num_steps")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        other_k = set(self.run.validation_num_steps) - {traj.num_steps}
        if other_k and not self.model.share_across_steps:
            raise ConfigError(
                f"run.validation_num_steps={list(self.run.validation_num_steps)} needs "
                f"model.share_across_steps=true for K other than trajectory.num_steps="
                f"{traj.num_steps} (per-step networks exist for one K only)"
            )
        if traj.num_steps_choices and not self.model.share_across_steps:
            raise ConfigError(
                "trajectory.num_steps_choices needs model.share_across_steps=true (per-step "
                "networks exist for one K only)"
            )
        # Pixel space: the latent side is data.resolution (shards: checked against the index at
        # launch; a pretrained transformer brings its own patch size).
        model = self.model
        if (
            self.data.source == "digits"
            and model.pretrained_path is None
            and self.data.resolution % model.patch_size
        ):
            raise ConfigError(
                f"model.patch_size={model.patch_size} does not divide data.resolution="
                f"{self.data.resolution} (the transformer tokenizes the image in square patches)"
            )
        if self.objective.kind == "diffusion":
            if not self.model.share_across_steps:
                raise ConfigError(
                    "model.share_across_steps=false needs objective.kind='e2ed2' (the diffusion "
                    "objective trains one network)"
                )
            if self.gan.enabled:
                raise ConfigError("gan.enabled=true needs objective.kind='e2ed2'")
            if self.sampler.kind == "scm":
                # The TrigFlow noise process has no DDPM beta schedule to noise the data with.
                raise ConfigError(
                    "objective.kind='diffusion' cannot train a sampler.kind='scm' (TrigFlow) "
                    "network: the denoising loss noises with a DDPM beta schedule (kind ddim "
                    "or lcm) or a flow-matching one (flow_euler); use objective.kind='e2ed2'"
                )
        if traj.per_step_backward:
            self._check_per_step_backward()
        if 0 < traj.rows_per_pass < self.run.batch_per_rank * traj.samples_per_prompt:
            self._check_passes()
        objective = self.objective
        if objective.energy_weight > 0 and traj.samples_per_prompt < 2:
            raise ConfigError(
                "objective.energy_weight > 0 needs trajectory.samples_per_prompt >= 2 (the energy "
                f"score compares samples of one prompt), got {traj.samples_per_prompt}"
            )
        if objective.teacher_weight > 0 and traj.start != "noise":
            raise ConfigError(
                "objective.teacher_weight > 0 needs trajectory.start='noise' (the teacher samples "
                f"from the student's start noise), got {traj.start!r}"
            )
        flow_student = sampler.kind == "flow_euler"
        if objective.teacher_weight > 0 and flow_student != (
            objective.teacher_sampler == "flow_euler"
        ):
            raise ConfigError(
                f"objective.teacher_sampler={objective.teacher_sampler!r} cannot sample a "
                f"sampler.kind={sampler.kind!r} model: a flow matching network (velocity) needs "
                "teacher_sampler='flow_euler', an epsilon / v network 'ddim', 'lcm' or "
                "'dpm_solver'"
            )
        if sampler.use_dynamic_shifting:
            raise ConfigError(
                "sampler.use_dynamic_shifting=true: training, sampling and evaluation use a fixed "
                "shift (SD3 / SD3.5 ship use_dynamic_shifting=false); set sampler.shift instead "
                "(build_schedule(..., image_seq_len=...) computes the dynamic schedule for a "
                "library caller)"
            )
        if objective.needs_labels and self.data.source != "digits":
            raise ConfigError(
                "objective.reward_weight > 0 with reward_kind='digit' needs data.source='digits' "
                "(the reward is a prompted-digit classifier scoring each sample's label), got "
                f"{self.data.source!r}; real data with captions: objective.reward_kind='clip'"
            )
        if self.data.source == "digits" and self.model.vae_path is not None:
            raise ConfigError(
                "model.vae_path is set but data.source='digits' is pixel space; unset it "
                "(model.vae_path=none)"
            )
        if self.gan.enabled and self.gan.discriminator == "denoiser_features":
            # The heads read the base denoiser's features of the samples themselves, and draw
            # their re-noising for the whole batch at once (objectives/feature_discriminator.py).
            if self.model.vae_path is not None:
                raise ConfigError(
                    "gan.discriminator='denoiser_features' reads the denoiser's own input (a "
                    "pixel-space model); with model.vae_path set use gan.discriminator='conv4'"
                )
            if self.objective.pixel_rows_per_pass:
                raise ConfigError(
                    "gan.discriminator='denoiser_features' scores the whole batch at once; set "
                    f"objective.pixel_rows_per_pass=0, got {self.objective.pixel_rows_per_pass}"
                )
            if self.sampler.kind == "flow_euler":
                raise ConfigError(
                    "gan.discriminator='denoiser_features' re-noises with the DDPM forward "
                    "process; sampler.kind='flow_euler' needs gan.discriminator='conv4'"
                )
            if self.gan.feature_t_max >= self.sampler.num_train_timesteps:
                raise ConfigError(
                    f"gan.feature_t_max={self.gan.feature_t_max} must be below "
                    f"sampler.num_train_timesteps={self.sampler.num_train_timesteps}"
                )
        needs_pixels = self.objective.needs_pixels or self.gan.enabled
        if self.data.source == "shards" and needs_pixels and self.model.vae_path is None:
            raise ConfigError(
                "LPIPS / GAN on latent shards need a decoder: set model.vae_path to a local "
                "AutoencoderKL folder"
            )

    def check_prompt_only(self) -> None:
        """``data.source = "prompts"`` has no image: every term that compares with one is
        refused, by name. Called at launch (train/launch.py check_launch), not on construction:
        the memory estimate builds what-if configs of a run with one term alone (the latent L2
        as its unroll baseline), which are never trained."""
        if self.data.source != "prompts":
            return
        objective = self.objective
        if objective.kind != "e2ed2":
            raise ConfigError(
                "data.source='prompts' has no images: objective.kind='diffusion' trains on "
                "noised data; use objective.kind='e2ed2' with teacher_weight / reward_weight"
            )
        data_terms = [
            f"objective.{key}={getattr(objective, key)}"
            for key in ("l1_weight", "l2_weight", "lpips_weight", "energy_weight")
            if getattr(objective, key) > 0
        ]
        if self.gan.enabled:
            data_terms.append("gan.enabled=true")
        if data_terms:
            raise ConfigError(
                f"data.source='prompts' has no images, but {', '.join(data_terms)} compare(s) "
                "the samples with data: set them to 0 / false and train on objective."
                "teacher_weight and / or objective.reward_weight (reward_kind='clip'), or use "
                "image shards (data.source='shards')"
            )
        if self.trajectory.start != "noise":
            raise ConfigError(
                f"data.source='prompts' has no images to noise: trajectory.start="
                f"{self.trajectory.start!r} needs data; set trajectory.start='noise'"
            )
        if self.model.pretrained_path is None:
            raise ConfigError(
                "data.source='prompts' needs model.pretrained_path (the text states are a "
                "pretrained pipeline's; teacher and reward terms start from its weights)"
            )

    def _check_per_step_backward(self) -> None:
        self._check_cut_backward(
            "trajectory.per_step_backward=true",
            "DeepSpeed would apply its loss scale again at every step's backward",
        )
        if not self.model.share_across_steps:
            # Refused rather than run untested: each piece would touch one step's network only,
            # an accumulation pattern the ZeRO micro-step tests here do not cover.
            raise ConfigError(
                "trajectory.per_step_backward=true needs model.share_across_steps=true: per-step "
                "networks hold no gradient sum across the steps (nothing to split)"
            )

    def _check_passes(self) -> None:
        rows = self.run.batch_per_rank * self.trajectory.samples_per_prompt
        self._check_cut_backward(
            f"trajectory.rows_per_pass={self.trajectory.rows_per_pass} (of run.batch_per_rank x "
            f"trajectory.samples_per_prompt = {rows} rows)",
            "the loss's gradient at the final samples would be taken without DeepSpeed's loss "
            "scale",
        )

    def _check_cut_backward(self, what: str, fp16_problem: str) -> None:
        """What a backward in pieces (core/step_cuts.py) needs, whichever option cuts it."""
        if self.objective.kind != "e2ed2":
            raise ConfigError(f"{what} needs objective.kind='e2ed2' (no unroll to cut)")
        if self.run.precision == "fp16":
            raise ConfigError(
                f"{what} cannot run with run.precision='fp16' ({fp16_problem}); use bf16 or fp32"
            )
