"""Prompt-only data (data.source = "prompts"): ``e2ed2 encode-prompts`` stores the same text
tensors as ``e2ed2 precompute`` does for the same captions; the config refuses every term that
needs images, by name; a prompt-only PixArt-structured teacher run with the shipped preset goes
end to end (encode -> train -> export -> the diffusers pipeline generates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from e2ed2.engine.cli.main import main as e2ed2_main
from e2ed2.engine.config import ConfigError, DataConfig, load_config
from e2ed2.engine.data.prompts_source import PromptDataset
from e2ed2.engine.data.shards import LatentShardDataset


def _encode(folder: Path, prompts: Path, out: Path) -> int:
    return e2ed2_main(
        [
            "encode-prompts",
            str(prompts),
            str(out),
            f"--text-encoder={folder}",
            f"--vae={folder}",
            "--max-tokens=16",
            "--batch-size=4",
        ]
    )


@pytest.fixture(scope="module")
def prompt_dir(pixart_512_folder: Path, shards_512: Path, tmp_path_factory) -> Path:
    """The captions of ``shards_512`` as a .jsonl prompt file, encoded with the same T5."""
    root = tmp_path_factory.mktemp("prompts")
    captions = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_512))).captions
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in captions))
    assert _encode(pixart_512_folder, prompts, root / "encoded") == 0
    return root / "encoded"


def test_prompt_folder_holds_what_precompute_stores(
    prompt_dir: Path, shards_512: Path, pixart_512_folder: Path, tmp_path: Path, capsys
) -> None:
    shards = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_512)))
    prompts = PromptDataset(DataConfig(source="prompts", prompt_dir=str(prompt_dir), resolution=64))
    assert len(prompts) == len(shards) and prompts.captions == shards.captions
    # The tiny VAE downsamples 8x: 64 px -> (4, 8, 8) latents, zeros (no image).
    assert prompts.latent_shape == (4, 8, 8) and prompts.text_shape == shards.text_shape
    for i in range(len(shards)):
        ours, theirs = prompts[i], shards[i]
        assert not ours["latents"].any()
        mask = theirs["encoder_attention_mask"].bool()
        assert torch.equal(ours["encoder_attention_mask"].bool(), mask)
        assert torch.equal(
            ours["encoder_hidden_states"][mask], theirs["encoder_hidden_states"][mask]
        )
    for key in ("encoder_hidden_states", "encoder_attention_mask"):
        assert torch.equal(prompts.null_condition[key], shards.null_condition[key])

    # Bad input: one line, exit 2, nothing written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"file_name": "x.png"}\n')
    assert _encode(pixart_512_folder, bad, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2: expected a string or an object" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match=r"data\.prompt_dir .* has no index\.json"):
        PromptDataset(DataConfig(source="prompts", prompt_dir=str(tmp_path)))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["objective.l2_weight=1.0"], "objective.l2_weight=1.0"),
        (
            ["objective.energy_weight=0.5", "trajectory.samples_per_prompt=2"],
            "objective.energy_weight=0.5",
        ),
        (["gan.enabled=true"], "gan.enabled=true"),
        (
            [
                "objective.kind=diffusion",
                "objective.teacher_weight=0",
                "objective.l2_weight=1",
                "trajectory.per_step_backward=false",
            ],
            "objective.kind='diffusion'",
        ),
    ],
)
def test_terms_that_need_images_are_refused_by_name(overrides: list[str], named: str) -> None:
    """At launch (check_launch, before any path or model; ``e2ed2 train`` exits 2 there)."""
    from e2ed2.engine.train.launch import check_launch

    config = load_config("pixart_alpha_512_prompts", overrides)
    with pytest.raises(ConfigError, match=rf"data\.source='prompts'.*{named}"):
        check_launch(config, world_size=1)


def test_prompt_only_teacher_run_trains_exports_and_generates(
    prompt_dir: Path, pixart_512_folder: Path, tmp_path: Path, capsys
) -> None:
    from diffusers import DiffusionPipeline, PixArtAlphaPipeline

    from e2ed2.engine.cli.train import main as train_main

    out = tmp_path / "run"
    overrides = [
        f"model.pretrained_path={pixart_512_folder}",
        f"model.vae_path={pixart_512_folder}",
        f"data.prompt_dir={prompt_dir}",
        "data.resolution=64",
        "data.num_workers=0",
        f"run.output_dir={out}",
        "run.max_steps=2",
        "run.batch_per_rank=2",
        "run.log_every_steps=1",
        "run.num_sample_images=0",
        "objective.teacher_steps=2",
        # Budget: the fused Triton kernels run interpreted on CPU (test_real_presets covers them).
        "model.fused_kernels=false",
        "run.deepspeed_config=none",
        "run.zero3_gather_once=false",
        "run.precision=fp32",
        "run.cpu_threads=1",
        'run.validation_prompts=["a red bird"]',
    ]
    args = ["--config", "pixart_alpha_512_prompts", *overrides]
    # The dry run's fake forward reads the prompt folder's first batch: zero latents of 64 px
    # (called directly: `--dry-run` adds the whole-step memory estimate, tested elsewhere).
    from e2ed2.engine.train.dry_run import dry_run_forward

    summary = dry_run_forward(load_config("pixart_alpha_512_prompts", overrides))
    assert summary.startswith("dry run: denoiser forward (2, 4, 8, 8)")
    assert train_main(args) == 0, capsys.readouterr().err[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["teacher"]) and r["teacher"] > 0 for r in records)
    assert (out / "samples" / "validation-K4-step00000002.png").is_file()

    pipe = DiffusionPipeline.from_pretrained(out / "export")
    assert isinstance(pipe, PixArtAlphaPipeline)
    images = pipe(
        "a photo of a cat sitting on a red sofa",
        num_inference_steps=2,
        guidance_scale=0.0,
        height=64,
        width=64,
        max_sequence_length=16,
        use_resolution_binning=False,
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.slow
def test_prompt_only_teacher_run_on_two_launcher_ranks(
    prompt_dir: Path, pixart_512_folder: Path, tmp_path: Path, run_checked, deepspeed_command
) -> None:
    """The preset's own ZeRO-3 and bf16 on 2 CPU ranks (one prompt each per step), with
    validation prompts sampled by both ranks (ZeRO-3 gathers) and written by rank 0."""
    out = tmp_path / "run"
    run_checked(
        deepspeed_command(
            "--module",
            "e2ed2.engine.cli.train",
            "--config",
            "pixart_alpha_512_prompts",
            f"model.pretrained_path={pixart_512_folder}",
            f"model.vae_path={pixart_512_folder}",
            "model.fused_kernels=false",
            f"data.prompt_dir={prompt_dir}",
            "data.resolution=64",
            "data.num_workers=0",
            f"run.output_dir={out}",
            "run.max_steps=2",
            "run.batch_per_rank=1",
            "run.log_every_steps=1",
            "run.num_sample_images=0",
            "objective.teacher_steps=2",
            'run.validation_prompts=["a red bird", "a boat"]',
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["teacher"]) for r in records)
    assert (out / "samples" / "validation-K4-step00000002.png").is_file()
    assert (out / "export" / "transformer" / "config.json").is_file()


def test_sd3_prompt_folder_and_validation_prompts_match_the_shards(
    sd3_folder: Path, shards_sd3: Path, tmp_path: Path
) -> None:
    """SD3-structured: ``encode-prompts`` stores the pipeline's joint states and pooled
    projections (no mask) as precompute does, and validation prompts are encoded the same way
    from the encoders the shards' index.json records."""
    from e2ed2.engine.train.validation import ValidationPrompts

    shards = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_sd3)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(shards.captions) + "\n")
    assert _encode(sd3_folder, prompts, tmp_path / "encoded") == 0
    encoded = PromptDataset(
        DataConfig(source="prompts", prompt_dir=str(tmp_path / "encoded"), resolution=64)
    )
    assert encoded.latent_shape == (16, 8, 8) and encoded.pooled_dim == shards.pooled_dim
    for i in (0, len(shards) - 1):
        ours, theirs = encoded[i], shards[i]
        assert "encoder_attention_mask" not in ours
        for key in ("encoder_hidden_states", "pooled_projections"):
            assert torch.equal(ours[key], theirs[key])
    for key in ("encoder_hidden_states", "pooled_projections"):
        assert torch.equal(encoded.null_condition[key], shards.null_condition[key])

    config = load_config(None, [f'run.validation_prompts=["{shards.captions[1]}"]'])
    validation = ValidationPrompts(config, shards, torch.device("cpu"), torch.float32)
    # Computed in float32, the shards stored float16: equal to float16's rounding.
    torch.testing.assert_close(
        validation.cond.encoder_hidden_states[0],
        shards[1]["encoder_hidden_states"],
        atol=2e-3,
        rtol=2e-3,
    )
    torch.testing.assert_close(
        validation.cond.pooled_projections[0],
        shards[1]["pooled_projections"],
        atol=2e-3,
        rtol=2e-3,
    )
    assert validation.cond.encoder_attention_mask is None


def test_sana_prompt_folder_matches_the_shards(
    sana_folder: Path, shards_sana: Path, tmp_path: Path
) -> None:
    """Sana-structured: Gemma-2 behind the complex human instruction, the empty prompt as the
    pipeline's negative prompt, the DC-AE's 32x downsampling: as precompute stores them."""
    shards = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_sana)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(shards.captions[:3]) + "\n")
    assert _encode(sana_folder, prompts, tmp_path / "encoded") == 0
    encoded = PromptDataset(
        DataConfig(source="prompts", prompt_dir=str(tmp_path / "encoded"), resolution=128)
    )
    assert encoded.latent_shape == shards.latent_shape and encoded.text_shape == shards.text_shape
    for i in range(3):
        ours, theirs = encoded[i], shards[i]
        mask = theirs["encoder_attention_mask"].bool()
        assert torch.equal(ours["encoder_attention_mask"].bool(), mask)
        assert torch.equal(
            ours["encoder_hidden_states"][mask], theirs["encoder_hidden_states"][mask]
        )
    for key in ("encoder_hidden_states", "encoder_attention_mask"):
        assert torch.equal(encoded.null_condition[key], shards.null_condition[key])
    load_config("sana_1024_prompts").check_prompt_only()  # the preset passes its own check
