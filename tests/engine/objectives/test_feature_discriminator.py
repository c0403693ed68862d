"""gan.discriminator = "denoiser_features" (heads on the frozen base denoiser, LADD-style) and the
data-side terms' weight schedules (config/schedule.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from e2ed2.engine.config import ConfigError, load_config
from e2ed2.engine.config.gan import GanConfig
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.config.sampler import SamplerConfig
from e2ed2.engine.config.schedule import WeightSchedule
from e2ed2.engine.core.network import Conditioning
from e2ed2.engine.objectives.feature_discriminator import FeatureDiscriminator
from e2ed2.engine.objectives.gan import (
    build_discriminator,
    build_discriminator_optimizer,
    discriminator_loss,
    generator_adversarial_loss,
)
from e2ed2.engine.objectives.losses import E2ED2Loss

ROOT = Path(__file__).resolve().parents[3]
TEXT_DIM = 64  # the digits base's caption_channels


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    """The shipped digits base (a 4-block PixArtTransformer2DModel on 1 x 16 x 16 pixels)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(ROOT / "configs" / "digits_base").eval()


def _cond(rows: int, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, 6, dtype=torch.long)
    mask[0, 4:] = 0  # one prompt with padding: the pooled text reads its real tokens only
    return Conditioning(torch.randn(rows, 6, TEXT_DIM, generator=g), mask)


def _disc(base: torch.nn.Module, **kwargs: object) -> FeatureDiscriminator:
    torch.manual_seed(0)
    config = GanConfig(enabled=True, discriminator="denoiser_features", head_channels=16, **kwargs)
    sampler = SamplerConfig(kind="ddim", prediction_type="v_prediction")
    disc = build_discriminator(config, 1, base=base, text_dim=TEXT_DIM, sampler=sampler, seed=3)
    assert isinstance(disc, FeatureDiscriminator)
    return disc


def _images(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).tanh()


# --- weight schedules -------------------------------------------------------------------------


def test_weight_schedules_value_at_step() -> None:
    ramp = WeightSchedule("linear_warmup", start_step=10, warmup_steps=4, key="gan.weight")
    assert [ramp.factor(s) for s in (0, 9, 10, 11, 12, 13, 14, 300)] == [
        0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0,
    ]  # fmt: skip
    jump = WeightSchedule("linear_warmup", start_step=5)
    assert [jump.factor(s) for s in (4, 5)] == [0.0, 1.0]
    assert all(WeightSchedule().factor(s) == 1.0 for s in (0, 7))
    gan = GanConfig(weight=0.01, weight_schedule="linear_warmup", weight_start_step=2,
                    weight_warmup_steps=2)  # fmt: skip
    assert [gan.weight_at(s) for s in range(5)] == [0.0, 0.0, 0.005, 0.01, 0.01]
    # The energy score's weight in E2ED2Loss.step_weights at the trainer's step.
    objective = ObjectiveConfig(
        l2_weight=1.0,
        energy_weight=0.5,
        energy_weight_schedule="linear_warmup",
        energy_weight_warmup_steps=2,
    )
    loss = E2ED2Loss(objective)
    seen = []
    for step in range(3):
        loss.set_step(step)
        seen.append(loss.step_weights())
    assert seen == [{"l2": 1.0, "energy": 0.25}, {"l2": 1.0, "energy": 0.5}] + [
        {"l2": 1.0, "energy": 0.5}
    ]
    samples, target = torch.randn(4, 1, 4, 4), torch.randn(2, 1, 4, 4).repeat_interleave(2, 0)
    loss.set_step(0)
    terms = loss(samples, target, samples_per_prompt=2)
    assert torch.allclose(terms["total"], terms["l2"] + 0.25 * terms["energy"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GanConfig(discriminator="resnet"), "gan.discriminator='resnet' is not one of"),
        (lambda: GanConfig(weight_schedule="cosine"), "gan.weight_schedule='cosine' is not one"),
        (lambda: GanConfig(weight_warmup_steps=5), "gan.weight_schedule='constant' needs them 0"),
        (
            lambda: GanConfig(weight_schedule="linear_warmup", weight_start_step=-1),
            "gan.weight_start_step must be an integer >= 0, got -1",
        ),  # fmt: skip
        (lambda: GanConfig(feature_blocks=()), "gan.feature_blocks must be a non-empty list"),
        (lambda: GanConfig(feature_t_min=600), "gan.feature_t_max must be an integer >= 600"),
        (lambda: GanConfig(head_channels=0), "gan.head_channels must be an integer >= 1"),
        (lambda: GanConfig(feature_head="mlp"), "gan.feature_head='mlp' is not one of"),
        (
            lambda: ObjectiveConfig(energy_weight_warmup_steps=3),
            "objective.energy_weight_schedule='constant' needs them 0",
        ),  # fmt: skip
    ],
)
def test_config_errors_name_the_key(make, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.pixel_rows_per_pass=2"], "set objective.pixel_rows_per_pass=0, got 2"),
        (["gan.feature_t_max=1000"], "gan.feature_t_max=1000 must be below"),
    ],
)
def test_train_config_refuses_what_the_heads_cannot_read(overrides, message: str) -> None:
    gan = ["gan.enabled=true", "gan.discriminator=denoiser_features"]
    with pytest.raises(ConfigError, match=message):
        load_config("embedded", [*gan, *overrides])


def test_block_index_beyond_the_denoiser_names_the_key(base) -> None:
    with pytest.raises(ValueError, match=r"gan.feature_blocks=\[1, 4\]: the denoiser has 4"):
        _disc(base, feature_blocks=(1, 4))


