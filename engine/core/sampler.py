"""Functional, differentiable few-step samplers (LCM, DDIM, flow matching Euler) built from a
diffusers scheduler.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.sampler import SamplerConfig

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

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def is_flow(self) -> bool:
        """Flow matching (velocity prediction, float timesteps, no injected noise)."""
        return self.config.kind == "flow_euler"

    def takes_noise(self, index: int) -> bool:
        """Whether step ``index`` injects fresh Gaussian noise (and so needs a ``noise`` tensor)."""
        if self.is_flow:
            return False
        return self.noise_scale[index] != 0.0

    def timestep(self, index: int) -> int | float:
        """The network's timestep at step ``index``: an int (LCM / DDIM) or a float (flow)."""
        return self.timesteps[index]

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """``x_t`` at ``timesteps[index]`` from a clean latent (forward process, as diffusers:
        ``add_noise``, or flow matching's ``scale_noise`` = (1 - sigma) * x0 + sigma * noise)."""
        if self.is_flow:
            sigma = self.sigma[index]
            return sigma * noise + (1.0 - sigma) * clean
        return self.sqrt_alpha_prod[index] * clean + self.sqrt_one_minus_alpha_prod[index] * noise

    def predict_clean(
        self, index: int, model_output: torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """x0 implied by the network output at step ``index`` (clipped if the config says so);
        flow matching: ``x - sigma * v``."""
        if self.is_flow:
            return sample - self.sigma[index] * model_output
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
        clean = self.predict_clean(index, model_output, sample)
        if self.config.kind == "lcm":
            denoised = self.c_out[index] * clean + self.c_skip[index] * sample
            if not self.takes_noise(index):
                return denoised
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
            prev = prev + self.noise_scale[index] * noise
        return prev


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
    scheduler = config.to_diffusers()
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
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
            last = i == num_steps - 1
            direction = 0.0
            noise = 0.0 if last else float((1 - alpha_next).sqrt())
            c_skip, c_out = float(c_skip), float(c_out)
        else:
            t_next = t - config.num_train_timesteps // num_steps
            alpha_next = alpha_at(t_next)
            variance = scheduler._get_variance(t, t_next)
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
    scheduler = config.to_diffusers()
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
