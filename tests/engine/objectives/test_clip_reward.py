"""The CLIP-similarity reward (objective.reward_kind = "clip"): its preprocessing and score
against transformers' own CLIPProcessor + CLIPModel, its gradient (to the sample, never to
CLIP), the per-caption text cache, bf16, the folder checks, and trainer steps on real-structure
PixArt shards that score each sample against its caption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from e2ed2.engine.config import ConfigError, load_config
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.objectives.clip_reward import (
    ClipReward,
    check_clip_folder,
    clip_pixel_values,
)
from e2ed2.engine.objectives.losses import E2ED2Loss

#: The tiny CLIP's vision input side (conftest.py's clip_folder: the processor resizes the
#: shortest side to it and crops).
IMAGE_PX = 32


@pytest.fixture(scope="module")
def reward(clip_folder) -> ClipReward:
    return ClipReward.from_folder(clip_folder)


def _uint8_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(N, 3, H, W) uint8: smooth colour ramps plus noise (something a resize changes)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, width).expand(height, width)
    base = torch.rand(count, 3, 1, 1, generator=g) * 255 * ramp
    noise = torch.randint(0, 48, (count, 3, height, width), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def _reference(clip_folder: Path, images: torch.Tensor, captions: list[str]):
    """transformers' own path: CLIPProcessor with the PIL image processor (PIL images), then
    CLIPModel.forward; returns (pixel_values, per-image cosine with its caption)."""
    import transformers
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    pil_processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = CLIPProcessor(
        image_processor=pil_processor.from_pretrained(clip_folder),
        tokenizer=CLIPTokenizer.from_pretrained(clip_folder),
    )
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    inputs = processor(text=captions, images=pil, return_tensors="pt", padding=True)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        out = model(**inputs)
    return inputs["pixel_values"], (out.image_embeds * out.text_embeds).sum(-1)


CAPTIONS = ["a photo of a cat sitting on a red sofa", "a small boat on a calm blue lake"]


def test_at_the_models_size_the_reward_equals_clipprocessor_and_clipmodel(
    clip_folder, reward
) -> None:
    """No resize, no crop offset: the [-1, 1] sample of uint8 pixels gives the processor's
    pixel_values and the model's cosine to float rounding."""
    images = _uint8_images(2, IMAGE_PX, IMAGE_PX)
    pixels = images.float() / 127.5 - 1
    expected_values, expected = _reference(clip_folder, images, CAPTIONS)
    values = clip_pixel_values(pixels, reward.preprocess)
    assert values.shape == (2, 3, IMAGE_PX, IMAGE_PX)
    torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward(pixels, CAPTIONS), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height, width", [(40, 47), (80, 64), (50, 150), (512, 512)])
def test_resized_the_reward_matches_the_processor_within_its_uint8_rounding(
    clip_folder, reward, height: int, width: int
) -> None:
    """Shortest side resized to 32 (every case shrinks, 512 px 16x: without the antialias
    filter the result would be far off), the long side truncated as transformers does (47 -> 37.6 -> 37), the
    center crop at the processor's offsets. The processor rounds the resized image to uint8 and
    PIL resamples in fixed point: measured up to 1.04/255 per pixel, 0.31/255 on average (in
    [0, 1] units, before CLIP's normalisation), and rewards within 3e-4; a crop one pixel off
    would differ by whole columns."""
    images = _uint8_images(2, height, width, seed=height)
    pixels = images.float() / 127.5 - 1
    expected_values, expected = _reference(clip_folder, images, CAPTIONS)
    values = clip_pixel_values(pixels, reward.preprocess)
    assert values.shape == expected_values.shape == (2, 3, IMAGE_PX, IMAGE_PX)
    std = torch.tensor(reward.preprocess.std).view(1, 3, 1, 1)
    difference = ((values - expected_values) * std).abs() * 255  # in uint8 levels
    assert difference.max() < 1.5 and difference.mean() < 0.4, difference.max()
    torch.testing.assert_close(reward(pixels, CAPTIONS), expected, atol=1e-3, rtol=0)


