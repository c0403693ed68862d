"""The network seam for SD3 (flow matching MMDiT): pooled projections in Conditioning, float
timesteps, build_denoiser by the folder's _class_name, the VAE's shift factor, and the whole
K-step unroll against StableDiffusion3Pipeline on a folder with SD3-medium's structure."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from e2ed2.engine import Conditioning, SamplerConfig, build_schedule
from e2ed2.engine.config import ModelConfig
from e2ed2.engine.core.models import FrozenVAE, build_denoiser
from e2ed2.engine.core.network import denoise, repeat_conditioning
from e2ed2.engine.core.trajectory import run_steps

FLOW = SamplerConfig(kind="flow_euler", prediction_type="flow_prediction", shift=3.0)


def _cond(real_models, batch: int = 2, length: int = 5, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        torch.randn(batch, length, real_models.SD3_T5_WIDTH, generator=g),
        pooled_projections=torch.randn(batch, real_models.SD3_POOLED_WIDTH, generator=g),
    )


@pytest.mark.parametrize("sd35", [{}, dict(dual_attention_layers=(0,), qk_norm="rms_norm")])
def test_denoise_calls_sd3_as_the_pipeline_does(real_models, sd35: dict) -> None:
    model = real_models.tiny_sd3_transformer(**sd35)
    cond = _cond(real_models)
    x = torch.randn(2, 16, 8, 8)
    t = 857.6923217773438  # a float32 flow timestep (shift 3, K = 4, step 1)
    with torch.no_grad():
        got = denoise(model, x, t, cond)
        expected = model(
            hidden_states=x,
            timestep=torch.tensor(t).expand(2),
            encoder_hidden_states=cond.encoder_hidden_states,
            pooled_projections=cond.pooled_projections,
            return_dict=False,
        )[0]
        # The timestep is not rounded to an integer on the way.
        rounded = denoise(model, x, torch.tensor([858.0, 858.0]), cond)
    assert torch.equal(got, expected)
    assert not torch.equal(got, rounded)


def test_pooled_projections_are_required_and_travel_with_the_batch(real_models) -> None:
    model = real_models.tiny_sd3_transformer()
    cond = _cond(real_models)
    x = torch.randn(2, 16, 8, 8)
    with pytest.raises(ValueError, match="needs pooled_projections"):
        denoise(model, x, 500.0, dataclasses.replace(cond, pooled_projections=None))
    pixart = real_models.tiny_pixart_real(64)
    text = Conditioning(
        torch.randn(2, 5, real_models.T5_WIDTH), pooled_projections=torch.ones(2, 3)
    )
    with pytest.raises(ValueError, match="takes no pooled_projections"):
        denoise(pixart, torch.randn(2, 4, 8, 8), 500, text)
    with pytest.raises(ValueError, match="pooled_projections must be"):
        Conditioning(cond.encoder_hidden_states, pooled_projections=torch.ones(3, 24))

    moved = cond.to("cpu", torch.bfloat16)
    assert moved.pooled_projections.dtype == torch.bfloat16
    assert torch.equal(cond.select(slice(1, 2)).pooled_projections, cond.pooled_projections[1:])
    repeated = repeat_conditioning(cond, 3).pooled_projections
    assert torch.equal(repeated, cond.pooled_projections.repeat_interleave(3, dim=0))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_unroll_equals_stable_diffusion_3_pipeline(
    sd3_folder, guidance_scale: float, tmp_path
) -> None:
    """build_denoiser loads the folder's SD3 transformer by _class_name; the differentiable
    K-step unroll (flow Euler, guided with a doubled batch when w > 1) ends at the pipeline's
    final latent from the same start, prompt embeddings and pooled projections."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    sampler = SamplerConfig.from_diffusers_config(sd3_folder / "scheduler")
    sampler = dataclasses.replace(sampler, guidance_scale=guidance_scale)
    assert sampler.kind == "flow_euler" and sampler.shift == 3.0
    model = build_denoiser(
        ModelConfig(pretrained_path=str(sd3_folder)),
        latent_channels=16,
        latent_size=8,
        text_dim=pipe.transformer.config.joint_attention_dim,
        pooled_dim=pipe.transformer.config.pooled_projection_dim,
    )
    assert type(model).__name__ == "SD3Transformer2DModel"
    prompts = ["a photo of a cat sitting on a red sofa", "a small boat on a calm blue lake"]
    with torch.no_grad():
        states, null_states, pooled, null_pooled = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=True, max_sequence_length=8
        )
    start = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    num_steps = 3
    expected = pipe(
        prompt_embeds=states,
        negative_prompt_embeds=null_states,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=null_pooled,
        latents=start,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        output_type="latent",
    ).images

    null = Conditioning(null_states[:1], pooled_projections=null_pooled[:1])
    cond = Conditioning(states, pooled_projections=pooled, unconditional=null)
    sample = run_steps(
        model, build_schedule(sampler, num_steps), cond, start, checkpoint_policy="step"
    )
    torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-5)
    sample.square().mean().backward()
    assert model.transformer_blocks[0].attn.to_q.weight.grad.abs().sum() > 0


def test_build_denoiser_checks_the_data_against_the_sd3_folder(sd3_folder) -> None:
    config = ModelConfig(pretrained_path=str(sd3_folder))
    shapes = dict(latent_channels=16, latent_size=8, text_dim=32)
    with pytest.raises(ValueError, match="no pooled projections"):
        build_denoiser(config, **shapes, load_weights=False)
    with pytest.raises(ValueError, match="pooled_projection_dim=24"):
        build_denoiser(config, **shapes, pooled_dim=2048, load_weights=False)
    with pytest.raises(ValueError, match="fused_kernels"):
        build_denoiser(dataclasses.replace(config, fused_kernels=True), **shapes, pooled_dim=24)


def test_frozen_vae_decodes_with_the_shift_factor(real_models) -> None:
    """SD3's latents are (z - 0.0609) * 1.5305: the decode must add the shift back, exactly as
    the pipeline's ``latents / scaling_factor + shift_factor``."""
    vae = real_models.tiny_sd3_vae()
    frozen = FrozenVAE(vae)
    assert (frozen.scaling_factor, frozen.shift_factor) == (1.5305, 0.0609)
    latents = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        expected = vae.decode(latents / 1.5305 + 0.0609).sample
        unshifted = vae.decode(latents / 1.5305).sample
        got = frozen.decode(latents)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, unshifted)


def test_flow_diffusion_loss_feeds_the_float_training_timestep(real_models, monkeypatch) -> None:
    """objective.kind='diffusion' on SD3: the network sees sigma * 1000 of the drawn training
    sigma (a float) and the loss is the MSE of its velocity against noise - x0."""
    from e2ed2.engine.objectives import losses

    model = real_models.tiny_sd3_transformer()
    cond = _cond(real_models)
    clean = torch.randn(2, 16, 8, 8)
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["timestep"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    g = torch.Generator().manual_seed(0)
    loss = losses.diffusion_loss(model, clean, cond, FLOW, generator=g)
    loss.backward()
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(clean.shape, generator=g)
    grid = FLOW.to_diffusers().timesteps
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], grid[indices])
    noisy, target = losses.diffusion_input_and_target(FLOW, clean, noise, indices)
    with torch.no_grad():
        velocity = forward(
            hidden_states=noisy,
            timestep=grid[indices],
            encoder_hidden_states=cond.encoder_hidden_states,
            pooled_projections=cond.pooled_projections,
            return_dict=False,
        )[0]
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(velocity, target))
    assert model.proj_out.weight.grad is not None
