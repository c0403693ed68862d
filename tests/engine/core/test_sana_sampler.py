"""Sana / SANA-Sprint through the sampler seam: the functional TrigFlow SCM step against
diffusers' SCMScheduler.step, the engine's K-step unroll against SanaPipeline (flow Euler) and
SanaSprintPipeline (SCM) at K = 1, 2, 4 on real-structure tiny folders, and the SCM unroll's
gradients under every checkpoint policy against plain autograd."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from e2ed2.engine import Conditioning, SamplerConfig, build_schedule
from e2ed2.engine.config import ModelConfig
from e2ed2.engine.core.models import build_denoiser
from e2ed2.engine.core.network import denoise
from e2ed2.engine.core.trajectory import run_steps

SCM = SamplerConfig(kind="scm", prediction_type="trigflow", embedded_guidance_scale=4.5)
PROMPTS = ["a photo of a cat sitting on a red sofa", "a small boat on a calm blue lake"]
TEXT_TOKENS = 12  # the pipelines' max_sequence_length (300 at full size)
LATENT = (2, 32, 4, 4)  # 128 px through the 32x DC-AE


def _scheduler(num_steps: int, sigma_data: float = 0.5):
    from diffusers import SCMScheduler

    scheduler = SCMScheduler(sigma_data=sigma_data)
    middle = 1.3 if num_steps == 2 else None
    scheduler.set_timesteps(num_steps, max_timesteps=1.5708, intermediate_timesteps=middle)
    scheduler.set_begin_index(0)
    return scheduler


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_scm_step_is_bit_equal_to_scm_scheduler(num_steps: int) -> None:
    """Each step on the unit-scale state (x sigma_d = the scheduler's latents) gives exactly
    SCMScheduler.step's prev_sample (its x0 after the last step), with the noise it draws."""
    schedule = build_schedule(SCM, num_steps)
    scheduler = _scheduler(num_steps)
    assert schedule.angle == tuple(float(a) for a in scheduler.timesteps[:-1])
    assert [schedule.takes_noise(i) for i in range(num_steps)] == [
        i < num_steps - 1 for i in range(num_steps)
    ]
    g = torch.Generator().manual_seed(num_steps)
    state = torch.randn(LATENT, generator=g)
    latents = state * 0.5
    for index, angle in enumerate(scheduler.timesteps[:-1]):
        velocity = torch.randn(LATENT, generator=g)
        step_seed = 100 + index
        noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(step_seed))
        prev, clean = scheduler.step(
            velocity,
            angle,
            latents,
            generator=torch.Generator().manual_seed(step_seed),
            return_dict=False,
        )
        state = schedule.step(
            index, velocity, state, noise if schedule.takes_noise(index) else None
        )
        expected = prev if index < num_steps - 1 else clean
        assert torch.equal(state * 0.5, expected), f"step {index} of {num_steps}"
        assert torch.equal(schedule.predict_clean(index, velocity, latents / 0.5) * 0.5, clean)
        latents = prev


def test_scm_config_fields_and_diffusers_config() -> None:
    config = SamplerConfig.from_diffusers_config(
        {
            "_class_name": "SCMScheduler",
            "num_train_timesteps": 1000,
            "prediction_type": "trigflow",
            "sigma_data": 0.5,
        }
    )
    assert (config.kind, config.prediction_type, config.sigma_data) == ("scm", "trigflow", 0.5)
    assert type(config.to_diffusers()).__name__ == "SCMScheduler"
    with pytest.raises(ValueError, match="sampler.sigma_data"):
        SamplerConfig(kind="ddim", sigma_data=1.0)
    with pytest.raises(ValueError, match="trigflow"):
        SamplerConfig(kind="scm")
    with pytest.raises(ValueError, match="guidance-distilled"):
        dataclasses.replace(SCM, guidance_scale=2.0)
    with pytest.raises(ValueError, match="intermediate_timesteps"):
        dataclasses.replace(SCM, intermediate_timesteps=1.6)
    # K = 2 takes the intermediate angle; other K the linspace grid.
    assert build_schedule(SCM, 2).angle == (pytest.approx(1.5708), pytest.approx(1.3))
    assert build_schedule(SCM, 4).angle[1] == pytest.approx(1.5708 * 3 / 4)


