"""The shipped SD3 preset end to end on a folder with stable-diffusion-3-medium-diffusers'
structure: precompute (the pipeline's own encode_prompt: CLIP-L + CLIP-G + T5 states and pooled
projections; the 16-channel VAE with its shift) -> ``e2ed2 train --config sd3_medium_512`` with
only paths and budget overridden, in the preset's bf16 / ZeRO-3 / flow matching teacher ->
export -> StableDiffusion3Pipeline generates an image from a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from e2ed2.engine.cli.train import main as train_main

PROMPT = "a photo of a cat sitting on a red sofa"


def _overrides(folder: Path, shards: Path, out: Path) -> list[str]:
    return [
        # paths
        f"model.pretrained_path={folder}",
        f"model.vae_path={folder}",
        f"data.shard_dir={shards}",
        f"run.output_dir={out}",
        # budget: 2 steps of batch 2, a 2-image grid, no loader worker processes
        "run.max_steps=2",
        "run.batch_per_rank=2",
        "run.num_sample_images=2",
        "data.num_workers=0",
    ]


def _generate(export: Path) -> np.ndarray:
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0
    images = pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=1.0,
        height=64,
        width=64,
        max_sequence_length=16,
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    return images


def test_precompute_stores_the_pipelines_own_conditioning(sd3_folder, shards_sd3) -> None:
    """The shards hold exactly what StableDiffusion3Pipeline.encode_prompt gives (states and
    pooled projections, no mask) and the VAE's shift factor."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from e2ed2.engine.config import DataConfig
    from e2ed2.engine.data.shards import LatentShardDataset

    index = json.loads((shards_sd3 / "index.json").read_text())
    assert index["vae"]["shift_factor"] == 0.0609 and index["vae"]["scaling_factor"] == 1.5305
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_sd3)))
    assert dataset.latent_shape == (16, 8, 8)
    assert dataset.text_shape == (77 + 16, 32) and dataset.pooled_dim == 24
    item = dataset[0]
    assert "encoder_attention_mask" not in item
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, transformer=None, vae=None)
    with torch.no_grad():
        states, null_states, pooled, null_pooled = pipe.encode_prompt(
            dataset.captions[0],
            None,
            None,
            do_classifier_free_guidance=True,
            max_sequence_length=16,
        )
    # Stored as float16 (precompute's default storage dtype).
    torch.testing.assert_close(item["encoder_hidden_states"], states[0].half().float())
    torch.testing.assert_close(item["pooled_projections"], pooled[0].half().float())
    # Classifier-free guidance's unconditional half: the pipeline's default negative prompt "".
    null = dataset.null_condition
    assert "encoder_attention_mask" not in null
    torch.testing.assert_close(null["encoder_hidden_states"], null_states.half().float())
    torch.testing.assert_close(null["pooled_projections"], null_pooled.half().float())


def test_sd3_preset_trains_exports_and_generates(
    sd3_folder: Path, shards_sd3: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    args = ["--config", "sd3_medium_512", *_overrides(sd3_folder, shards_sd3, out)]
    assert train_main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run: denoiser forward" in printed and "pooled" in printed
    # Guided as SD3 samples (w = 7): the empty prompt's states and pooled projections join.
    assert train_main([*args, "sampler.guidance_scale=7.0", "--dry-run"]) == 0
    assert "guidance_scale 7 (doubled batch)" in capsys.readouterr().out
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    export = out / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    for frozen in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"):
        assert (export / frozen).is_symlink(), frozen
    assert (out / "samples").is_dir()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["teacher"]) for m in metrics)  # the flow teacher term
    _generate(export)


@pytest.mark.slow
def test_sd3_preset_on_two_launcher_ranks(
    sd3_folder, shards_sd3, tmp_path, run_checked, deepspeed_command
) -> None:
    out = tmp_path / "run"
    overrides = _overrides(sd3_folder, shards_sd3, out)
    overrides[overrides.index("run.batch_per_rank=2")] = "run.batch_per_rank=1"
    run_checked(
        deepspeed_command(
            "--module",
            "e2ed2.engine.cli.train",
            "--config",
            "sd3_medium_512",
            *overrides,
        )
    )
    _generate(out / "export")
