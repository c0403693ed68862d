"""Pixel terms in passes of rows (objective.pixel_rows_per_pass): the denoiser's gradients equal
one batch's plain autograd for LPIPS, the GAN generator term, the CLIP reward and pixel-space
energy, with and without the unroll's step cuts and row passes; the discriminator's updates in
passes equal one batch's; the pixel terms' activation peak stays flat in the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from e2ed2.engine import (
    LiveTensorTracker,
    SamplerConfig,
    Trajectory,
    TrajectoryConfig,
    build_schedule,
)
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.core.models import FrozenVAE
from e2ed2.engine.core.step_cuts import CutUnroll
from e2ed2.engine.objectives.gan import (
    Discriminator,
    discriminator_loss,
    discriminator_pieces,
    generator_adversarial_loss,
)
from e2ed2.engine.objectives.losses import E2ED2Loss

NUM_STEPS = 2
ROWS = 4  # 2 prompts x m = 2 for the energy score, else 4 prompts
GAN_WEIGHT = 0.5
CAPTIONS = ["a red cube", "a blue sphere", "two cats", "a tree at dusk"]

TERMS = {
    # AlexNet's trunk: the same LPIPS code as VGG's at a fraction of the CPU time.
    "lpips": dict(lpips_weight=1.0, lpips_random_backbone=True, lpips_net="alex"),
    "gan": {},
    "clip": dict(reward_weight=1.0, reward_kind="clip"),
    "pixel_energy": dict(energy_weight=1.0, energy_space="pixels"),
}
UNROLLS = {
    "one_backward": None,
    "per_step": dict(per_step=True),
    "rows_per_pass": dict(per_step=False, rows_per_pass=3),
    "per_step+rows_per_pass": dict(per_step=True, rows_per_pass=3),
}


@pytest.fixture(scope="module")
def vae(real_models) -> FrozenVAE:
    return FrozenVAE(real_models.tiny_sd_vae(seed=1))


def _loss(term: str, clip_folder, vae: FrozenVAE, rows_per_pass: int) -> E2ED2Loss:
    fields = dict(TERMS[term])
    if term == "clip":
        fields["reward_path"] = str(clip_folder)
    config = ObjectiveConfig(l2_weight=1.0, pixel_rows_per_pass=rows_per_pass, **fields)
    return E2ED2Loss(config, vae.decode, decoder=vae.vae)


def _grads(model, make_conditioning, loss_fn: E2ED2Loss, term: str, unroll_fields, disc):
    """Denoiser gradients of one micro-batch: the unroll (cut as ``unroll_fields`` says, or
    not), then the loss: one batch (pixel_rows_per_pass = 0) or in passes."""
    m = 2 if term == "pixel_energy" else 1
    cond = make_conditioning(ROWS)
    clean = torch.randn(ROWS, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=NUM_STEPS, checkpoint="step"),
        build_schedule(SamplerConfig(), NUM_STEPS),
    )
    plan = trajectory.plan()
    start, noises = trajectory.draw_noise(
        plan, clean.shape, clean=clean, generator=torch.Generator().manual_seed(2)
    )
    model.zero_grad(set_to_none=True)
    unroll = None if unroll_fields is None else CutUnroll(**unroll_fields)
    if unroll is None:
        sample = trajectory.run(model, cond, start, noises, plan)
    else:
        sample = unroll.run(trajectory, model, cond, start, noises, plan)
    extra = dict(samples_per_prompt=m, captions=CAPTIONS if term == "clip" else None)

    def adversarial(pixels: torch.Tensor) -> torch.Tensor:
        return generator_adversarial_loss(disc, pixels)

    if loss_fn.config.pixel_rows_per_pass == 0:
        loss = loss_fn(sample, clean, **extra)["total"]
        if term == "gan":
            loss = loss + GAN_WEIGHT * adversarial(loss_fn.decode_sample(sample))
    else:
        passed = loss_fn.terms_in_passes(
            sample,
            clean,
            adversarial=adversarial if term == "gan" else None,
            adversarial_weight=GAN_WEIGHT,
            **extra,
        )
        loss = passed.loss
        assert set(passed.terms) >= {"l2", "total"}
    for piece in [loss] if unroll is None else unroll.pieces(loss):
        piece.backward()
    assert all(p.grad is None for p in disc.parameters()), "the generator term updated D"
    return [p.grad.clone() for p in model.parameters()]


# Every term with the unroll in one backward and with both of its cuts at once; LPIPS (the
# paper's preset) with each cut alone too.
CASES = [
    (term, unroll)
    for term in TERMS
    for unroll in UNROLLS
    if unroll in ("one_backward", "per_step+rows_per_pass") or term == "lpips"
]


@pytest.mark.parametrize("term, unroll", CASES, ids=[f"{t}-{u}" for t, u in CASES])
def test_passes_give_one_batchs_gradients(
    make_pixart, make_conditioning, clip_folder, vae, term: str, unroll: str
) -> None:
    model = make_pixart()
    disc = Discriminator(3, base_channels=8)
    ref = _grads(model, make_conditioning, _loss(term, clip_folder, vae, 0), term, None, disc)
    # Passes of one row (energy: rounded up to a prompt's two samples).
    passes = _loss(term, clip_folder, vae, 1)
    got = _grads(model, make_conditioning, passes, term, UNROLLS[unroll], disc)
    scale = max(r.abs().max() for r in ref)
    assert scale > 0
    # Relative to the largest gradient element (as tests/engine/core/test_step_cuts.py: the
    # attention key biases' exact gradients are zero, their rounding noise is not).
    worst = max(((g - r).abs().max() / scale).item() for g, r in zip(got, ref, strict=True))
    assert worst <= 1e-5, f"{term}, {unroll}: max relative gradient error {worst:.3e}"


def test_pixel_term_changes_the_gradient(make_pixart, make_conditioning, clip_folder, vae) -> None:
    """The equality above is not L2's alone: LPIPS in passes moves the gradient."""
    model = make_pixart()
    disc = Discriminator(3, base_channels=8)
    l2_only = E2ED2Loss(ObjectiveConfig(l2_weight=1.0), vae.decode)
    base = _grads(model, make_conditioning, l2_only, "lpips", None, disc)
    lpips = _grads(
        model, make_conditioning, _loss("lpips", clip_folder, vae, 1), "lpips", None, disc
    )
    assert max((a - b).abs().max().item() for a, b in zip(base, lpips, strict=True)) > 1e-4


