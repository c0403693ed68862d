"""Functional, differentiable few-step samplers (LCM, DDIM, flow matching Euler, TrigFlow SCM)
built from a diffusers scheduler.

diffusers' schedulers are stateful (``step`` advances ``_step_index`` and draws its own noise), so
they cannot be re-run inside an activation checkpoint: the recompute would see a different step
index and different noise. Here the diffusers scheduler is used once, to build the timesteps and
``alphas_cumprod`` (so every beta schedule, spacing and offset option means exactly what it means in
diffusers), and each step becomes a pure function of
``(step index, model output, x_t, injected noise)`` with per-step coefficients precomputed as
Python floats. Tests check it against ``LCMScheduler.step`` / ``DDIMScheduler.step``.

Equations (``a_t`` = alphas_cumprod[t], ``t`` the current and ``s`` the next timestep):
  x0 prediction: epsilon  x0 = (x_t - sqrt(1-a_t) * out) / sqrt(a_t)
                 v        x0 = sqrt(a_t) * x_t - sqrt(1-a_t) * out
                 sample   x0 = out
  LCM (Luo et al. 2023, consistency boundary condition with c_skip(t), c_out(t)):
      denoised = c_out * x0 + c_skip * x_t
      x_s = sqrt(a_s) * denoised + sqrt(1-a_s) * noise     (last step: x_s = denoised, no noise)
  DDIM (Song et al. 2021, eq. 12): eps' = implied noise, sigma = eta * sqrt(var(t, s))
      x_s = sqrt(a_s) * x0 + sqrt(1 - a_s - sigma^2) * eps' + sigma * noise
  Flow matching Euler (rectified flow, SD3; diffusers' FlowMatchEulerDiscreteScheduler): the
  path is x_sigma = (1 - sigma) * x0 + sigma * noise, the network predicts v = noise - x0 at
  the float timestep t = sigma * num_train_timesteps, and
      x_next = x + (sigma_next - sigma) * v       x0 = x - sigma * v
  with the K + 1 sigmas (shifted, the last one 0) exactly as ``set_timesteps`` computes them
  (``mu`` for dynamic shifting from the image's token count). The step runs in float32 and
  returns the model output's dtype, as diffusers' does.
  TrigFlow SCM (Lu & Song 2024, sCM; SANA-Sprint with diffusers' SCMScheduler as
  SanaSprintPipeline drives it): angles s_0 = max_timesteps > ... > s_K = 0 (K = 2: the
  intermediate angle), data and noise at scale sigma_d, x = cos(s) x0 + sin(s) z. The network
  is called at the flow time r = sin(s) / (cos(s) + sin(s)) on the input
  x / sigma_d * c_in (c_in = sqrt(r^2 + (1 - r)^2)), and its output F becomes the TrigFlow
  velocity  v = sigma_d * ((1 - 2r) x_in + (1 - 2r + 2r^2) F) / c_in; then
      x0 = cos(s) x - sin(s) v       x_next = cos(s_next) x0 + sin(s_next) sigma_d n
  and the sample after the last step is x0 / sigma_d (the pipeline's ``denoised``). The
  engine's state is x / sigma_d (unit variance, as the trajectory's start noise): with
  sigma_d = 0.5 (SANA-Sprint) the rescalings are exact and every step is bit-equal to
  SCMScheduler.step. The network call and the velocity (:meth:`SamplerSchedule.model_output`)
  belong to the sampler here, not to core/network.py: they are SCM's parameterisation.

Size: four samplers' steps and schedule builders side by side, each checked against its
diffusers scheduler; one SamplerSchedule type serves the trajectory for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from ..config.sampler import SamplerConfig
from .network import Conditioning, denoise

if TYPE_CHECKING:
    # The scheduler classes SamplerConfig.to_diffusers builds, by sampler kind.
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )
    from diffusers.schedulers.scheduling_lcm import LCMScheduler
    from diffusers.schedulers.scheduling_scm import SCMScheduler

__all__ = ["SamplerConfig", "SamplerSchedule", "build_schedule", "image_seq_len"]


@dataclass(frozen=True)
class SamplerSchedule:
    """Per-step constants of a K-step sampler; :meth:`step` is a pure function of its inputs.

    All coefficients are computed once in float32 exactly as diffusers computes them and stored as
    Python floats, so a step costs no device syncs and behaves the same under fake tensors.
    Step ``i`` evaluates the network at ``timesteps[i]`` and moves to ``timesteps[i + 1]``.
    LCM / DDIM timesteps are ints; flow matching's are floats (``sigma * num_train_timesteps``),
    and only its ``sigma`` columns are filled (the beta-schedule columns are empty).
    """

    config: SamplerConfig
    timesteps: tuple[int | float, ...]
    sqrt_alpha_prod: tuple[float, ...]
    sqrt_one_minus_alpha_prod: tuple[float, ...]
    sqrt_alpha_prod_next: tuple[float, ...]
    # LCM: c_skip / c_out of each step. DDIM: unused (0, 1).
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]
    # Coefficient of the implied noise in the DDIM update; 0 for LCM.
    direction_scale: tuple[float, ...]
    # Coefficient of the injected noise; 0 where the step takes none (LCM's last step, DDIM eta=0).
    noise_scale: tuple[float, ...]
    # Flow matching only: sigma of each step, of the next one (0 after the last), and their
    # difference sigma_next - sigma, in float32 as diffusers subtracts them.
    sigma: tuple[float, ...] = ()
    sigma_next: tuple[float, ...] = ()
    sigma_delta: tuple[float, ...] = ()
    # SCM only (float32 values as Python floats): cos / sin of each step's angle and of the next
    # one, the network's flow time r, its input scale c_in and the velocity's coefficients
    # (1 - 2r) and (1 - 2r + 2r^2). ``timesteps`` then holds r (what the network sees).
    cos_angle: tuple[float, ...] = ()
    sin_angle: tuple[float, ...] = ()
    cos_angle_next: tuple[float, ...] = ()
    sin_angle_next: tuple[float, ...] = ()
    angle: tuple[float, ...] = ()
    scm_c_in: tuple[float, ...] = ()
    scm_c_sample: tuple[float, ...] = ()
    scm_c_output: tuple[float, ...] = ()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def is_flow(self) -> bool:
        """Flow matching (velocity prediction, float timesteps, no injected noise)."""
        return self.config.kind == "flow_euler"

    @property
    def is_scm(self) -> bool:
        """TrigFlow consistency sampling (SANA-Sprint)."""
        return self.config.kind == "scm"

    def takes_noise(self, index: int) -> bool:
        """Whether step ``index`` injects fresh Gaussian noise (and so needs a ``noise`` tensor)."""
        if self.is_flow:
            return False
        if self.is_scm:
            # SCMScheduler draws noise at the last step too, but weighs it by sin(0) = 0 and the
            # pipeline returns that step's x0: no noise is needed there.
            return index < self.num_steps - 1
        return self.noise_scale[index] != 0.0

    def timestep(self, index: int) -> int | float:
        """The network's timestep at step ``index``: an int (LCM / DDIM) or a float (flow; SCM:
        the flow time r of the step's TrigFlow angle)."""
        return self.timesteps[index]

    def model_output(
        self, network: torch.nn.Module, index: int, sample: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The network's output at step ``index`` in the form :meth:`step` takes: the raw
        prediction (guided when ``config.guidance_scale`` > 1) or, for SCM, the TrigFlow velocity
        of the preconditioned call (module docstring), float32 as SanaSprintPipeline's."""
        guidance = self.config.embedded_guidance_scale
        if not self.is_scm:
            return denoise(
                network,
                sample,
                self.timestep(index),
                cond,
                guidance_scale=self.config.guidance_scale,
                embedded_guidance=guidance,
            )
        sigma_data = sample.new_tensor(self.config.sigma_data, dtype=torch.float32)
        c_in = sample.new_tensor(self.scm_c_in[index], dtype=torch.float32)
        # The pipeline's float32 latents are sigma_d * state; it divides them back (exact for a
        # power-of-two sigma_d) and scales by c_in; divisions by tensors, as it divides.
        latents = sample.float() * self.config.sigma_data
        scaled = latents / sigma_data * self.scm_c_in[index]
        raw = denoise(
            network, scaled.to(sample.dtype), self.timestep(index), cond, embedded_guidance=guidance
        )
        velocity = (
            self.scm_c_sample[index] * scaled + self.scm_c_output[index] * raw.float()
        ) / c_in
        return velocity * self.config.sigma_data

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """``x_t`` at ``timesteps[index]`` from a clean latent (forward process, as diffusers:
        ``add_noise``, or flow matching's ``scale_noise`` = (1 - sigma) * x0 + sigma * noise)."""
        if self.is_flow:
            sigma = self.sigma[index]
            return sigma * noise + (1.0 - sigma) * clean
        if self.is_scm:
            # TrigFlow on the unit-scale state: (cos(s) sigma_d x0 + sin(s) sigma_d z) / sigma_d.
            return self.cos_angle[index] * clean + self.sin_angle[index] * noise
        return self.sqrt_alpha_prod[index] * clean + self.sqrt_one_minus_alpha_prod[index] * noise

    def predict_clean(
        self, index: int, model_output: torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """x0 implied by the network output at step ``index`` (clipped if the config says so);
        flow matching: ``x - sigma * v``."""
        if self.is_flow:
            return sample - self.sigma[index] * model_output
        if self.is_scm:
            latents = sample.float() * self.config.sigma_data
            clean = self.cos_angle[index] * latents - self.sin_angle[index] * model_output
            return (clean / sample.new_tensor(self.config.sigma_data, dtype=torch.float32)).to(
                sample.dtype
            )
        a, b = self.sqrt_alpha_prod[index], self.sqrt_one_minus_alpha_prod[index]
        kind = self.config.prediction_type
        if kind == "epsilon":
            clean = (sample - b * model_output) / a
        elif kind == "v_prediction":
            clean = a * sample - b * model_output
        else:
            clean = model_output
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            clean = clean.clamp(-limit, limit)
        return clean

    def step(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One sampler step: ``x_{t_index}`` -> the next sample (the final sample after the last)."""
        if not 0 <= index < self.num_steps:
            raise IndexError(f"step index {index} out of range for {self.num_steps} steps")
        if self.takes_noise(index) and noise is None:
            raise ValueError(f"step {index} injects noise; pass noise with the sample's shape")
        if self.is_flow:
            # diffusers: the sample is upcast, the Euler update runs in float32 and the result
            # takes the model output's dtype (a bf16 run rounds once per step, not per op).
            moved = sample.float() + self.sigma_delta[index] * model_output.float()
            return moved.to(model_output.dtype)
        if self.is_scm:
            return self._scm_step(index, model_output, sample, noise)
        clean = self.predict_clean(index, model_output, sample)
        if self.config.kind == "lcm":
            denoised = self.c_out[index] * clean + self.c_skip[index] * sample
            if not self.takes_noise(index):
                return denoised
            assert noise is not None  # a step that takes noise is given it (see takes_noise)
            return self.sqrt_alpha_prod_next[index] * denoised + self.noise_scale[index] * noise
        # DDIM: the implied noise comes from the unclipped output, as in diffusers.
        a, b = self.sqrt_alpha_prod[index], self.sqrt_one_minus_alpha_prod[index]
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
        elif kind == "v_prediction":
            eps = a * model_output + b * sample
        else:
            eps = (sample - a * model_output) / b
        prev = self.sqrt_alpha_prod_next[index] * clean + self.direction_scale[index] * eps
        if self.takes_noise(index):
            assert noise is not None  # a step that takes noise is given it (see takes_noise)
            prev = prev + self.noise_scale[index] * noise
        return prev

    def _scm_step(
        self,
        index: int,
        velocity: torch.Tensor,
        sample: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """SCMScheduler.step on the pipeline's float32 latents (sigma_d x the state): x0, then
        the next angle's sample with ``noise`` x sigma_d (after the last step: x0). Returns
        the unit-scale state in ``sample``'s dtype (a bf16 run rounds once per step)."""
        sigma_data = sample.new_tensor(self.config.sigma_data, dtype=torch.float32)
        latents = sample.float() * self.config.sigma_data
        clean = self.cos_angle[index] * latents - self.sin_angle[index] * velocity.float()
        if self.takes_noise(index):
            assert noise is not None  # a step that takes noise is given it (see takes_noise)
            scaled_noise = noise.float() * self.config.sigma_data
            latents = self.cos_angle_next[index] * clean + self.sin_angle_next[index] * scaled_noise
        else:
            latents = clean
        return (latents / sigma_data).to(sample.dtype)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int) -> int:
    """The transformer's image token count for a latent of ``latent_height`` x ``latent_width``
    (what dynamic shifting's ``mu`` is computed from, as the SD3 / Flux pipelines do)."""
    return (latent_height // patch_size) * (latent_width // patch_size)


def build_schedule(
    config: SamplerConfig, num_steps: int, *, image_seq_len: int | None = None
) -> SamplerSchedule:
    """Timesteps and coefficients of a ``num_steps``-step sampler, via the diffusers scheduler.

    ``image_seq_len``: the image's transformer token count (:func:`image_seq_len`); required by
    flow matching with ``use_dynamic_shifting`` (its shift ``mu`` depends on it), unused
    otherwise.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if config.kind == "flow_euler":
        return _build_flow_schedule(config, num_steps, image_seq_len)
    if config.kind == "scm":
        return _build_scm_schedule(config, num_steps)
    scheduler = cast("DDIMScheduler | LCMScheduler", config.to_diffusers())
    scheduler.set_timesteps(num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    if len(timesteps) != num_steps:
        raise ValueError(
            f"{config.kind} scheduler gave {len(timesteps)} timesteps for num_steps={num_steps}"
        )
    acp = scheduler.alphas_cumprod  # float32, as diffusers indexes it
    final = scheduler.final_alpha_cumprod

    def alpha_at(t: int) -> torch.Tensor:
        return acp[t] if t >= 0 else final

    cols: dict[str, list[float]] = {
        k: []
        for k in (
            "sqrt_alpha_prod",
            "sqrt_one_minus_alpha_prod",
            "sqrt_alpha_prod_next",
            "c_skip",
            "c_out",
            "direction_scale",
            "noise_scale",
        )
    }
    for i, t in enumerate(timesteps):
        alpha_t = alpha_at(t)
        if config.kind == "lcm":
            # diffusers LCM: the next timestep is the next grid point (the last step "moves" to
            # itself and takes no noise).
            t_next = timesteps[i + 1] if i + 1 < num_steps else t
            alpha_next = alpha_at(t_next)
            lcm = cast("LCMScheduler", scheduler)
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
            last = i == num_steps - 1
            direction = 0.0
            noise = 0.0 if last else float((1 - alpha_next).sqrt())
            c_skip, c_out = float(c_skip), float(c_out)
        else:
            t_next = t - config.num_train_timesteps // num_steps
            alpha_next = alpha_at(t_next)
            variance = cast("DDIMScheduler", scheduler)._get_variance(t, t_next)
            std = config.eta * variance**0.5
            direction = float((1 - alpha_next - std**2) ** 0.5)
            noise = float(std) if config.eta > 0 else 0.0
            c_skip, c_out = 0.0, 1.0
        cols["sqrt_alpha_prod"].append(float(alpha_t**0.5))
        cols["sqrt_one_minus_alpha_prod"].append(float((1 - alpha_t) ** 0.5))
        cols["sqrt_alpha_prod_next"].append(float(alpha_next**0.5))
        cols["c_skip"].append(c_skip)
        cols["c_out"].append(c_out)
        cols["direction_scale"].append(direction)
        cols["noise_scale"].append(noise)
    return SamplerSchedule(
        config=config, timesteps=tuple(timesteps), **{k: tuple(v) for k, v in cols.items()}
    )


def _build_flow_schedule(
    config: SamplerConfig, num_steps: int, image_seq_len: int | None
) -> SamplerSchedule:
    scheduler = cast("FlowMatchEulerDiscreteScheduler", config.to_diffusers())
    mu = None
    if config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError(
                "sampler.use_dynamic_shifting=true needs the image sequence length: "
                "build_schedule(..., image_seq_len=image_seq_len(latent_h, latent_w, patch_size))"
            )
        mu = config.dynamic_shift_mu(image_seq_len)
    scheduler.set_timesteps(num_steps, mu=mu)
    timesteps = [float(t) for t in scheduler.timesteps]  # float32 values, exactly
    sigmas = scheduler.sigmas  # (K + 1,) float32, the last one 0
    if len(timesteps) != num_steps or sigmas.shape != (num_steps + 1,):
        raise ValueError(
            f"flow_euler scheduler gave {len(timesteps)} timesteps for num_steps={num_steps}"
        )
    return SamplerSchedule(
        config=config,
        timesteps=tuple(timesteps),
        sqrt_alpha_prod=(),
        sqrt_one_minus_alpha_prod=(),
        sqrt_alpha_prod_next=(),
        c_skip=(),
        c_out=(),
        direction_scale=(),
        noise_scale=(),
        sigma=tuple(float(s) for s in sigmas[:-1]),
        sigma_next=tuple(float(s) for s in sigmas[1:]),
        # float32 subtraction, as diffusers' dt = sigma_next - sigma.
        sigma_delta=tuple(float(d) for d in sigmas[1:] - sigmas[:-1]),
    )


def _build_scm_schedule(config: SamplerConfig, num_steps: int) -> SamplerSchedule:
    """SCM's K + 1 TrigFlow angles from SCMScheduler.set_timesteps (as SanaSprintPipeline asks
    for them: the intermediate angle at K = 2 only), and each step's coefficients computed with
    the pipeline's float32 tensor ops, so a step multiplies by the values it multiplies by."""
    scheduler = cast("SCMScheduler", config.to_diffusers())
    middle = config.intermediate_timesteps if num_steps == 2 else None
    scheduler.set_timesteps(
        num_steps, max_timesteps=config.max_timesteps, intermediate_timesteps=middle
    )
    angles = scheduler.timesteps  # (K + 1,) float32, the last one 0
    if angles.shape != (num_steps + 1,):
        raise ValueError(f"scm scheduler gave {angles.shape[0]} angles for num_steps={num_steps}")
    cols: dict[str, list[float]] = {
        k: []
        for k in (
            "angle",
            "cos_angle",
            "sin_angle",
            "cos_angle_next",
            "sin_angle_next",
            "scm_c_in",
            "scm_c_sample",
            "scm_c_output",
            "timesteps",
        )
    }
    for i in range(num_steps):
        s, t = angles[i], angles[i + 1]
        r = torch.sin(s) / (torch.cos(s) + torch.sin(s))  # the flow time the network sees
        values = {
            "angle": s,
            "cos_angle": torch.cos(s),
            "sin_angle": torch.sin(s),
            "cos_angle_next": torch.cos(t),
            "sin_angle_next": torch.sin(t),
            "scm_c_in": torch.sqrt(r**2 + (1 - r) ** 2),
            "scm_c_sample": 1 - 2 * r,
            "scm_c_output": 1 - 2 * r + 2 * r**2,
            "timesteps": r,
        }
        for key, value in values.items():
            cols[key].append(float(value))
    timesteps = tuple(cols.pop("timesteps"))
    return SamplerSchedule(
        config=config,
        timesteps=timesteps,
        sqrt_alpha_prod=(),
        sqrt_one_minus_alpha_prod=(),
        sqrt_alpha_prod_next=(),
        c_skip=(),
        c_out=(),
        direction_scale=(),
        noise_scale=(),
        **{k: tuple(v) for k, v in cols.items()},
    )
