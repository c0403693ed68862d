"""The functional sampler reproduces diffusers' LCMScheduler.step / DDIMScheduler.step."""

from __future__ import annotations

import json

import pytest
import torch

from e2ed2.engine import SamplerConfig, build_schedule

STEP_COUNTS = (1, 2, 3, 4, 8)
SHAPE = (2, 4, 6, 5)


def _run_both(config: SamplerConfig, num_steps: int, seed: int = 0):
    """Feeds the same model outputs and noise through diffusers and through our schedule."""
    scheduler = config.to_diffusers()
    scheduler.set_timesteps(num_steps)
    schedule = build_schedule(config, num_steps)
    assert list(schedule.timesteps) == [int(t) for t in scheduler.timesteps]

    inputs = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=inputs)
    ref_noise = torch.Generator().manual_seed(seed + 1)
    our_noise = torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for index, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(SHAPE, generator=inputs)
        expected = scheduler.step(model_output, t, x, generator=ref_noise, return_dict=False)[0]
        noise = torch.randn(SHAPE, generator=our_noise) if schedule.takes_noise(index) else None
        got = schedule.step(index, model_output, x, noise)
        err = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
        x = expected
    return worst


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_matches_diffusers(num_steps: int, prediction_type: str) -> None:
    config = SamplerConfig(kind="lcm", prediction_type=prediction_type)
    assert _run_both(config, num_steps) <= 1e-6


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(num_steps: int, prediction_type: str, eta: float) -> None:
    config = SamplerConfig(kind="ddim", prediction_type=prediction_type, eta=eta)
    scheduler = config.to_diffusers()
    scheduler.set_timesteps(num_steps)
    schedule = build_schedule(config, num_steps)
    inputs = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=inputs)
    for index, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(SHAPE, generator=inputs)
        noise = torch.randn(SHAPE, generator=inputs)
        expected = scheduler.step(
            model_output, t, x, eta=eta, variance_noise=noise, return_dict=False
        )[0]
        got = schedule.step(index, model_output, x, noise if schedule.takes_noise(index) else None)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        x = expected


@pytest.mark.parametrize(
    "overrides",
    [
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
        dict(timestep_spacing="trailing"),
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
        dict(clip_sample=True, clip_sample_range=0.5),
        dict(prediction_type="sample"),
    ],
)
@pytest.mark.parametrize("kind", ["lcm", "ddim"])
def test_schedule_options_match_diffusers(kind: str, overrides: dict) -> None:
    config = SamplerConfig(kind=kind, **overrides)
    assert _run_both(config, 4, seed=7) <= 1e-6


def test_noised_start_matches_add_noise() -> None:
    config = SamplerConfig()
    schedule = build_schedule(config, 4)
    scheduler = config.to_diffusers()
    clean, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    for index, t in enumerate(schedule.timesteps):
        expected = scheduler.add_noise(clean, noise, torch.tensor([t]))
        torch.testing.assert_close(schedule.add_noise(clean, noise, index), expected)


def test_lcm_last_step_takes_no_noise_and_others_do() -> None:
    schedule = build_schedule(SamplerConfig(kind="lcm"), 4)
    assert [schedule.takes_noise(i) for i in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError, match="injects noise"):
        schedule.step(0, torch.zeros(SHAPE), torch.zeros(SHAPE), None)


def test_from_diffusers_config_file(tmp_path) -> None:
    # The scheduler config PixArt-LCM checkpoints ship (values, not a download).
    pixart_lcm = {
        "_class_name": "LCMScheduler",
        "_diffusers_version": "0.22.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "original_inference_steps": 50,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 1,
        "thresholding": False,
        "timestep_scaling": 10.0,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }
    (tmp_path / "scheduler_config.json").write_text(json.dumps(pixart_lcm))
    config = SamplerConfig.from_diffusers_config(tmp_path)
    assert config.kind == "lcm" and config.beta_schedule == "scaled_linear"
    assert config.steps_offset == 1
    assert _run_both(config, 4) <= 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="euler"), "sampler.kind"),
        (dict(prediction_type="flow"), "sampler.prediction_type"),
        (dict(beta_start=0.1, beta_end=0.01), "beta_start"),
        (dict(kind="lcm", eta=0.5), "eta"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_from_diffusers_config_rejects_unmodelled_keys() -> None:
    with pytest.raises(ValueError, match="thresholding"):
        SamplerConfig.from_diffusers_config({"_class_name": "DDIMScheduler", "thresholding": True})
    with pytest.raises(ValueError, match="not supported"):
        SamplerConfig.from_diffusers_config({"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="variance_type"):
        SamplerConfig.from_diffusers_config(
            {"_class_name": "DDIMScheduler", "variance_type": "fixed_small"}
        )


def test_zero_steps_rejected() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        build_schedule(SamplerConfig(), 0)