def _encode(pipe, prompts, *, sprint: bool):
    import inspect

    instruction = (
        inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    )
    with torch.no_grad():
        if sprint:
            return pipe.encode_prompt(
                prompts, max_sequence_length=TEXT_TOKENS, complex_human_instruction=instruction
            )
        return pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            max_sequence_length=TEXT_TOKENS,
            complex_human_instruction=instruction,
        )


def _denoiser(folder, pipe):
    return build_denoiser(
        ModelConfig(pretrained_path=str(folder)),
        latent_channels=LATENT[1],
        latent_size=LATENT[-1],
        text_dim=pipe.transformer.config.caption_channels,
    )


@pytest.fixture(scope="module")
def sprint(sana_sprint_folder):
    """The SANA-Sprint pipeline, the engine's denoiser from its folder and the prompts' text."""
    from diffusers import SanaSprintPipeline

    pipe = SanaSprintPipeline.from_pretrained(sana_sprint_folder)
    return pipe, _denoiser(sana_sprint_folder, pipe), _encode(pipe, PROMPTS, sprint=True)


@pytest.fixture(scope="module")
def sana(sana_folder):
    """The Sana pipeline, the engine's denoiser from its folder and the prompts' text."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(sana_folder)
    return pipe, _denoiser(sana_folder, pipe), _encode(pipe, PROMPTS, sprint=False)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_unroll_equals_sana_sprint_pipeline(sana_sprint_folder, sprint, num_steps: int) -> None:
    """The engine's SCM unroll from the same start, text states and mask, with the noise the
    pipeline's generator draws, ends at SanaSprintPipeline's final latent, bit for bit."""
    pipe, model, (states, mask) = sprint
    sampler = dataclasses.replace(
        SamplerConfig.from_diffusers_config(sana_sprint_folder / "scheduler"),
        embedded_guidance_scale=4.5,
    )
    start = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=states,
            prompt_attention_mask=mask,
            latents=start,
            generator=torch.Generator().manual_seed(7),
            num_inference_steps=num_steps,
            intermediate_timesteps=1.3 if num_steps == 2 else None,
            guidance_scale=4.5,
            height=128,
            width=128,
            use_resolution_binning=False,
            output_type="latent",
        ).images
    schedule = build_schedule(sampler, num_steps)
    g = torch.Generator().manual_seed(7)  # SCMScheduler draws one noise per step, in order
    noises = [torch.randn(LATENT, generator=g) for _ in range(num_steps)]
    noises = [n if schedule.takes_noise(i) else None for i, n in enumerate(noises)]
    cond = Conditioning(states, mask)
    with torch.no_grad():
        sample = run_steps(model, schedule, cond, start, noises=noises, checkpoint_policy="none")
    assert torch.equal(sample, expected)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_unroll_equals_sana_pipeline(sana_folder, sana, num_steps: int) -> None:
    """Sana through flow Euler (shift 3, the folder's scheduler) with classifier-free guidance
    (w = 4.5, SanaPipeline's default; the empty prompt without the instruction, as the pipeline
    encodes it) ends at SanaPipeline's final latent."""
    pipe, model, (states, mask, null_states, null_mask) = sana
    sampler = dataclasses.replace(
        SamplerConfig.from_diffusers_config(sana_folder / "scheduler"), guidance_scale=4.5
    )
    assert sampler.kind == "flow_euler" and sampler.shift == 3.0
    start = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=states,
            prompt_attention_mask=mask,
            negative_prompt=None,
            negative_prompt_embeds=null_states,
            negative_prompt_attention_mask=null_mask,
            latents=start,
            num_inference_steps=num_steps,
            guidance_scale=4.5,
            height=128,
            width=128,
            use_resolution_binning=False,
            output_type="latent",
        ).images
    null = Conditioning(null_states[:1], null_mask[:1])
    cond = Conditioning(states, mask, unconditional=null)
    with torch.no_grad():
        sample = run_steps(
            model, build_schedule(sampler, num_steps), cond, start, checkpoint_policy="none"
        )
    torch.testing.assert_close(sample, expected, rtol=1e-6, atol=1e-6)


