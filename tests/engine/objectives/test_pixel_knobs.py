"""The cheaper pixel-term knobs: objective.lpips_resolution, objective.loss_decoder_path (a local
AutoencoderTiny), objective.pixel_crop (seeded crops), and the decoder checkpointed per block
(objective.decode_checkpoint_blocks); each validated by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from e2ed2.engine import LiveTensorTracker
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.core.models import FrozenVAE
from e2ed2.engine.objectives.losses import E2ED2Loss


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(pixel_rows_per_pass=-1), "objective.pixel_rows_per_pass must be an integer >= 0"),
        (dict(lpips_resolution=8), "objective.lpips_resolution=8 is below the 16 px"),
        (dict(lpips_resolution=2.5), "objective.lpips_resolution must be an integer"),
        (dict(pixel_crop=100), "objective.pixel_crop=100 must be a multiple of 8"),
        (dict(loss_decoder_path=""), "objective.loss_decoder_path is empty"),
    ],
)
def test_knobs_are_validated_by_name(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**fields)


def test_lpips_resolution_scores_the_resized_images() -> None:
    config = ObjectiveConfig(lpips_weight=1.0, lpips_random_backbone=True, lpips_net="alex")
    native = E2ED2Loss(config)
    resized = E2ED2Loss(ObjectiveConfig(**{**config.__dict__, "lpips_resolution": 32}))
    resized._lpips.load_state_dict(native._lpips.state_dict())
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 64, 96, generator=g) * 2 - 1 for _ in range(2))

    def shrink(x: torch.Tensor) -> torch.Tensor:  # shorter side 64 -> 32, aspect kept
        return F.interpolate(x, size=(32, 48), mode="bilinear", antialias=True)

    expected = native.lpips_distance(shrink(a), shrink(b))
    torch.testing.assert_close(resized.lpips_distance(a, b), expected)
    assert (native.lpips_distance(a, b) - expected).abs() > 1e-4
    # Images at or below the resolution are scored as they are.
    torch.testing.assert_close(
        resized.lpips_distance(a[..., :32, :32], b[..., :32, :32]),
        native.lpips_distance(a[..., :32, :32], b[..., :32, :32]),
    )


def _tiny_autoencoder_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()


def test_loss_decoder_decodes_for_the_loss_only(tmp_path, real_models) -> None:
    """A local AutoencoderTiny folder decodes sample and target for the pixel terms (with
    gradients to the latent); a folder of another class is refused naming the key."""
    tiny = _tiny_autoencoder_tiny()
    tiny.save_pretrained(tmp_path / "taesd")
    config = ObjectiveConfig(
        lpips_weight=1.0, lpips_random_backbone=True, loss_decoder_path=str(tmp_path / "taesd")
    )
    full = FrozenVAE(real_models.tiny_sd_vae())
    loss_fn = E2ED2Loss(config, full.decode, decoder=full.vae)
    latents = torch.randn(2, 4, 4, 4, requires_grad=True)
    pixels = loss_fn.decode_sample(latents)
    with torch.no_grad():
        expected = tiny.decode(latents).sample  # scaling_factor 1: the latents as they are
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixels.detach(), expected)
    torch.testing.assert_close(loss_fn.decode_target(latents), expected)
    pixels.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    real_models.tiny_sd_vae().save_pretrained(tmp_path / "kl")
    wrong = ObjectiveConfig(l2_weight=1.0, loss_decoder_path=str(tmp_path / "kl"))
    with pytest.raises(ValueError, match=r"objective.loss_decoder_path=.*AutoencoderKL"):
        E2ED2Loss(wrong, full.decode)
    missing = ObjectiveConfig(l2_weight=1.0, loss_decoder_path=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="objective.loss_decoder_path"):
        E2ED2Loss(missing, full.decode)
    with pytest.raises(ValueError, match="objective.loss_decoder_path is set but the run is in"):
        E2ED2Loss(config)  # pixel space


def test_pixel_crop_is_seeded_shared_per_prompt_and_decodes_the_crop(real_models) -> None:
    vae = FrozenVAE(real_models.tiny_sd_vae())
    config = ObjectiveConfig(lpips_weight=1.0, lpips_random_backbone=True, pixel_crop=32)
    loss_fn = E2ED2Loss(config, vae.decode)

    def draw(seed: int) -> torch.Tensor:
        return torch.tensor(loss_fn.draw_crops(6, (8, 8), seed, 2))

    corners = draw(3)
    assert torch.equal(corners, draw(3)), "the same seed (a resumed step) draws the same crops"
    assert not torch.equal(corners, draw(4))
    assert corners.shape == (6, 2) and corners.min() >= 0 and corners.max() <= 8 - 4
    assert torch.equal(corners[0::2], corners[1::2]), "a prompt's m samples share their crop"
    sample = torch.randn(6, 4, 8, 8, requires_grad=True)
    target = torch.randn(6, 4, 8, 8)
    terms = loss_fn(sample, target, crops=corners.tolist(), samples_per_prompt=2)
    rows = [
        (s[:, t : t + 4, c : c + 4], r[:, t : t + 4, c : c + 4])
        for s, r, (t, c) in zip(sample, target, corners.tolist(), strict=True)
    ]
    crop_s, crop_t = (torch.stack(x) for x in zip(*rows, strict=True))
    expected = loss_fn.lpips_distance(vae.decode(crop_s), vae.decode(crop_t))
    torch.testing.assert_close(terms["lpips"], expected)
    with pytest.raises(ValueError, match=r"objective.pixel_crop=32 does not fit the 24x24 px"):
        loss_fn.draw_crops(2, (3, 3), 0)


def _decode_peak(vae: FrozenVAE, loss_fn: E2ED2Loss) -> int:
    with FakeTensorMode(allow_non_fake_inputs=True), LiveTensorTracker(track_cuda=False) as t:
        latents = torch.randn(1, 4, 64, 64, requires_grad=True)
        loss_fn.decode_sample(latents).square().mean().backward()
    return t.report().peak_bytes


def test_per_block_checkpointing_cuts_the_decoders_backward_peak(real_models) -> None:
    """A 512 px decode under fake tensors: diffusers' per-block checkpoints hold one block's
    activations in the backward, the whole-decoder checkpoint all of them; the gradient is
    the plain decoder's (real tensors, small)."""
    overrides = dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=32)
    whole_vae = FrozenVAE(real_models.tiny_sd_vae(**overrides))
    block_vae = FrozenVAE(real_models.tiny_sd_vae(**overrides))
    config = ObjectiveConfig(lpips_weight=1.0, lpips_random_backbone=True)
    whole = E2ED2Loss(
        ObjectiveConfig(**{**config.__dict__, "decode_checkpoint_blocks": False}),
        whole_vae.decode,
        decoder=whole_vae.vae,
    )
    blocks = E2ED2Loss(config, block_vae.decode, decoder=block_vae.vae)
    peaks = {
        name: _decode_peak(vae, fn)
        for name, vae, fn in [("whole", whole_vae, whole), ("blocks", block_vae, blocks)]
    }
    print({name: f"{peak / 2**20:.0f} MiB" for name, peak in peaks.items()})
    assert peaks["blocks"] <= 0.6 * peaks["whole"], peaks
    latents = torch.randn(1, 4, 4, 4, requires_grad=True)
    blocks.decode_sample(latents).square().mean().backward()
    got = latents.grad.clone()
    block_vae.vae.disable_gradient_checkpointing()  # plain autograd
    latents.grad = None
    block_vae.decode(latents).square().mean().backward()
    torch.testing.assert_close(got, latents.grad, rtol=1e-5, atol=1e-7)
