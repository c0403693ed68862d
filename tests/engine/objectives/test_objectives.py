"""E2ED2 reconstruction terms (eq. 7), LPIPS through a decoder, and the standard diffusion loss."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from diffusers import AutoencoderKL, DDPMScheduler

from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.config.sampler import SamplerConfig
from e2ed2.engine.core.network import Conditioning, denoise
from e2ed2.engine.objectives.losses import E2ED2Loss, diffusion_input_and_target, diffusion_loss

RANDOM_LPIPS = {"lpips_weight": 1.0, "lpips_net": "squeeze", "lpips_random_backbone": True}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _tiny_vae(seed: int = 0) -> AutoencoderKL:
    """4x16x16 latents -> 3x32x32 pixels, frozen."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    return vae.requires_grad_(False).eval()


class _CountingDecode:
    def __init__(self, vae: AutoencoderKL) -> None:
        self.vae = vae
        self.calls = 0

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.vae.decode(latents).sample


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "x"}, "objective.kind='x' is not one of ['e2ed2', 'diffusion']"),
        ({"lpips_net": "resnet"}, "objective.lpips_net='resnet' is not one of"),
        ({"l1_weight": -0.5}, "objective.l1_weight must be a finite number >= 0, got -0.5"),
        ({"l2_weight": float("nan")}, "objective.l2_weight must be a finite number >= 0"),
        ({"lpips_weight": "1"}, "objective.lpips_weight must be a number"),
        ({"l2_weight": 0.0}, "kind='e2ed2' needs at least one positive weight"),
        ({"lpips_weight": 1.0}, "objective.lpips_weight > 0 needs objective.lpips_backbone_path"),
        (
            {"lpips_backbone_path": "/x.pth", "lpips_random_backbone": True},
            "objective.lpips_backbone_path and objective.lpips_random_backbone=true both set",
        ),
        ({"lpips_backbone_path": ""}, "objective.lpips_backbone_path is empty"),
        ({"kind": "diffusion", "l1_weight": 1.0}, "objective.l1_weight applies to kind='e2ed2'"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ObjectiveConfig(**kwargs)
    assert message in str(info.value)


def test_config_defaults_are_l2_only() -> None:
    config = ObjectiveConfig()
    assert config.weights == {"l2": 1.0}
    assert not config.needs_pixels
    assert ObjectiveConfig(**RANDOM_LPIPS).needs_pixels
    assert ObjectiveConfig(kind="diffusion").kind == "diffusion"


def test_loss_rejects_diffusion_kind() -> None:
    with pytest.raises(ValueError, match="use diffusion_loss"):
        E2ED2Loss(ObjectiveConfig(kind="diffusion"))


# --- L1 / L2 ------------------------------------------------------------------------------------


def test_l1_l2_terms_and_weighted_total() -> None:
    sample, target = _randn(3, 4, 5, 6, seed=1), _randn(3, 4, 5, 6, seed=2)
    loss_fn = E2ED2Loss(ObjectiveConfig(l1_weight=0.25, l2_weight=2.0))
    terms = loss_fn(sample, target)
    assert set(terms) == {"l1", "l2", "total"}
    l1 = (sample - target).abs().sum() / sample.numel()
    l2 = ((sample - target) ** 2).sum() / sample.numel()
    torch.testing.assert_close(terms["l1"], l1)
    torch.testing.assert_close(terms["l2"], l2)
    torch.testing.assert_close(terms["total"], 0.25 * l1 + 2.0 * l2)


def test_only_enabled_terms_and_shape_check() -> None:
    sample, target = _randn(2, 4, 3, 3, seed=1), _randn(2, 4, 3, 3, seed=2)
    terms = E2ED2Loss(ObjectiveConfig(l1_weight=1.0, l2_weight=0.0))(sample, target)
    assert set(terms) == {"l1", "total"}
    torch.testing.assert_close(terms["total"], terms["l1"])
    with pytest.raises(ValueError, match="differ in shape"):
        E2ED2Loss(ObjectiveConfig())(sample, target[:1])


def test_l2_gradient_reaches_sample() -> None:
    sample = _randn(2, 4, 3, 3, seed=1).requires_grad_(True)
    target = _randn(2, 4, 3, 3, seed=2)
    E2ED2Loss(ObjectiveConfig())(sample, target)["total"].backward()
    torch.testing.assert_close(sample.grad, 2 * (sample - target).detach() / sample.numel())


# --- LPIPS ------------------------------------------------------------------------------------


def test_lpips_zero_for_identical_positive_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        loss_fn = E2ED2Loss(ObjectiveConfig(l2_weight=0.0, **RANDOM_LPIPS))
    assert "randomly initialised squeeze backbone" in caplog.text
    images = _randn(2, 3, 32, 32, seed=3).clamp(-1, 1)
    other = _randn(2, 3, 32, 32, seed=4).clamp(-1, 1)
    same = loss_fn(images, images.clone())
    assert set(same) == {"lpips", "total"}
    assert same["lpips"].item() == 0.0
    different = loss_fn(images, other)
    assert different["lpips"].item() > 1e-4
    torch.testing.assert_close(different["total"], different["lpips"])


def test_lpips_on_one_channel_images_repeats_to_rgb() -> None:
    loss_fn = E2ED2Loss(ObjectiveConfig(l2_weight=0.0, **RANDOM_LPIPS))
    gray_a, gray_b = _randn(2, 1, 24, 20, seed=5), _randn(2, 1, 24, 20, seed=6)
    got = loss_fn(gray_a, gray_b)["lpips"]
    expected = loss_fn.lpips_network(gray_a.repeat(1, 3, 1, 1), gray_b.repeat(1, 3, 1, 1)).mean()
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\) pixels"):
        loss_fn(_randn(2, 4, 24, 20), _randn(2, 4, 24, 20))
    with pytest.raises(ValueError, match="at least 17x17 pixels, got 16x16"):
        loss_fn(_randn(1, 3, 16, 16), _randn(1, 3, 16, 16))


