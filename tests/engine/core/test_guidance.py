"""Classifier-free guidance inside the differentiable unroll: the numerics of diffusers'
``PixArtAlphaPipeline`` (step by step and the final latent), one doubled network call per step,
and every checkpoint policy's gradients equal to plain autograd with guidance on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from e2ed2.engine import (
    SamplerConfig,
    Trajectory,
    TrajectoryConfig,
    TrajectoryPlan,
    build_schedule,
    run_steps,
)
from e2ed2.engine.config.trajectory import CHECKPOINT_POLICIES
from e2ed2.engine.core.network import (
    Conditioning,
    denoise,
    pixart_size_conditions,
    repeat_conditioning,
)

GUIDANCE = 4.5  # PixArt-α's default guidance_scale
BATCH = 2
TOKENS = 6


def _null(channels: int = 24, seed: int = 7) -> Conditioning:
    """An empty prompt's conditioning: one row, EOS then padding (as T5 encodes "")."""
    states = torch.randn(1, TOKENS, channels, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, TOKENS, dtype=torch.long)
    mask[:, 0] = 1
    return Conditioning(states, mask)


def _guided_ms_inputs(real_models):
    """A PixArt-MS-structured transformer (learned sigma, size conditions) and a batch of two
    padded prompts of 64 x 64 px images with their null conditioning."""
    model = real_models.tiny_pixart_real(128).float()
    g = torch.Generator().manual_seed(3)
    states = torch.randn(BATCH, TOKENS, real_models.T5_WIDTH, generator=g)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[-1, -2:] = 0
    sizes = pixart_size_conditions([64] * BATCH, [64] * BATCH)
    cond = Conditioning(states, mask, sizes, unconditional=_null(real_models.T5_WIDTH))
    start = torch.randn(BATCH, 4, 8, 8, generator=g)
    return model, cond, start


def _ddim(guidance_scale: float) -> SamplerConfig:
    return SamplerConfig(
        kind="ddim",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        guidance_scale=guidance_scale,
    )


