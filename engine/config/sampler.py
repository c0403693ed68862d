"""``[sampler]``: the noise schedule and few-step sampler (diffusers' LCM / DDIM fields,
``FlowMatchEulerDiscreteScheduler``'s for flow matching: SD3 / SD3.5 / Sana, and
``SCMScheduler``'s for TrigFlow consistency sampling: SANA-Sprint).

Size: one typed config per component; the fields of four sampler kinds, the checks that keep
each kind's fields apart and the diffusers round trip belong to that one dataclass."""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from .base import check_fields

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

__all__ = [
    "BETA_SCHEDULE_FIELDS",
    "FLOW_FIELDS",
    "SCHEDULER_CLASS_NAMES",
    "SCM_FIELDS",
    "PredictionType",
    "SamplerConfig",
    "SamplerKind",
    "check_num_steps",
]

SamplerKind = Literal["lcm", "ddim", "flow_euler", "scm"]
#: ``flow_prediction`` (diffusers' name): the network predicts the flow velocity ``noise - x0``;
#: the only choice of ``flow_euler``, and not one of LCM / DDIM. ``trigflow`` (SCMScheduler's):
#: the TrigFlow velocity of SANA-Sprint, the only choice of ``scm``.
PredictionType = Literal["epsilon", "v_prediction", "sample", "flow_prediction", "trigflow"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

#: The diffusers scheduler class each sampler kind is checked against (and exported as).
SCHEDULER_CLASS_NAMES: dict[str, str] = {
    "lcm": "LCMScheduler",
    "ddim": "DDIMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "scm": "SCMScheduler",
}
#: Fields of the discrete beta schedule (LCM / DDIM): they do not apply to ``flow_euler``.
BETA_SCHEDULE_FIELDS = (
    "beta_schedule",
    "beta_start",
    "beta_end",
    "rescale_betas_zero_snr",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "clip_sample",
    "clip_sample_range",
    "original_inference_steps",
    "timestep_scaling",
    "eta",
)
#: Fields of diffusers' FlowMatchEulerDiscreteScheduler: they apply to ``flow_euler`` only.
FLOW_FIELDS = (
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
)
#: Fields of TrigFlow / SCM sampling (SCMScheduler's sigma_data, SanaSprintPipeline's
#: max_timesteps and intermediate_timesteps): they apply to ``scm`` only.
SCM_FIELDS = ("sigma_data", "max_timesteps", "intermediate_timesteps")
# FlowMatchEulerDiscreteScheduler options this sampler does not model, and their "off" values: a
# scheduler config holding any other value is refused instead of being silently dropped.
_FLOW_OPTIONS_OFF: dict[str, Any] = {
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


@dataclass(frozen=True)
class SamplerConfig:
    """The noise schedule and few-step sampler. Defaults: the paper's LCM with a linear schedule.

    Field names and meanings are those of diffusers' ``LCMScheduler`` / ``DDIMScheduler`` and, for
    ``kind = "flow_euler"``, ``FlowMatchEulerDiscreteScheduler``. To match a pretrained
    checkpoint, build it from the checkpoint's ``scheduler_config.json`` with
    :meth:`from_diffusers_config` (PixArt-LCM ships ``scaled_linear`` 0.00085..0.012; SD3 a flow
    matching Euler scheduler with ``shift`` 3.0; SANA-Sprint an ``SCMScheduler``). A field of
    another kind's family (:data:`BETA_SCHEDULE_FIELDS`, :data:`FLOW_FIELDS`,
    :data:`SCM_FIELDS`) set away from its default is refused, naming it.
    """

    kind: SamplerKind = "lcm"
    """The few-step sampler: ``lcm`` (the paper), ``ddim``, ``flow_euler`` (flow matching's
    Euler sampler, SD3 / SD3.5 / Sana: x_next = x + (sigma_next - sigma) * v) or ``scm``
    (TrigFlow consistency steps, SANA-Sprint: SCMScheduler as SanaSprintPipeline drives it)."""
    prediction_type: PredictionType = "epsilon"
    """What the network predicts: epsilon, v (v_prediction) or the clean sample (LCM / DDIM);
    flow_euler needs flow_prediction (the velocity noise - x0)."""
    num_train_timesteps: int = 1000
    """Length of the discrete noise schedule the network was trained on."""
    shift: float = 1.0
    """flow_euler only: the timestep shift sigma' = shift * sigma / (1 + (shift - 1) * sigma)
    (SD3 / SD3.5: 3.0; 1.0 = none). Unused with use_dynamic_shifting."""
    use_dynamic_shifting: bool = False
    """flow_euler only: shift by mu from the image's token count (Flux-style) instead of shift;
    build_schedule then needs the image sequence length."""
    base_shift: float = 0.5
    """flow_euler + use_dynamic_shifting: mu at base_image_seq_len tokens."""
    max_shift: float = 1.15
    """flow_euler + use_dynamic_shifting: mu at max_image_seq_len tokens (linear in between)."""
    base_image_seq_len: int = 256
    """flow_euler + use_dynamic_shifting: the token count where mu = base_shift."""
    max_image_seq_len: int = 4096
    """flow_euler + use_dynamic_shifting: the token count where mu = max_shift."""
    beta_schedule: BetaSchedule = "linear"
    """diffusers' beta schedule name (PixArt-LCM: scaled_linear)."""
    beta_start: float = 0.0001
    """First beta of the schedule."""
    beta_end: float = 0.02
    """Last beta of the schedule."""
    rescale_betas_zero_snr: bool = False
    """Rescale the schedule to zero terminal SNR (Lin et al. 2024)."""
    timestep_spacing: TimestepSpacing = "leading"
    """How the K sampling timesteps are spread over the schedule (diffusers' names)."""
    steps_offset: int = 0
    """Offset added to every sampling timestep (diffusers' steps_offset)."""
    set_alpha_to_one: bool = True
    """DDIM: the final step's previous alpha is 1 (else alphas_cumprod[0])."""
    clip_sample: bool = False
    """Clip the predicted clean sample to [-clip_sample_range, clip_sample_range]."""
    clip_sample_range: float = 1.0
    """The clipping range of clip_sample."""
    original_inference_steps: int = 50
    """LCM only: the skipping-step grid the consistency model was distilled on, and the scale of
    the timestep inside the boundary-condition scalings c_skip / c_out.
    """
    timestep_scaling: float = 10.0
    """LCM only: scale of the timestep inside the boundary-condition scalings c_skip / c_out."""
    eta: float = 0.0
    """DDIM only: stochasticity (0 = deterministic DDIM)."""
    sigma_data: float = 0.5
    """scm only: the data's standard deviation in TrigFlow (SCMScheduler's sigma_data; SANA-
    Sprint: 0.5): x_t = cos(t) * x0 + sin(t) * z with x0 and z scaled to sigma_data."""
    max_timesteps: float = 1.5708
    """scm only: the first TrigFlow angle (pure noise at pi / 2; SanaSprintPipeline's 1.57080);
    the K + 1 angles are linspace(max_timesteps, 0, K + 1)."""
    intermediate_timesteps: float | None = 1.3
    """scm only, K = 2 only: the middle angle of the 2-step grid (SanaSprintPipeline's 1.3;
    None: the linspace grid). Other K ignore it (the pipeline must then be called with
    intermediate_timesteps=None)."""
    embedded_guidance_scale: float | None = None
    """A guidance-distilled denoiser's guidance input (SANA-Sprint's ``guidance_embeds``:
    SanaSprintPipeline's ``guidance_scale``, 4.5 by default; the network sees it times its
    config's guidance_embeds_scale). None: a model without a guidance embedding."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight w (Ho & Salimans 2022; diffusers' ``guidance_scale``):
    each step's network output is ``uncond + w * (cond - uncond)``, both halves from one doubled
    batch (2x the denoiser cost per step), as ``PixArtAlphaPipeline``. 1.0 = off (one conditional
    call, as diffusers' ``do_classifier_free_guidance = guidance_scale > 1``); > 1 needs the
    data's null conditioning (the empty prompt, stored by ``e2ed2 precompute``). Also applies to
    the teacher, sample grids and evaluation. LCM-distilled checkpoints (PixArt-LCM) have
    CFG 4.5 distilled in and sample with 1.0; diffusers still guides them if asked, so this does.
    """

    def __post_init__(self) -> None:
        check_fields("sampler", self)
        self._check_kind_fields()
        if self.num_train_timesteps < 2:
            raise ValueError(
                f"sampler.num_train_timesteps must be >= 2, got {self.num_train_timesteps}"
            )
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                "sampler.beta_start/beta_end must satisfy 0 < beta_start < beta_end < 1, got "
                f"{self.beta_start}, {self.beta_end}"
            )
        if self.eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.eta}")
        if self.kind == "lcm" and self.eta != 0:
            raise ValueError("sampler.eta applies to kind='ddim' only; LCM's noise is fixed")
        if self.original_inference_steps < 1:
            raise ValueError(
                f"sampler.original_inference_steps must be >= 1, got {self.original_inference_steps}"
            )
        if self.kind == "lcm" and self.original_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"sampler.original_inference_steps={self.original_inference_steps} exceeds "
                f"sampler.num_train_timesteps={self.num_train_timesteps} (LCM's skipping grid "
                "takes every (num_train_timesteps // original_inference_steps)-th timestep)"
            )
        if self.steps_offset < 0:
            raise ValueError(f"sampler.steps_offset must be >= 0, got {self.steps_offset}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"sampler.clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not self.timestep_scaling > 0:
            raise ValueError(f"sampler.timestep_scaling must be > 0, got {self.timestep_scaling}")
        if not self.guidance_scale >= 1:
            raise ValueError(
                f"sampler.guidance_scale must be >= 1 (1.0 = no guidance), got "
                f"{self.guidance_scale}; diffusers treats every value <= 1 (e.g. PixArt-LCM's 0) "
                "as no guidance, which is 1.0 here"
            )
        if self.embedded_guidance_scale is not None and not self.embedded_guidance_scale >= 0:
            raise ValueError(
                "sampler.embedded_guidance_scale must be >= 0 (or none: no guidance input), got "
                f"{self.embedded_guidance_scale}"
            )
        self._check_scm()

    def _check_scm(self) -> None:
        if self.kind != "scm":
            return
        if not self.sigma_data > 0:
            raise ValueError(f"sampler.sigma_data must be > 0, got {self.sigma_data}")
        if not 0 < self.max_timesteps <= 1.5708:
            raise ValueError(
                "sampler.max_timesteps must be in (0, 1.5708] (a TrigFlow angle, pi / 2 = pure "
                f"noise), got {self.max_timesteps}"
            )
        middle = self.intermediate_timesteps
        if middle is not None and not 0 < middle < self.max_timesteps:
            raise ValueError(
                f"sampler.intermediate_timesteps must be in (0, max_timesteps="
                f"{self.max_timesteps}) or none, got {middle}"
            )
        if self.guidance_scale != 1:
            raise ValueError(
                f"sampler.guidance_scale={self.guidance_scale} with kind='scm': SANA-Sprint is "
                "guidance-distilled and its pipeline runs no classifier-free guidance; "
                "set sampler.embedded_guidance_scale (its guidance input) and guidance_scale=1"
            )

    def _check_kind_fields(self) -> None:
        """Refuses fields of the other sampler family set away from their defaults (a preset
        that sets beta_schedule for flow matching, or shift for LCM, means something else)."""
        flow = self.kind == "flow_euler"
        scm = self.kind == "scm"
        defaults = type(self).__dataclass_fields__
        groups = {
            "LCM / DDIM's beta schedule": (BETA_SCHEDULE_FIELDS, self.kind in ("lcm", "ddim")),
            "flow_euler": (FLOW_FIELDS, flow),
            "scm": (SCM_FIELDS, scm),
        }
        for family, (names, applies) in groups.items():
            set_keys = [k for k in names if getattr(self, k) != defaults[k].default]
            if set_keys and not applies:
                raise ValueError(
                    f"sampler.kind={self.kind!r} does not use "
                    f"{', '.join(f'sampler.{k}' for k in set_keys)} ({family} fields); remove them"
                )
        if scm != (self.prediction_type == "trigflow"):
            raise ValueError(
                f"sampler.prediction_type={self.prediction_type!r} with kind={self.kind!r}: "
                "kind='scm' (SANA-Sprint's TrigFlow network) needs prediction_type='trigflow', "
                "and 'trigflow' needs kind='scm'"
            )
        if scm:
            return
        if flow and self.prediction_type != "flow_prediction":
            raise ValueError(
                f"sampler.prediction_type={self.prediction_type!r} does not apply to "
                "kind='flow_euler': its network predicts the velocity noise - x0; set "
                "sampler.prediction_type='flow_prediction'"
            )
        if not flow and self.prediction_type == "flow_prediction":
            raise ValueError(
                f"sampler.prediction_type='flow_prediction' needs kind='flow_euler', got "
                f"kind={self.kind!r}"
            )
        if not self.shift > 0:
            raise ValueError(f"sampler.shift must be > 0, got {self.shift}")
        if not 1 <= self.base_image_seq_len < self.max_image_seq_len:
            raise ValueError(
                "sampler.base_image_seq_len/max_image_seq_len must satisfy 1 <= base < max, got "
                f"{self.base_image_seq_len}, {self.max_image_seq_len}"
            )

    def max_num_steps(self) -> int:
        """The most sampler steps this schedule can give: LCM samples its distillation grid of
        original_inference_steps timesteps, DDIM, flow_euler and scm the num_train_timesteps of
        the schedule (SCMScheduler's own limit)."""
        return self.original_inference_steps if self.kind == "lcm" else self.num_train_timesteps

    def dynamic_shift_mu(self, image_seq_len: int) -> float:
        """Dynamic shifting's ``mu`` for an image of ``image_seq_len`` transformer tokens: linear
        from base_shift at base_image_seq_len to max_shift at max_image_seq_len, as the SD3 / Flux
        pipelines compute it (``calculate_shift``) before ``set_timesteps(mu=...)``."""
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int):
            raise TypeError(f"image_seq_len must be an int, got {image_seq_len!r}")
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
        slope = (self.max_shift - self.base_shift) / (
            self.max_image_seq_len - self.base_image_seq_len
        )
        intercept = self.base_shift - slope * self.base_image_seq_len
        return image_seq_len * slope + intercept

    @classmethod
    def from_diffusers_config(
        cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any
    ) -> SamplerConfig:
        """From a diffusers scheduler config (a dict, a ``scheduler_config.json`` or its folder).

        The kind comes from ``_class_name`` unless given in ``overrides``. Keys this sampler does
        not model (e.g. ``thresholding=True``, ``trained_betas``) raise instead of being dropped.
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "scheduler_config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"no diffusers scheduler config at {path!r} (expected scheduler_config.json)"
                )
            with open(path) as f:
                config = typing.cast(dict[str, Any], json.load(f))
        values = dict(config)
        class_name = values.pop("_class_name", None)
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        if "kind" not in overrides:
            by_class = {c: kind for kind, c in SCHEDULER_CLASS_NAMES.items()}
            if class_name not in by_class:
                raise ValueError(
                    f"scheduler _class_name {class_name!r} is not supported; expected one of "
                    f"{sorted(by_class)} (or pass kind=...)"
                )
            overrides["kind"] = by_class[class_name]
        if overrides["kind"] == "flow_euler":
            for key, off in _FLOW_OPTIONS_OFF.items():
                value = values.pop(key, off)
                if value != off:
                    raise ValueError(
                        f"scheduler config sets {key}={value!r}, which is not supported "
                        f"(only {key}={off!r})"
                    )
            # diffusers' flow schedulers have no prediction_type: the network predicts velocity.
            overrides.setdefault("prediction_type", "flow_prediction")
        if overrides["kind"] == "scm":
            values.setdefault("prediction_type", "trigflow")
        if values.pop("thresholding", False):
            raise ValueError("scheduler config sets thresholding=True, which is not supported")
        if values.pop("trained_betas", None) is not None:
            raise ValueError("scheduler config sets trained_betas, which is not supported")
        for ignored in ("dynamic_thresholding_ratio", "sample_max_value"):
            values.pop(ignored, None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"scheduler config has keys this sampler does not model: {unknown}")
        values.update(overrides)
        return cls(**values)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the matching diffusers scheduler class."""
        if self.kind == "flow_euler":
            return {"num_train_timesteps": self.num_train_timesteps} | {
                k: getattr(self, k) for k in FLOW_FIELDS
            }
        if self.kind == "scm":
            # max_timesteps / intermediate_timesteps are SanaSprintPipeline call arguments, not
            # scheduler config: the export's README states them.
            return {
                "num_train_timesteps": self.num_train_timesteps,
                "prediction_type": self.prediction_type,
                "sigma_data": self.sigma_data,
            }
        kwargs = {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "set_alpha_to_one": self.set_alpha_to_one,
            "steps_offset": self.steps_offset,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }
        if self.kind == "lcm":
            kwargs["original_inference_steps"] = self.original_inference_steps
            kwargs["timestep_scaling"] = self.timestep_scaling
        return kwargs

    def to_diffusers(self) -> SchedulerMixin:
        """The equivalent diffusers scheduler (for pipelines, export and the reference tests)."""
        import diffusers  # lazy: config/ must not import torch, which diffusers imports

        return getattr(diffusers, SCHEDULER_CLASS_NAMES[self.kind])(**self.diffusers_kwargs())


def check_num_steps(sampler: SamplerConfig, num_steps: int, key: str) -> None:
    """Raises ValueError naming ``key`` unless the schedule can give ``num_steps`` steps."""
    limit = sampler.max_num_steps()
    if not 1 <= num_steps <= limit:
        grid = (
            f"sampler.original_inference_steps={limit} (LCM samples its distillation grid)"
            if sampler.kind == "lcm"
            else f"sampler.num_train_timesteps={limit} ({sampler.kind})"
        )
        raise ValueError(f"{key}={num_steps} must be in 1..{limit}: the schedule has {grid}")