def test_lpips_network_is_frozen_and_hidden_from_optimizers() -> None:
    loss_fn = E2ED2Loss(ObjectiveConfig(**RANDOM_LPIPS))
    net = loss_fn.lpips_network
    assert net is not None
    assert list(loss_fn.parameters()) == []
    assert loss_fn.state_dict() == {}
    params = list(net.parameters())
    assert params and not any(p.requires_grad for p in params)
    loss_fn.train()
    assert not net.training
    loss_fn.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    # Inputs are cast to the LPIPS dtype; the result still works from float32 pixels.
    assert loss_fn(_randn(1, 3, 20, 20), _randn(1, 3, 20, 20, seed=1))["lpips"].isfinite()


def _lpips_grad(decode_checkpoint: bool, lpips_checkpoint: bool) -> tuple[torch.Tensor, int]:
    config = ObjectiveConfig(
        l2_weight=0.5,
        decode_checkpoint=decode_checkpoint,
        lpips_checkpoint=lpips_checkpoint,
        **RANDOM_LPIPS,
    )
    torch.manual_seed(0)  # the same random LPIPS backbone every call
    decode = _CountingDecode(_tiny_vae())
    loss_fn = E2ED2Loss(config, decode)
    sample = _randn(2, 4, 16, 16, seed=7).requires_grad_(True)
    target = _randn(2, 4, 16, 16, seed=8)
    terms = loss_fn(sample, target)
    assert terms["lpips"].item() > 0
    terms["total"].backward()
    return sample.grad, decode.calls


def test_lpips_gradient_flows_through_decoder_and_checkpoint_matches() -> None:
    plain_grad, plain_calls = _lpips_grad(decode_checkpoint=False, lpips_checkpoint=False)
    ckpt_grad, ckpt_calls = _lpips_grad(decode_checkpoint=True, lpips_checkpoint=True)
    assert plain_grad.abs().sum() > 0 and plain_grad.isfinite().all()
    # Plain: sample + target decode. Checkpointed: the sample's decode re-runs in backward.
    assert plain_calls == 2
    assert ckpt_calls == 3
    torch.testing.assert_close(ckpt_grad, plain_grad, rtol=1e-5, atol=1e-7)
    lpips_only_ckpt, _ = _lpips_grad(decode_checkpoint=False, lpips_checkpoint=True)
    torch.testing.assert_close(lpips_only_ckpt, plain_grad, rtol=1e-5, atol=1e-7)


def test_predecoded_pixels_skip_decoding() -> None:
    torch.manual_seed(0)
    decode = _CountingDecode(_tiny_vae())
    loss_fn = E2ED2Loss(ObjectiveConfig(**RANDOM_LPIPS), decode)
    sample = _randn(2, 4, 16, 16, seed=7).requires_grad_(True)
    target = _randn(2, 4, 16, 16, seed=8).requires_grad_(True)
    fake_px = loss_fn.decode_sample(sample)
    real_px = loss_fn.decode_target(target)
    assert fake_px.shape == (2, 3, 32, 32) and fake_px.requires_grad
    assert not real_px.requires_grad
    assert decode.calls == 2
    shared = loss_fn(sample, target, sample_pixels=fake_px, target_pixels=real_px)
    assert decode.calls == 2
    own = loss_fn(sample, target)
    assert decode.calls == 4
    torch.testing.assert_close(shared["total"], own["total"])


def test_pixel_space_decode_is_identity() -> None:
    loss_fn = E2ED2Loss(ObjectiveConfig())
    x = _randn(2, 1, 8, 8).requires_grad_(True)
    assert loss_fn.decode_sample(x) is x
    target_px = loss_fn.decode_target(x)
    assert not target_px.requires_grad
    torch.testing.assert_close(target_px, x.detach())
    assert not loss_fn.needs_pixels