def _pipeline(real_models, model, sampler: SamplerConfig):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=real_models.tiny_sd_vae(),
        transformer=model,
        scheduler=sampler.to_diffusers(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_call(pipe, cond: Conditioning, start: torch.Tensor, num_steps: int):
    null = cond.unconditional
    return pipe(
        prompt_embeds=cond.encoder_hidden_states,
        prompt_attention_mask=cond.encoder_attention_mask,
        negative_prompt=None,
        negative_prompt_embeds=null.encoder_hidden_states.expand(BATCH, -1, -1),
        negative_prompt_attention_mask=null.encoder_attention_mask.expand(BATCH, -1),
        guidance_scale=GUIDANCE,
        num_inference_steps=num_steps,
        latents=start.clone(),
        height=64,
        width=64,
        use_resolution_binning=False,
        output_type="latent",
    ).images


@torch.no_grad()
def test_guided_unroll_matches_pixart_pipeline(real_models) -> None:
    """The same start noise through e2ed2's unroll and through ``PixArtAlphaPipeline`` (DDIM,
    eta 0, guidance 4.5): the same guided noise prediction at every step and the same latent."""
    model, cond, start = _guided_ms_inputs(real_models)
    num_steps = 3
    sampler = _ddim(GUIDANCE)
    pipe = _pipeline(real_models, model, sampler)
    # What the pipeline hands its scheduler at each step: the guided noise_pred (after the
    # learned-sigma split) and the latent it was predicted for.
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    step = pipe.scheduler.step

    def recording_step(noise_pred, t, latents, **kwargs):
        seen.append((int(t), noise_pred.clone(), latents.clone()))
        return step(noise_pred, t, latents, **kwargs)

    pipe.scheduler.step = recording_step
    reference = _pipeline_call(pipe, cond, start, num_steps)

    schedule = build_schedule(sampler, num_steps)
    assert [t for t, _, _ in seen] == list(schedule.timesteps)
    for t, noise_pred, latents in seen:
        ours = denoise(model, latents, t, cond, guidance_scale=GUIDANCE)
        torch.testing.assert_close(ours, noise_pred, rtol=1e-5, atol=1e-6)
        # Guidance changes the prediction: the comparison would catch an unguided call.
        assert not torch.allclose(denoise(model, latents, t, cond), noise_pred, atol=1e-4)
    final = run_steps(model, schedule, cond, start, checkpoint_policy="none")
    torch.testing.assert_close(final, reference, rtol=1e-5, atol=1e-6)


def test_guidance_is_one_doubled_call_and_off_at_one(make_pixart, make_conditioning) -> None:
    model = make_pixart()
    cond = make_conditioning(BATCH, tokens=TOKENS).with_unconditional(_null(seed=2))
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    with torch.no_grad():
        guided = denoise(model, x, 500, cond, guidance_scale=GUIDANCE)
        assert batches == [2 * BATCH]
        # Written out: uncond + w * (cond - uncond) of the two halves.
        plain = dataclasses.replace(cond, unconditional=None)
        text = denoise(model, x, 500, plain)
        null_rows = Conditioning(
            cond.unconditional.encoder_hidden_states.expand(BATCH, -1, -1),
            cond.unconditional.encoder_attention_mask.expand(BATCH, -1),
        )
        uncond = denoise(model, x, 500, null_rows)
        torch.testing.assert_close(guided, uncond + GUIDANCE * (text - uncond))
        # Scale 1.0 is today's call: one conditional batch, bit-identical, null ignored.
        batches.clear()
        assert torch.equal(denoise(model, x, 500, cond, guidance_scale=1.0), text)
        assert batches == [BATCH]
    with pytest.raises(ValueError, match="needs the unconditional"):
        denoise(model, x, 500, plain, guidance_scale=GUIDANCE)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        denoise(model, x, 500, cond, guidance_scale=0.5)


def test_unconditional_follows_the_conditioning() -> None:
    cond = Conditioning(torch.randn(2, TOKENS, 24), unconditional=_null())
    moved = cond.to("cpu", torch.bfloat16)
    assert moved.unconditional.encoder_hidden_states.dtype == torch.bfloat16
    # One null row serves any batch: selecting and repeating prompts keep it as it is.
    assert moved.select(slice(0, 1)).unconditional is moved.unconditional
    assert repeat_conditioning(moved, 3).unconditional is moved.unconditional
    with pytest.raises(ValueError, match=r"unconditional states must be \(1 or 2, 6, 24\)"):
        Conditioning(torch.randn(2, TOKENS, 24), unconditional=Conditioning(torch.randn(1, 5, 24)))


def _grads(model, policy: str, plan: TrajectoryPlan, cond, clean):
    config = TrajectoryConfig(num_steps=3, checkpoint=policy, start="noised_latent")
    trajectory = Trajectory(config, build_schedule(SamplerConfig(guidance_scale=GUIDANCE), 3))
    model.zero_grad(set_to_none=True)
    sample, _ = trajectory(
        model, cond, clean=clean, plan=plan, generator=torch.Generator().manual_seed(0)
    )
    loss = (sample - clean).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", [p for p in CHECKPOINT_POLICIES if p != "none"])
def test_policies_match_plain_autograd_with_guidance(real_models, policy: str) -> None:
    """LCM (noise injected between steps) with guidance 4.5 on a PixArt-MS structure: both
    halves of each doubled batch are recomputed in backward to the same gradients."""
    model, cond, _ = _guided_ms_inputs(real_models)
    clean = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    plan = TrajectoryPlan(num_steps=3, start_index=0, grad_start_index=0)
    ref_loss, ref = _grads(model, "none", plan, cond, clean)
    loss, got = _grads(model, policy, plan, cond, clean)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert all(r.abs().sum() > 0 for r in ref), "a zero gradient: the test would be vacuous"
    worst = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref, strict=True))
    assert worst <= 1e-5, f"{policy}: max relative gradient error {worst:.3e} > 1e-5"


def test_config_guidance_scale() -> None:
    assert SamplerConfig().guidance_scale == 1.0
    assert SamplerConfig(kind="lcm", guidance_scale=4.5).guidance_scale == 4.5  # as diffusers
    for bad in (0.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="sampler.guidance_scale"):
            SamplerConfig(guidance_scale=bad)
    # Not a scheduler argument: the exported scheduler stays a stock diffusers config.
    assert "guidance_scale" not in SamplerConfig(guidance_scale=2.0).diffusers_kwargs()


def test_memory_estimate_sees_the_doubled_batch() -> None:
    """Guided batch 1 costs what unguided batch 2 costs (within the text rows: < 1%), measured
    under fake tensors as in a real run."""
    from e2ed2.engine.core.estimate import DenoiserShape, step_peak_bytes

    toy = DenoiserShape(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        caption_channels=32,
        text_tokens=8,
    )
    kwargs = dict(resolution_px=128, policy="step", num_steps=2, dtype=torch.float32)
    guided = step_peak_bytes(toy, guidance_scale=GUIDANCE, **kwargs)
    assert guided == step_peak_bytes(toy, guidance_scale=GUIDANCE, fake=False, **kwargs)
    unguided_batch_2 = step_peak_bytes(toy, batch=2, **kwargs)
    assert abs(guided - unguided_batch_2) < 0.01 * unguided_batch_2
    assert guided > 1.5 * step_peak_bytes(toy, **kwargs)