def test_guidance_input_is_required_and_refused_by_family_config(real_models) -> None:
    sprint = real_models.tiny_sana_transformer(sprint=True)
    sana = real_models.tiny_sana_transformer()
    cond = Conditioning(torch.randn(2, 5, real_models.SANA_GEMMA_WIDTH), torch.ones(2, 5))
    x = torch.randn(LATENT)
    with pytest.raises(ValueError, match="embedded_guidance_scale"):
        denoise(sprint, x, 0.5, cond)
    with pytest.raises(ValueError, match="no guidance embedding"):
        denoise(sana, x, 0.5, cond, embedded_guidance=4.5)
    with torch.no_grad():
        low = denoise(sprint, x, 0.5, cond, embedded_guidance=1.0)
        high = denoise(sprint, x, 0.5, cond, embedded_guidance=4.5)
        expected = sprint(
            x,
            encoder_hidden_states=cond.encoder_hidden_states,
            encoder_attention_mask=cond.encoder_attention_mask,
            timestep=torch.full((2,), 0.5),
            guidance=torch.full((2,), 4.5) * 0.1,
            return_dict=False,
        )[0]
    assert torch.equal(high, expected) and not torch.equal(low, high)


@pytest.mark.parametrize("policy", ["step", "block", "offload", "block_offload", "selective"])
def test_scm_unroll_gradients_equal_plain_autograd(real_models, policy: str) -> None:
    """K = 2 SCM steps (noise injected between them) through a guidance-embedded Sana: every
    checkpoint policy gives plain autograd's loss and parameter gradients."""
    model = real_models.tiny_sana_transformer(sprint=True).train()
    g = torch.Generator().manual_seed(3)
    cond = Conditioning(
        torch.randn(2, 6, real_models.SANA_GEMMA_WIDTH, generator=g),
        torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
    )
    start = torch.randn(LATENT, generator=g)
    noises = [torch.randn(LATENT, generator=g), None]
    target = torch.randn(LATENT, generator=g)
    schedule = build_schedule(SCM, 2)

    def grads(which: str):
        model.zero_grad(set_to_none=True)
        sample = run_steps(model, schedule, cond, start, noises=noises, checkpoint_policy=which)
        loss = (sample - target).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_loss, ref = grads("none")
    loss, got = grads(policy)
    assert len(ref) == len(got) == len(list(model.parameters()))
    assert all(r.abs().sum() > 0 for r in ref), "a parameter got no gradient: vacuous"
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))
    assert worst <= 1e-5, f"{policy}: max relative gradient error {worst:.3e}"


def test_sana_folders_resolve_to_their_families(sana_folder, sana_sprint_folder, tmp_path) -> None:
    """Both pipelines hold a SanaTransformer2DModel: model_index.json tells them apart (also
    from their transformer/); a bare transformer folder is Sana unless model.family says
    SANA-Sprint."""
    import shutil

    from e2ed2.engine.core.families import FAMILIES
    from e2ed2.engine.core.models import model_family

    sana = model_family(ModelConfig(pretrained_path=str(sana_folder)))
    sprint = model_family(ModelConfig(pretrained_path=str(sana_sprint_folder / "transformer")))
    assert (sana.name, sprint.name) == ("sana", "sana_sprint")
    assert (sana.sampler_kind, sprint.sampler_kind) == ("flow_euler", "scm")
    assert sana.vae_class == sprint.vae_class == "AutoencoderDC"
    assert not sana.fused_kernels and "linear attention" in sana.fused_kernels_note
    bare = shutil.copytree(sana_sprint_folder / "transformer", tmp_path / "transformer")
    assert model_family(ModelConfig(pretrained_path=str(bare))) is FAMILIES["sana"]
    chosen = ModelConfig(pretrained_path=str(bare), family="sana_sprint")
    assert model_family(chosen) is FAMILIES["sana_sprint"]