def test_discriminator_pieces_sum_to_one_batch() -> None:
    """The discriminator's loss in passes of 3 rows (8 rows: 3 + 3 + 2) backpropagated piece by
    piece accumulates one batch's gradient."""
    torch.manual_seed(0)
    disc = Discriminator(3, base_channels=8)
    real, fake = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    for loss in ("bce", "hinge"):
        disc.zero_grad(set_to_none=True)
        whole = discriminator_loss(disc, real, fake, loss)
        whole.backward()
        ref = [p.grad.clone() for p in disc.parameters()]
        disc.zero_grad(set_to_none=True)
        total = 0.0
        pieces = list(discriminator_pieces(disc, real, fake, loss, rows_per_pass=3))
        assert len(pieces) == 3
        for piece in pieces:
            piece.backward()
            total += piece.item()
        assert abs(total - whole.item()) <= 1e-6 * abs(whole.item())
        for g, r in zip((p.grad for p in disc.parameters()), ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def _pixel_peak(loss_fn: E2ED2Loss, batch: int, disc: Discriminator, side: int) -> int:
    """Activation peak of the pixel terms (decode + LPIPS + GAN generator term, forward and
    backward to the final latent) for ``batch`` rows of ``side`` x ``side`` latents, under
    ``FakeTensorMode`` (real modules' weights enter as fake tensors: nothing is computed)."""
    with FakeTensorMode(allow_non_fake_inputs=True), LiveTensorTracker(track_cuda=False) as tracker:
        sample = torch.randn(batch, 4, side, side, requires_grad=True)
        target = torch.randn(batch, 4, side, side)
        passed = loss_fn.terms_in_passes(
            sample,
            target,
            adversarial=lambda px: generator_adversarial_loss(disc, px),
            adversarial_weight=GAN_WEIGHT,
        )
        passed.loss.backward()
        assert sample.grad is not None
    return tracker.report().peak_bytes


def test_pixel_terms_peak_is_flat_in_the_batch(real_models) -> None:
    """A real-width SD-structured VAE (block_out_channels 128/256/512/512, 2 layers per block,
    as PixArt's and SD's) at 256 px, VGG16 LPIPS and the discriminator, passes of one row with
    the decoder checkpointed per block: batch 8's peak within 1.2x of batch 1's, while the 8
    rows in one pass hold several times batch 1's."""
    with FakeTensorMode():
        vae = FrozenVAE(
            real_models.tiny_sd_vae(
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32
            )
        )
    disc = Discriminator(3)
    config = ObjectiveConfig(
        l2_weight=0.0, lpips_weight=1.0, lpips_random_backbone=True, pixel_rows_per_pass=1
    )
    passes = E2ED2Loss(config, vae.decode, decoder=vae.vae)
    one, eight = (_pixel_peak(passes, batch, disc, 32) for batch in (1, 8))
    whole = E2ED2Loss(
        dataclasses.replace(config, pixel_rows_per_pass=0), vae.decode, decoder=vae.vae
    )
    eight_at_once = _pixel_peak(whole, 8, disc, 32)
    print(
        f"pixel terms' peak at 256 px: batch 1 {one / 2**20:.1f} MiB, batch 8 in passes "
        f"{eight / 2**20:.1f} MiB, batch 8 in one pass {eight_at_once / 2**20:.1f} MiB"
    )
    assert eight <= 1.2 * one, (one, eight)
    assert eight_at_once >= 4 * one, (one, eight_at_once)


# --- through the trainer ------------------------------------------------------------------------

_TINY_RUN = [
    "model.num_layers=2",
    "model.num_attention_heads=2",
    "model.attention_head_dim=8",
    "data.resolution=8",
    "data.text_dim=16",
    "data.caption_max_tokens=8",
    "trajectory.num_steps=2",
    "trajectory.checkpoint=block_offload",
    "trajectory.samples_per_prompt=2",
    "run.batch_per_rank=2",
    "run.grad_accum_steps=2",
    "run.num_sample_images=0",
    "run.export_at_end=false",
    "run.checkpoint_every_steps=100",
    "optim.lr=1e-3",
    # Pixel space (the digits): the GAN term and the energy score on pixels, m = 2.
    "objective.energy_weight=1.0",
    "objective.energy_space=pixels",
    "gan.enabled=true",
    "gan.base_channels=8",
    "gan.disc_steps_per_gen_step=2",
]


def _trainer_gradients(out, ds_config: str, *extra: str):
    """The generator's gathered gradient at each optimizer step and the discriminator's at
    each of its updates, over two optimizer steps of two micro-batches."""
    from deepspeed.utils import safe_get_full_grad

    from e2ed2.engine.config import load_config
    from e2ed2.engine.train.trainer import Trainer

    overrides = [*_TINY_RUN, f"run.deepspeed_config={ds_config}", f"run.output_dir={out}"]
    trainer = Trainer(load_config("scratch", [*overrides, *extra]))
    engine, disc = trainer.engine, trainer.disc_engine
    generator: list[dict[str, torch.Tensor]] = []
    discriminator: list[dict[str, torch.Tensor]] = []
    guard_step, disc_step = trainer.guard.step, trainer.disc_guard.step

    def read_generator() -> bool:
        if engine.is_gradient_accumulation_boundary():
            named = engine.module.named_parameters()
            generator.append({n: safe_get_full_grad(p).float().clone() for n, p in named})
        return guard_step()

    def read_discriminator() -> bool:
        named = disc.module.named_parameters()
        discriminator.append({n: p.grad.float().clone() for n, p in named})
        return disc_step()

    trainer.guard.step, trainer.disc_guard.step = read_generator, read_discriminator
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.train_step(batches)
    assert len(generator) == 2 and len(discriminator) == 2 * 2 * 2
    return generator, discriminator


def _worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    scale = max(g.abs().max() for g in ref.values())
    assert scale > 0
    return max(((got[n] - g).abs().max() / scale).item() for n, g in ref.items())


def test_trainer_pixel_passes_apply_one_batchs_gradients(
    world_of_one: None, tmp_path, zero3_partition_everything: str
) -> None:
    """ZeRO-3, fp32, the unroll cut both ways (rows in passes of 1, a backward per step): with
    objective.pixel_rows_per_pass = 1 (energy: a prompt's 2 samples per pass; the
    discriminator's updates in passes of 1 row, one micro-step each) the generator's and the
    discriminator's optimizers apply one batch's gradients at every step."""
    cut = ["trajectory.rows_per_pass=1", "trajectory.per_step_backward=true"]
    ds = zero3_partition_everything
    ref_g, ref_d = _trainer_gradients(tmp_path / "whole", ds)
    got_g, got_d = _trainer_gradients(
        tmp_path / "passes", ds, "objective.pixel_rows_per_pass=1", *cut
    )
    for got, ref in zip(got_g + got_d, ref_g + ref_d, strict=True):
        worst = _worst(got, ref)
        assert worst <= 1e-5, f"relative gradient error {worst:.2e}"