# --- the discriminator ------------------------------------------------------------------------


def test_generator_term_gradient_equals_plain_autograd(base) -> None:
    """The generator term's gradient on the generated samples equals plain autograd through the
    heads and the base; neither the heads nor the base receive a gradient from it."""
    disc = _disc(base)
    cond = _cond(3)
    fake = _images(3, seed=1).requires_grad_(True)
    for loss in ("bce", "hinge"):
        disc.draws.fill_(5)  # the same draw of t and noise for both computations
        got_value = generator_adversarial_loss(disc, fake, loss, cond=cond)
        (got,) = torch.autograd.grad(got_value, fake)
        disc.draws.fill_(5)
        logits = disc(fake, cond).float()
        plain = F.softplus(-logits).mean() if loss == "bce" else -logits.mean()
        (ref,) = torch.autograd.grad(plain, fake)
        assert torch.equal(got_value, plain)
        assert got.abs().max() > 0 and torch.allclose(got, ref, rtol=1e-6, atol=1e-9)
    generator_adversarial_loss(disc, fake, "bce", cond=cond).backward()
    assert fake.grad is not None
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is None for p in base.parameters())
    # The counter moved once per call: the next call draws other t and noise.
    assert int(disc.draws) == 7
    first, second = disc(fake.detach(), cond), disc(fake.detach(), cond)
    assert not torch.equal(first, second)


def test_only_the_heads_train_and_are_checkpointed(base) -> None:
    disc = _disc(base)
    heads = {n for n, _ in disc.named_parameters()}
    assert heads and all(n.split(".")[0] in ("heads", "time_embed", "text_embed") for n in heads)
    assert set(disc.state_dict()) == heads | {"draws"}
    optimizer = build_discriminator_optimizer(GanConfig(), disc)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(trained) == len(heads)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    real, fake = _images(4, seed=2), _images(4, seed=3).requires_grad_(True)
    value = discriminator_loss(disc, real, fake, "bce", cond=_cond(4))
    value.backward()
    optimizer.step()
    assert fake.grad is None  # the generated samples arrive detached
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in disc.parameters())
    assert all(p.grad is None for p in base.parameters())
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert {id(p) for p in optimizer.state} == {id(p) for p in disc.parameters()}


def test_trainer_checkpoints_and_resumes_the_heads(tmp_path: Path, world_of_one: None) -> None:
    """Through the trainer (no teacher: its own frozen copy of the base): one step, a checkpoint,
    and a resumed trainer holds the same heads and noise counter."""
    from e2ed2.engine.train.trainer import Trainer

    overrides = [
        "model.num_layers=2",
        "model.num_attention_heads=2",
        "model.attention_head_dim=8",
        "data.resolution=8",
        "data.text_dim=16",
        "data.caption_max_tokens=8",
        "trajectory.num_steps=2",
        "run.batch_per_rank=2",
        "run.num_sample_images=0",
        "run.export_at_end=false",
        "run.checkpoint_every_steps=1000",
        "gan.enabled=true",
        "gan.discriminator=denoiser_features",
        "gan.feature_blocks=[0, 1]",
        "gan.head_channels=8",
        "gan.disc_steps_per_gen_step=2",
        f"run.output_dir={tmp_path}",
    ]
    trainer = Trainer(load_config(None, [*overrides, "run.max_steps=1"]))
    disc = trainer.disc_engine.module
    assert isinstance(disc, FeatureDiscriminator) and disc.base is not trainer.engine.module
    initial = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer.train_step(iter(trainer.loader))
    assert trainer.step == 1
    trainer.save_checkpoint()
    trained = {k: v.clone() for k, v in disc.state_dict().items()}
    # 2 discriminator updates x (real + generated) + the generator term: 5 draws.
    assert int(trained["draws"]) == 5
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if k != "draws")
    resumed = Trainer(load_config(None, [*overrides, "run.max_steps=2"]))
    assert resumed.step == 1
    state = resumed.disc_engine.module.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in trained)


def test_conv_head_logits_are_the_cells_of_its_last_map(base) -> None:
    """The 8x8 token grid halves twice: 2x2 cells per block; the token head: one per token."""
    cond, images = _cond(2), _images(2, seed=4)
    assert _disc(base)(images, cond).shape == (2, 2 * 4)
    assert _disc(base, feature_head="token")(images, cond).shape == (2, 2 * 64)


def test_conv_head_separates_real_digits_from_blurred_copies(base) -> None:
    """At t = 0 the conv heads learn to tell 8 real digits from their 3x3-blurred copies on one
    batch (BCE 2 ln 2 = 1.39 at chance; 1.44 at the first update, 0.055 after 20 at AdamW 2e-3)."""
    from sklearn.datasets import load_digits  # lazy: only this test reads the digits

    # The digits as data/digits.py scales them (0..16 -> [-1, 1], bilinear to 16 x 16); random
    # prompts (the text states only enter the projection term).
    pixels = torch.as_tensor(load_digits().images[:8], dtype=torch.float32)[:, None]
    real = F.interpolate(pixels / 8 - 1, size=16, mode="bilinear", align_corners=False)
    cond = _cond(8)
    blurred = F.avg_pool2d(real, 3, stride=1, padding=1)
    disc = _disc(base, feature_t_max=0, lr=2e-3)
    optimizer = torch.optim.AdamW(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = discriminator_loss(disc, real, blurred, "bce", cond=cond)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.0 and losses[-1] < 0.3, losses
