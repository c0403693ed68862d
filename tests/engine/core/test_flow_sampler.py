"""The functional flow matching Euler sampler reproduces diffusers' FlowMatchEulerDiscreteScheduler
(SD3 / SD3.5): timesteps, sigmas, every step, the forward process and the differentiable unroll."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from e2ed2.engine import Conditioning, SamplerConfig, build_schedule
from e2ed2.engine.core.sampler import image_seq_len
from e2ed2.engine.core.trajectory import run_steps

SHAPE = (2, 4, 6, 5)
# SD3-medium's scheduler/scheduler_config.json (values, not a download).
SD3_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
# SD3.5-medium's: the same schedule, every option of the newer scheduler written out.
SD35_SCHEDULER = {
    **SD3_SCHEDULER,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def flow(**overrides) -> SamplerConfig:
    return SamplerConfig(kind="flow_euler", prediction_type="flow_prediction", **overrides)


def _reference(config: SamplerConfig, num_steps: int, mu: float | None = None):
    scheduler = config.to_diffusers()
    scheduler.set_timesteps(num_steps, mu=mu)
    return scheduler


CASES = [
    pytest.param(dict(shift=1.0), None, id="shift1"),
    pytest.param(dict(shift=3.0), None, id="shift3"),
    # 1024 tokens: a 512 px image through an 8x VAE and 2x2 patches.
    pytest.param(dict(use_dynamic_shifting=True), 1024, id="dynamic-1024tokens"),
]


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
@pytest.mark.parametrize("overrides, seq_len", CASES)
def test_each_step_equals_diffusers(num_steps: int, overrides: dict, seq_len: int | None) -> None:
    config = flow(**overrides)
    mu = None
    if seq_len is not None:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        assert config.dynamic_shift_mu(seq_len) == mu
    scheduler = _reference(config, num_steps, mu)
    schedule = build_schedule(config, num_steps, image_seq_len=seq_len)

    # Timesteps are floats (sigma * 1000), equal to diffusers' float32 values exactly.
    assert schedule.timesteps == tuple(float(t) for t in scheduler.timesteps)
    assert all(isinstance(t, float) for t in schedule.timesteps)
    assert schedule.sigma + schedule.sigma_next[-1:] == tuple(float(s) for s in scheduler.sigmas)
    assert schedule.sigma_next[-1] == 0.0 and schedule.sigma[0] == 1.0
    assert not any(schedule.takes_noise(i) for i in range(num_steps))

    g = torch.Generator().manual_seed(num_steps)
    ours = theirs = torch.randn(SHAPE, generator=g)
    for index, t in enumerate(scheduler.timesteps):
        velocity = torch.randn(SHAPE, generator=g)
        theirs = scheduler.step(velocity, t, theirs, return_dict=False)[0]
        ours = schedule.step(index, velocity, ours)
        assert torch.equal(ours, theirs), f"step {index} of {num_steps}"


def test_dynamic_shifting_needs_the_sequence_length_and_it_matters() -> None:
    config = flow(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="image sequence length"):
        build_schedule(config, 4)
    small = build_schedule(config, 4, image_seq_len=image_seq_len(32, 32, 2))  # 256 tokens
    large = build_schedule(config, 4, image_seq_len=image_seq_len(128, 128, 2))  # 4096 tokens
    assert image_seq_len(128, 96, 2) == 64 * 48
    # More tokens shift the schedule towards noise (mu 0.5 -> 1.15).
    assert all(a < b for a, b in zip(small.sigma[1:], large.sigma[1:], strict=True))
    assert config.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert config.dynamic_shift_mu(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("index", [0, 1, 3])
def test_add_noise_and_clean_prediction(index: int) -> None:
    config = flow(shift=3.0)
    schedule = build_schedule(config, 4)
    scheduler = _reference(config, 4)
    clean, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = scheduler.timesteps[index]
    expected = scheduler.scale_noise(clean, t.reshape(1), noise)
    noised = schedule.add_noise(clean, noise, index)
    assert torch.equal(noised, expected)
    # The exact velocity of this pair recovers the clean latent.
    recovered = schedule.predict_clean(index, noise - clean, noised)
    torch.testing.assert_close(recovered, clean, rtol=1e-5, atol=1e-5)


class _TinyVelocityNet(nn.Module):
    """A small conv net of (x, float timestep, text): enough to make the unroll's outputs (and
    gradients) depend on every step's input and timestep."""

    def __init__(self, channels: int = 4, text_dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.text = nn.Linear(text_dim, channels)

    def forward(self, hidden_states, encoder_hidden_states, timestep, return_dict=True):
        assert timestep.dtype == torch.float32, "flow timesteps reach the model as floats"
        scale = (timestep / 1000.0).view(-1, 1, 1, 1)
        text = self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        return (torch.tanh(self.conv(hidden_states)) * (1 + scale) + text,)


@pytest.mark.parametrize("num_steps", [1, 4])
@pytest.mark.parametrize("policy", ["none", "step"])
def test_unroll_equals_the_diffusers_loop(num_steps: int, policy: str) -> None:
    """run_steps (with a graph) gives the sample of diffusers' denoising loop with the same
    model; its gradient reaches the weights through every step."""
    config = flow(shift=3.0)
    net = _TinyVelocityNet()
    states = torch.randn(SHAPE[0], 3, 8)
    cond = Conditioning(states)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    scheduler = _reference(config, num_steps)
    expected = start
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = net(expected, states, t.expand(SHAPE[0]))[0]
            expected = scheduler.step(velocity, t, expected, return_dict=False)[0]

    schedule = build_schedule(config, num_steps)
    sample = run_steps(net, schedule, cond, start, checkpoint_policy=policy)
    torch.testing.assert_close(sample, expected, rtol=1e-6, atol=1e-6)
    sample.square().mean().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_from_sd3_scheduler_config_and_back(tmp_path) -> None:
    for shipped in (SD3_SCHEDULER, SD35_SCHEDULER):
        (tmp_path / "scheduler_config.json").write_text(json.dumps(shipped))
        config = SamplerConfig.from_diffusers_config(tmp_path)
        assert config.kind == "flow_euler" and config.shift == 3.0
        assert config.prediction_type == "flow_prediction"
        scheduler = config.to_diffusers()
        assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert scheduler.config.shift == 3.0 and not scheduler.config.use_dynamic_shifting
        # What an export writes reads back as the same sampler.
        scheduler.save_config(tmp_path / "saved")
        assert SamplerConfig.from_diffusers_config(tmp_path / "saved") == config


@pytest.mark.parametrize(
    "key, value",
    [("stochastic_sampling", True), ("use_karras_sigmas", True), ("invert_sigmas", True)],
)
def test_from_diffusers_config_refuses_unmodelled_flow_options(key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        SamplerConfig.from_diffusers_config({**SD3_SCHEDULER, key: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="flow_euler"), "prediction_type='flow_prediction'"),
        (dict(prediction_type="flow_prediction"), "needs kind='flow_euler'"),
        (dict(kind="lcm", shift=3.0), r"does not use sampler\.shift"),
        (dict(kind="ddim", use_dynamic_shifting=True), "use_dynamic_shifting"),
        (
            dict(
                kind="flow_euler", prediction_type="flow_prediction", beta_schedule="scaled_linear"
            ),
            r"does not use sampler\.beta_schedule",
        ),
        (
            dict(kind="flow_euler", prediction_type="flow_prediction", eta=0.5, steps_offset=1),
            r"sampler\.steps_offset, sampler\.eta",
        ),
        (dict(kind="flow_euler", prediction_type="flow_prediction", shift=0.0), "shift"),
    ],
)
def test_config_rejects_fields_of_the_other_kind(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_flow_diffusion_loss_targets_the_velocity() -> None:
    from e2ed2.engine.objectives.losses import diffusion_input_and_target

    config = flow(shift=3.0)
    reference = config.to_diffusers()  # before set_timesteps: the training grid
    clean, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    indices = torch.tensor([0, 700])
    noisy, target = diffusion_input_and_target(config, clean, noise, indices)
    expected = torch.cat(
        [
            reference.scale_noise(
                clean[i : i + 1], reference.timesteps[j].reshape(1), noise[i : i + 1]
            )
            for i, j in enumerate(indices.tolist())
        ]
    )
    torch.testing.assert_close(noisy, expected)
    assert torch.equal(target, noise - clean)


def test_train_config_pairs_the_teacher_with_the_sampler_family() -> None:
    from e2ed2.engine.config import ConfigError, load_config

    flow_keys = ["sampler.kind=flow_euler", "sampler.prediction_type=flow_prediction"]
    teacher = ["objective.teacher_weight=1.0", "objective.l2_weight=0.0"]
    with pytest.raises(ConfigError, match="teacher_sampler='ddim' cannot sample"):
        load_config(None, [*flow_keys, *teacher])
    config = load_config(None, [*flow_keys, *teacher, "objective.teacher_sampler=flow_euler"])
    from e2ed2.engine.objectives.teacher import teacher_sampler_config

    assert teacher_sampler_config(config.objective, config.sampler) == config.sampler
    with pytest.raises(ConfigError, match="cannot sample"):
        load_config(None, [*teacher, "objective.teacher_sampler=flow_euler"])
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        load_config(None, [*flow_keys, "sampler.use_dynamic_shifting=true"])