def test_the_gradient_reaches_the_sample_and_never_clip(reward) -> None:
    g = torch.Generator().manual_seed(3)
    pixels = (torch.randn(3, 3, 48, 40, generator=g) * 0.5).tanh().requires_grad_(True)
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]]
    scores = reward(pixels, captions)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert ((scores >= -1) & (scores <= 1)).all()
    scores.sum().backward()
    grad = pixels.grad
    assert torch.isfinite(grad).all() and (grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    assert not reward.training and not reward.model.training
    assert all(not p.requires_grad and p.grad is None for p in reward.model.parameters())
    # A small step along the gradient raises every sample's reward (first order).
    with torch.no_grad():
        after = reward(pixels + 1e-2 * grad / grad.abs().amax(), captions)
    assert (after > scores.detach()).all(), (scores, after)
    # Activation checkpointing re-runs the image tower in backward: same gradient.
    checkpointed = pixels.detach().clone().requires_grad_(True)
    reward(checkpointed, captions, checkpointed=True).sum().backward()
    torch.testing.assert_close(checkpointed.grad, grad, atol=1e-6, rtol=1e-5)


def test_each_caption_goes_through_the_text_tower_once(clip_folder) -> None:
    scorer = ClipReward.from_folder(clip_folder)
    batches: list[int] = []

    def count(module, args, kwargs, output) -> None:
        batches.append(kwargs["input_ids"].shape[0])

    scorer.model.text_model.register_forward_hook(count, with_kwargs=True)
    pixels = torch.zeros(3, 3, IMAGE_PX, IMAGE_PX)
    first = scorer(pixels, [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    second = scorer(pixels, [CAPTIONS[1], CAPTIONS[0], CAPTIONS[1]])
    assert batches == [2], batches  # one call, for the two distinct captions
    torch.testing.assert_close(second, first[[1, 0, 1]])


def test_bf16_scores_in_bf16_and_gives_float32_rewards_and_gradients(clip_folder, reward) -> None:
    """The scorer loaded in bf16 (a bf16 run's compute dtype) scores a bf16 sample: the image
    tower runs in bf16, the reward is float32 and close to the float32 scorer's."""
    scorer = ClipReward.from_folder(clip_folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in scorer.model.parameters())
    pixels = (_uint8_images(2, 40, 48).float() / 127.5 - 1).to(torch.bfloat16)
    pixels.requires_grad_(True)
    scores = scorer(pixels, CAPTIONS, checkpointed=True)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reward(pixels.detach().float(), CAPTIONS), atol=3e-2, rtol=0)
    scores.sum().backward()
    assert pixels.grad.dtype == torch.bfloat16 and torch.isfinite(pixels.grad.float()).all()
    assert pixels.grad.float().abs().sum() > 0


def test_the_loss_term_is_minus_the_mean_cosine(clip_folder, reward) -> None:
    config = ObjectiveConfig(
        l2_weight=0, reward_weight=2.0, reward_kind="clip", reward_path=str(clip_folder)
    )
    loss_fn = E2ED2Loss(config)
    assert loss_fn.needs_captions and not loss_fn.needs_labels and loss_fn.needs_pixels
    pixels = _uint8_images(2, 40, 48).float() / 127.5 - 1
    terms = loss_fn(pixels, torch.zeros_like(pixels), captions=CAPTIONS)
    expected = -reward(pixels, CAPTIONS).mean()
    torch.testing.assert_close(terms["reward"], expected)
    torch.testing.assert_close(terms["total"], 2.0 * expected)
    with pytest.raises(ValueError, match="no captions"):
        loss_fn(pixels, torch.zeros_like(pixels))
    with pytest.raises(ValueError, match="one caption per image"):
        loss_fn(pixels, torch.zeros_like(pixels), captions=CAPTIONS[:1])


def test_the_folder_is_checked_naming_the_key_and_path(clip_folder, tmp_path) -> None:
    check_clip_folder(clip_folder)
    with pytest.raises(FileNotFoundError, match=r"objective.reward_path=.*nowhere.*not a folder"):
        check_clip_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"objective.reward_path=.*empty.*no config.json"):
        check_clip_folder(empty)
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match=r"text_only.*'clip_text_model', not a CLIPModel"):
        check_clip_folder(text_only)
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    (no_processor / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no_processor.*no preprocessor_config.json"):
        check_clip_folder(no_processor)
    # The config names the key too, and the launch check reads the folder.
    with pytest.raises(ValueError, match="reward_kind='clip' needs objective.reward_path"):
        ObjectiveConfig(reward_weight=1.0, reward_kind="clip")
    with pytest.raises(ValueError, match=r"objective.reward_kind='image' is not one of"):
        ObjectiveConfig(reward_weight=1.0, reward_kind="image", reward_path="x")
    with pytest.raises(ConfigError, match=r"objective.reward_path=.*empty.*no config.json"):
        from e2ed2.engine.train.launch import check_launch

        config = load_config(
            None,
            [
                f"run.output_dir={tmp_path / 'run'}",
                "run.deepspeed_config=none",
                "objective.reward_weight=1",
                "objective.reward_kind=clip",
                f"objective.reward_path={empty}",
            ],
        )
        check_launch(config, 1)


def _shard_overrides(folder: Path, shards: Path, clip: Path, out: Path) -> list[str]:
    return [
        f"model.pretrained_path={folder}",
        f"model.vae_path={folder}",
        "data.source=shards",
        f"data.shard_dir={shards}",
        "data.num_workers=0",
        f"run.output_dir={out}",
        "run.deepspeed_config=none",
        "run.max_steps=1",
        "run.batch_per_rank=2",
        "run.num_sample_images=0",
        "run.export_at_end=false",
        "run.log_every_steps=1",
        # LCM as the PixArt preset, K = 2, the reward through the last step only (DRaFT-1)
        "sampler.kind=lcm",
        "sampler.beta_schedule=scaled_linear",
        "sampler.beta_start=0.00085",
        "sampler.beta_end=0.012",
        "trajectory.num_steps=2",
        "trajectory.samples_per_prompt=2",
        "trajectory.truncation=last_k",
        "trajectory.grad_steps=1",
        "objective.l2_weight=0",
        "objective.reward_weight=1",
        "objective.reward_kind=clip",
        f"objective.reward_path={clip}",
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_trainer_step_on_pixart_shards_scores_each_sample_against_its_caption(
    pixart_512_folder, shards_512, clip_folder, tmp_path, precision: str
) -> None:
    """Real-structure PixArt-α 512 shards (VAE-decoded 64 px samples, resized to CLIP's 32):
    the reward term is logged, every sample is scored against its own caption (m = 2 rows per
    prompt), the step changes the denoiser, and bf16 runs score with a bf16 CLIP."""
    from e2ed2.engine.train.trainer import Trainer

    overrides = _shard_overrides(pixart_512_folder, shards_512, clip_folder, tmp_path / "run")
    trainer = Trainer(load_config(None, [*overrides, f"run.precision={precision}"]))
    scorer = trainer.loss_fn.reward_model
    assert isinstance(scorer, ClipReward) and scorer.dtype == trainer.compute_dtype
    scored: list[list[str]] = []
    text_features = scorer.text_features
    scorer.text_features = lambda captions: scored.append(list(captions)) or text_features(captions)
    drawn: list[list[int]] = []
    to_device = trainer._batch_to_device
    trainer._batch_to_device = lambda batch: drawn.append(batch.index.tolist()) or to_device(batch)
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    history = trainer.train()  # one step, logged
    captions = trainer.loader.dataset.captions
    assert len(drawn) == 1 and len(set(captions[i] for i in drawn[0])) == 2
    assert scored == [[captions[i] for i in drawn[0] for _ in range(2)]]
    record = history[-1]
    assert "reward" in record and -1 <= record["reward"] <= 1
    assert record["total"] == pytest.approx(record["reward"])
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isclose(logged["reward"], record["reward"])
    after = list(trainer.engine.module.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
