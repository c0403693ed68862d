"""The App. C.2 discriminator and the eq. 8 adversarial terms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from e2ed2.engine.config.gan import GanConfig
from e2ed2.engine.objectives.gan import (
    Discriminator,
    build_discriminator,
    build_discriminator_optimizer,
    discriminator_loss,
    frozen,
    generator_adversarial_loss,
    train_discriminator,
    with_adversarial_term,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _disc(in_channels: int = 3, seed: int = 0, base_channels: int = 8) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(in_channels, base_channels=base_channels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "wgan"}, "gan.loss='wgan' is not one of ['bce', 'hinge']"),
        ({"weight": -0.01}, "gan.weight must be a finite number >= 0, got -0.01"),
        ({"disc_steps_per_gen_step": 0}, "gan.disc_steps_per_gen_step must be >= 1, got 0"),
        ({"base_channels": 0}, "gan.base_channels must be >= 1, got 0"),
        ({"lr": 0.0}, "gan.lr must be > 0, got 0.0"),
        ({"beta2": 1.0}, "gan.beta2 must be in [0, 1), got 1.0"),
        ({"weight_decay": -1.0}, "gan.weight_decay must be >= 0, got -1.0"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        GanConfig(**kwargs)
    assert message in str(info.value)


def test_config_defaults_are_the_papers() -> None:
    config = GanConfig()
    assert not config.enabled
    assert config.weight == 0.01 and config.disc_steps_per_gen_step == 5
    optimizer = build_discriminator_optimizer(config, _disc())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.5, 0.999) and optimizer.defaults["lr"] == 2e-4


def test_four_conv_layers_three_halving() -> None:
    disc = build_discriminator(GanConfig(base_channels=16), in_channels=3)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 1]
    assert sum(isinstance(m, nn.LeakyReLU) for m in disc.modules()) == 3
    # LeakyReLU sits between consecutive convs.
    kinds = [type(m) for m in disc.layers]
    assert kinds == [nn.Conv2d, nn.LeakyReLU] * 3 + [nn.Conv2d]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("size", "logits"), [(16, 2), (32, 4), (8, 1), (9, 1), (20, 2)])
def test_discriminator_shapes(channels: int, size: int, logits: int) -> None:
    out = _disc(channels)(_randn(2, channels, size, size))
    assert out.shape == (2, 1, logits, logits)


def test_discriminator_rejects_bad_inputs() -> None:
    disc = _disc(1)
    with pytest.raises(ValueError, match=r"at least 8x8 pixels, got 7x16"):
        disc(_randn(1, 1, 7, 16))
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\) images, got \(1, 3, 16, 16\)"):
        disc(_randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="in_channels must be 1 or 3, got 4"):
        Discriminator(4)


def test_losses_match_hand_computed_on_identity_logits() -> None:
    """With D = identity the logits are the inputs, so each loss has a closed form."""
    identity = nn.Identity()
    real, fake = _randn(2, 1, 3, 3, seed=1), _randn(2, 1, 3, 3, seed=2)
    sp = nn.functional.softplus
    torch.testing.assert_close(
        discriminator_loss(identity, real, fake, "bce"), sp(-real).mean() + sp(fake).mean()
    )
    torch.testing.assert_close(
        discriminator_loss(identity, real, fake, "hinge"),
        (1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean(),
    )
    torch.testing.assert_close(generator_adversarial_loss(identity, fake, "bce"), sp(-fake).mean())
    torch.testing.assert_close(generator_adversarial_loss(identity, fake, "hinge"), -fake.mean())


def _easy_split(batch: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Real: smooth bright images; fake: unstructured noise."""
    ramp = torch.linspace(0.2, 0.8, size)
    real = (ramp[None, :] * ramp[:, None]).expand(batch, 1, size, size).clone()
    real = real + 0.05 * _randn(batch, 1, size, size, seed=3)
    fake = _randn(batch, 1, size, size, seed=4).clamp(-1, 1)
    return real, fake


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_discriminator_loss_decreases(loss: str) -> None:
    config = GanConfig(disc_steps_per_gen_step=20, loss=loss, lr=1e-3, base_channels=8)
    disc = _disc(1)
    optimizer = build_discriminator_optimizer(config, disc)
    real, fake = _easy_split()
    fake.requires_grad_(True)
    losses = train_discriminator(disc, optimizer, real, fake, config)
    assert len(losses) == 20
    assert losses[-1].item() < 0.5 * losses[0].item()
    assert fake.grad is None  # the generated batch was detached
    # Afterwards the discriminator scores real above fake.
    with torch.no_grad():
        assert disc(real).mean() > disc(fake).mean()


def test_discriminator_loss_gives_no_gradient_to_generated_images() -> None:
    disc = _disc(3)
    real = _randn(2, 3, 16, 16, seed=1)
    fake = _randn(2, 3, 16, 16, seed=2).requires_grad_(True)
    discriminator_loss(disc, real, fake).backward()
    assert fake.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_generator_loss_leaves_discriminator_grads_untouched(loss: str) -> None:
    disc = _disc(3)
    latent = _randn(2, 3, 16, 16, seed=5).requires_grad_(True)
    fake = torch.tanh(latent * 2)  # stands in for the decoded generator output (has a graph)

    generator_adversarial_loss(disc, fake, loss).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    assert all(p.requires_grad for p in disc.parameters())

    # Existing gradients (from a discriminator step) stay exactly as they were.
    for p in disc.parameters():
        p.grad = torch.full_like(p, 0.5)
    fake = torch.tanh(latent * 2)
    generator_adversarial_loss(disc, fake, loss).backward()
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in disc.parameters())


def test_frozen_restores_flags_even_on_error() -> None:
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    module[1].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"), frozen(module):
        assert not any(p.requires_grad for p in module.parameters())
        raise RuntimeError("boom")
    flags = [p.requires_grad for p in module.parameters()]
    assert flags == [True, True, False, True]


def test_with_adversarial_term_is_eq8() -> None:
    terms = {"l2": torch.tensor(0.3), "total": torch.tensor(0.3)}
    out = with_adversarial_term(terms, torch.tensor(2.0), GanConfig(enabled=True, weight=0.01))
    assert set(out) == {"l2", "adversarial", "total"}
    torch.testing.assert_close(out["total"], torch.tensor(0.3 + 0.01 * 2.0))
    assert terms["total"].item() == pytest.approx(0.3)  # the input mapping is not changed
    with pytest.raises(ValueError, match="'total'"):
        with_adversarial_term({"l2": torch.tensor(0.3)}, torch.tensor(1.0), GanConfig())


def test_full_generator_step_with_shared_pixels() -> None:
    """Decode once: the same pixels feed the discriminator steps and the generator's term."""
    config = GanConfig(enabled=True, disc_steps_per_gen_step=5, base_channels=8)
    disc = _disc(1)
    optimizer = build_discriminator_optimizer(config, disc)
    generator = nn.Conv2d(1, 1, 3, padding=1)
    real, noise = _easy_split()
    fake = torch.tanh(generator(noise))
    assert len(train_discriminator(disc, optimizer, real, fake, config)) == 5
    disc_grads = [p.grad.clone() for p in disc.parameters()]
    terms = {"total": (fake - real).square().mean()}
    terms = with_adversarial_term(terms, generator_adversarial_loss(disc, fake), config)
    terms["total"].backward()
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    assert all(torch.equal(p.grad, g) for p, g in zip(disc.parameters(), disc_grads, strict=True))
