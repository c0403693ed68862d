"""Sana end to end through its family record on a folder with Sana_1600M_1024px_diffusers'
structure: precompute (SanaPipeline's own encode_prompt with the complex human instruction; the
DC-AE latent, no posterior) -> ``e2ed2 train --config sana_1024`` with only paths and budget
overridden, in the preset's bf16 / ZeRO-3 / flow Euler teacher -> the export is a SanaPipeline
that diffusers loads and that generates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from e2ed2.engine.cli.train import main as train_main

TEXT_TOKENS = 16


def test_precompute_stores_sanas_own_conditioning(sana_folder, shards_sana) -> None:
    """The shards hold what SanaPipeline.encode_prompt gives (instruction prepended, first +
    last 15 of the tokens kept, the mask), the DC-AE's latent (std 0) and, as the null
    condition, the pipeline's negative prompt "" encoding."""
    from diffusers import AutoencoderDC, SanaPipeline

    from e2ed2.engine.config import DataConfig
    from e2ed2.engine.data.gemma_text import complex_human_instruction
    from e2ed2.engine.data.images import load_image_and_size
    from e2ed2.engine.data.shards import LatentShardDataset

    index = json.loads((shards_sana / "index.json").read_text())
    assert index["vae"]["class"] == "AutoencoderDC" and index["vae"]["scaling_factor"] == 0.41407
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_sana)))
    assert dataset.latent_shape == (32, 4, 4) and dataset.text_shape == (TEXT_TOKENS, 32)
    pipe = SanaPipeline.from_pretrained(sana_folder, transformer=None)
    item = dataset[0]
    with torch.no_grad():
        states, mask, null_states, null_mask = pipe.encode_prompt(
            dataset.captions[0],
            do_classifier_free_guidance=True,
            max_sequence_length=TEXT_TOKENS,
            complex_human_instruction=complex_human_instruction(pipe),
        )
    real = mask[0].bool()
    assert torch.equal(item["encoder_attention_mask"].bool(), real)
    # float16 storage; padding positions are stored as zeros (masked out by the transformer).
    torch.testing.assert_close(item["encoder_hidden_states"][real], states[0][real].half().float())
    null = dataset.null_condition
    torch.testing.assert_close(null["encoder_hidden_states"], null_states.half().float())
    assert torch.equal(null["encoder_attention_mask"].bool(), null_mask.bool())
    # The DC-AE has no posterior: its latent x scaling_factor, the same at every draw (std 0).
    pixels, _ = load_image_and_size(Path(index["source"]["image_dir"]) / dataset.files[0], 128)
    vae = AutoencoderDC.from_pretrained(sana_folder, subfolder="vae")
    with torch.no_grad():
        stored = vae.encode(pixels[None]).latent[0].half()  # float16 storage
    latent = item["latents"]
    # One float16 step apart at most: the precompute encoded the image in a batch of four.
    torch.testing.assert_close(latent, 0.41407 * stored.float(), rtol=1e-3, atol=1e-4)
    assert torch.equal(latent, dataset[0]["latents"])


def test_sana_preset_trains_exports_and_generates(
    sana_folder: Path, shards_sana: Path, tmp_path: Path, capsys, world_of_one
) -> None:
    from diffusers import DiffusionPipeline, SanaPipeline

    out = tmp_path / "run"
    args = [
        "--config",
        "sana_1024",
        f"model.pretrained_path={sana_folder}",
        f"model.vae_path={sana_folder}",
        f"data.shard_dir={shards_sana}",
        f"run.output_dir={out}",
        "run.max_steps=2",
        "run.batch_per_rank=2",
        "run.num_sample_images=2",
        "data.num_workers=0",
        "objective.teacher_steps=4",
    ]
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["teacher"]) for m in metrics)
    export = out / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline"
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderDC"]
    assert (export / "vae").is_symlink() and (export / "text_encoder").is_symlink()
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, SanaPipeline)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    images = pipe(
        "a photo of a cat sitting on a red sofa",
        num_inference_steps=4,
        guidance_scale=4.5,
        height=128,
        width=128,
        max_sequence_length=TEXT_TOKENS,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()


def test_sana_sprint_preset_trains_and_exports_a_sprint_pipeline(
    sana_sprint_folder: Path, shards_sana: Path, tmp_path: Path, capsys, world_of_one
) -> None:
    """SANA-Sprint's preset (SCM K = 4, bf16, ZeRO-3) on shards of the same Gemma and DC-AE:
    the export is a SanaSprintPipeline with an SCMScheduler that generates in 2 steps."""
    from diffusers import DiffusionPipeline, SanaSprintPipeline

    out = tmp_path / "run"
    args = [
        "--config",
        "sana_sprint_1024",
        f"model.pretrained_path={sana_sprint_folder}",
        f"model.vae_path={sana_sprint_folder}",
        f"data.shard_dir={shards_sana}",
        f"run.output_dir={out}",
        "run.max_steps=2",
        "run.batch_per_rank=2",
        "run.num_sample_images=2",
        "data.num_workers=0",
    ]
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["l2"]) for m in metrics)
    export = out / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "SanaSprintPipeline"
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, SanaSprintPipeline)
    assert type(pipe.scheduler).__name__ == "SCMScheduler"
    assert pipe.transformer.config.guidance_embeds
    images = pipe(
        "a photo of a cat sitting on a red sofa",
        num_inference_steps=2,
        height=128,
        width=128,
        max_sequence_length=TEXT_TOKENS,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()


@pytest.mark.slow
def test_sana_sprint_preset_on_two_launcher_ranks(
    sana_sprint_folder, shards_sana, tmp_path, run_checked, deepspeed_command
) -> None:
    """SANA-Sprint's preset on 2 ranks of the real deepspeed launcher (bf16, ZeRO-3 partitions
    the transformer over both): it trains and its export generates."""
    from diffusers import SanaSprintPipeline

    out = tmp_path / "run"
    run_checked(
        deepspeed_command(
            "--module",
            "e2ed2.engine.cli.train",
            "--config",
            "sana_sprint_1024",
            f"model.pretrained_path={sana_sprint_folder}",
            f"model.vae_path={sana_sprint_folder}",
            f"data.shard_dir={shards_sana}",
            f"run.output_dir={out}",
            "run.max_steps=2",
            "run.batch_per_rank=1",
            "run.num_sample_images=2",
            "data.num_workers=0",
        )
    )
    pipe = SanaSprintPipeline.from_pretrained(out / "export")
    images = pipe(
        "a small boat on a calm blue lake",
        num_inference_steps=2,
        height=128,
        width=128,
        max_sequence_length=TEXT_TOKENS,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()