def _layer(lpips_model: torch.nn.Module, slice_number: int, index: int) -> torch.nn.Module:
    """torchvision's ``features[index]`` inside the lpips backbone (slices keep its index as name)."""
    return getattr(getattr(lpips_model.net, f"slice{slice_number}"), str(index))


def _lpips_config(net: str, path) -> ObjectiveConfig:
    return ObjectiveConfig(lpips_weight=1.0, lpips_net=net, lpips_backbone_path=str(path))


def test_lpips_backbone_loads_from_local_torchvision_file(tmp_path) -> None:
    # A full torchvision state dict (classifier included), as torchvision caches it.
    torch.manual_seed(11)
    squeeze = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path / "squeezenet1_1.pth"
    torch.save(squeeze.state_dict(), path)
    net = E2ED2Loss(_lpips_config("squeeze", path)).lpips_network
    torch.testing.assert_close(_layer(net, 1, 0).weight, squeeze.features[0].weight)
    torch.testing.assert_close(
        _layer(net, 7, 12).expand3x3.bias, squeeze.features[12].expand3x3.bias
    )

    # Only ``features.*`` is needed: an AlexNet file without its classifier loads too.
    torch.manual_seed(12)
    alex = torchvision.models.alexnet(weights=None)
    alex_path = tmp_path / "alexnet_features.pth"
    torch.save({k: v for k, v in alex.state_dict().items() if k.startswith("features.")}, alex_path)
    alex_lpips = E2ED2Loss(_lpips_config("alex", alex_path)).lpips_network
    torch.testing.assert_close(_layer(alex_lpips, 5, 10).weight, alex.features[10].weight)
    assert not any(p.requires_grad for p in alex_lpips.parameters())

    # A file of the wrong network names the path and what it expected.
    with pytest.raises(ValueError, match=r"squeezenet1_1.pth.*features.0.weight has shape"):
        E2ED2Loss(_lpips_config("alex", path))
    # A file lacking backbone tensors says which and what it expected.
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": alex.features[0].weight.detach()}, partial)
    with pytest.raises(ValueError, match=r"partial.pth.*expected a torchvision alexnet state dict"):
        E2ED2Loss(_lpips_config("alex", partial))


def test_lpips_missing_backbone_file_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/vgg16.pth"):
        E2ED2Loss(_lpips_config("vgg", missing))


# --- standard diffusion loss ------------------------------------------------------------------


def _ddpm(config: SamplerConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        prediction_type=config.prediction_type,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "schedule", [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}]
)
def test_diffusion_input_and_target_match_diffusers(prediction_type: str, schedule: dict) -> None:
    config = SamplerConfig(prediction_type=prediction_type, **schedule)
    ddpm = _ddpm(config)
    clean, noise = _randn(5, 4, 6, 6, seed=1), _randn(5, 4, 6, 6, seed=2)
    timesteps = torch.tensor([0, 17, 500, 998, 999])
    noisy, target = diffusion_input_and_target(config, clean, noise, timesteps)
    torch.testing.assert_close(noisy, ddpm.add_noise(clean, noise, timesteps))
    expected = {
        "epsilon": noise,
        "v_prediction": ddpm.get_velocity(clean, noise, timesteps),
        "sample": clean,
    }[prediction_type]
    torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_uses_per_sample_timesteps(
    make_pixart, make_conditioning, prediction_type: str
) -> None:
    config = SamplerConfig(prediction_type=prediction_type)
    network = make_pixart()
    cond = make_conditioning(3)
    clean = _randn(3, 4, 8, 8, seed=4)
    loss = diffusion_loss(network, clean, cond, config, torch.Generator().manual_seed(9))

    # Replay the draws and evaluate each sample alone at its own (int) timestep.
    replay = torch.Generator().manual_seed(9)
    timesteps = torch.randint(0, config.num_train_timesteps, (3,), generator=replay)
    noise = torch.randn(clean.shape, generator=replay)
    assert len(set(timesteps.tolist())) > 1
    noisy, target = diffusion_input_and_target(config, clean, noise, timesteps)
    with torch.no_grad():
        per_sample = [
            denoise(network, noisy[i : i + 1], int(timesteps[i]), _row(cond, i)) for i in range(3)
        ]
    expected = ((torch.cat(per_sample) - target) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    loss.backward()
    grads = [p.grad for p in network.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def _row(cond: Conditioning, i: int) -> Conditioning:
    mask = cond.encoder_attention_mask
    return Conditioning(
        encoder_hidden_states=cond.encoder_hidden_states[i : i + 1],
        encoder_attention_mask=None if mask is None else mask[i : i + 1],
    )
