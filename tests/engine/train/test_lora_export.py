"""LoRA runs end to end: exports hold diffusers LoRA files that load onto the pipeline's
transformer with peft (merged exports load without it); ``e2ed2 train`` with adapters trains,
resumes and refuses a checkpoint of another rank; per-step LoRA trains under ZeRO-3 as under
ZeRO-2, with its teacher and EMA free of the base's copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from e2ed2.engine import Conditioning, denoise
from e2ed2.engine.config import load_config
from e2ed2.engine.core.lora import (
    PerStepLoRA,
    add_lora,
    load_lora_weights,
    lora_layers,
    lora_weight_name,
)
from e2ed2.engine.core.models import build_denoiser
from e2ed2.engine.train.export import load_exported_networks, write_export

K = 2
# 1 block, 8x8 digits, K = 2: a trainer that builds in seconds (as test_run_folder's runs).
TINY = [
    "model.num_layers=1",
    "model.num_attention_heads=2",
    "model.attention_head_dim=8",
    "data.resolution=8",
    "data.text_dim=16",
    "data.caption_max_tokens=8",
    f"trajectory.num_steps={K}",
    "run.batch_per_rank=2",
    "run.log_every_steps=1",
    "run.checkpoint_every_steps=2",
    "run.num_sample_images=0",
    "run.export_at_end=false",
]


def _trained_lora(*overrides: str) -> tuple[object, torch.nn.Module]:
    """A digits config with LoRA and its denoiser with random (non-identity) adapters."""
    config = load_config(
        None, ["model.num_layers=1", f"trajectory.num_steps={K}", "model.lora_rank=4", *overrides]
    )
    torch.manual_seed(0)
    model = build_denoiser(config.model, latent_channels=1, latent_size=16, text_dim=64)
    module = add_lora(model, config.model, K)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return config, module


def _inputs() -> tuple[torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 1, 16, 16, generator=g), Conditioning(torch.randn(2, 5, 64, generator=g))


def _out(network: torch.nn.Module, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    with torch.no_grad():
        return denoise(network, x, 600, cond)


def test_shared_export_loads_into_the_pipeline_and_merged_equals_unmerged(tmp_path: Path):
    from diffusers import PixArtAlphaPipeline

    config, trained = _trained_lora()
    export = write_export(tmp_path / "export", config, trained, trained.state_dict())
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    x, cond = _inputs()
    want = _out(trained, x, cond)

    pipe = PixArtAlphaPipeline.from_pretrained(export, vae=None)
    assert not lora_layers(pipe.transformer)  # transformer/ is the frozen base
    assert not torch.allclose(_out(pipe.transformer, x, cond), want)
    load_lora_weights(pipe.transformer, export)
    torch.testing.assert_close(_out(pipe.transformer, x, cond), want, rtol=0, atol=0)
    # The pipeline runs its own sampling loop through the adapted transformer.
    images = pipe(
        "a handwritten digit three",
        num_inference_steps=K,
        guidance_scale=0.0,
        height=8 * 16,
        width=8 * 16,
        use_resolution_binning=False,
        output_type="latent",
    ).images
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()
    # e2ed2's loader (e2ed2 sample / evaluate) applies the adapter too.
    torch.testing.assert_close(_out(load_exported_networks(export, K), x, cond), want)

    merged_config, _ = _trained_lora("model.lora_merge_on_export=true")
    merged = write_export(tmp_path / "merged", merged_config, trained, trained.state_dict())
    plain = PixArtAlphaPipeline.from_pretrained(merged, vae=None).transformer
    assert not lora_layers(plain)
    torch.testing.assert_close(_out(plain, x, cond), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(load_exported_networks(merged, K), x, cond), want)


@pytest.mark.parametrize("merge", [False, True], ids=["adapters", "merged"])
def test_per_step_export_gives_each_step_its_network(tmp_path: Path, merge: bool):
    config, trained = _trained_lora(
        "model.share_across_steps=false", f"model.lora_merge_on_export={str(merge).lower()}"
    )
    export = write_export(tmp_path / "export", config, trained, trained.state_dict())
    assert not (export / "model_index.json").exists()  # no stock pipeline runs K networks
    for i in range(K):
        assert (export / lora_weight_name(f"step_{i}")).is_file()
    assert (export / "transformer_step0").is_dir() == merge
    loaded = load_exported_networks(export, K)
    assert isinstance(loaded, PerStepLoRA if not merge else torch.nn.ModuleList)
    x, cond = _inputs()
    outs = [_out(loaded[i], x, cond) for i in range(K)]
    for i in range(K):
        torch.testing.assert_close(outs[i], _out(trained[i], x, cond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0], outs[1])
    # Sampling (e2ed2 sample / evaluate) indexes the loaded networks per step.
    from e2ed2.engine import build_schedule
    from e2ed2.engine.core.sampling import generate_pixels

    pixels = [
        generate_pixels(
            nets,
            build_schedule(config.sampler, K),
            lambda z: z,
            cond,
            (1, 16, 16),
            seed=0,
            device=torch.device("cpu"),
        )
        for nets in (loaded, trained)
    ]
    torch.testing.assert_close(pixels[0], pixels[1], rtol=1e-5, atol=1e-5)
    # One step's file is a plain diffusers LoRA: it loads onto the base by itself.
    from diffusers import PixArtTransformer2DModel

    base = PixArtTransformer2DModel.from_pretrained(export / "transformer")
    load_lora_weights(base, export / lora_weight_name("step_1"))
    torch.testing.assert_close(_out(base, x, cond), _out(trained[1], x, cond))


def test_a_pretrained_base_is_linked_not_copied(tmp_path: Path) -> None:
    config, trained = _trained_lora()
    base_folder = tmp_path / "pretrained"
    from e2ed2.engine.core.lora import plain_transformer

    plain_transformer(trained).save_pretrained(base_folder)
    config = load_config(
        None,
        [
            f"model.pretrained_path={base_folder}",
            f"trajectory.num_steps={K}",
            "model.lora_rank=4",
        ],
    )
    export = write_export(tmp_path / "export", config, trained, trained.state_dict())
    assert (export / "transformer").is_symlink()
    assert (export / "transformer").resolve() == base_folder.resolve()
    x, cond = _inputs()
    torch.testing.assert_close(
        _out(load_exported_networks(export, K), x, cond), _out(trained, x, cond)
    )


# -------------------------------------------------------------------------------- training


def _train(output_dir: Path, *overrides: str) -> int:
    from e2ed2.engine.cli.train import main

    return main(["--config", "scratch", *TINY, f"run.output_dir={output_dir}", *overrides])


def test_train_with_lora_exports_resumes_and_refuses_another_rank(
    world_of_one: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert _train(out, "run.max_steps=2", "model.lora_rank=4") == 0
    export = out / "checkpoints" / "step00000002" / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    # Resumes from step 2 (the adapters, their optimizer state and EMA come back).
    assert _train(out, "run.max_steps=3", "model.lora_rank=4", "run.export_at_end=true") == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert load_exported_networks(out / "export", K) is not None
    capsys.readouterr()
    assert _train(out, "run.max_steps=4", "model.lora_rank=8") == 2
    err = capsys.readouterr().err
    assert "model.lora_rank: checkpoint 4, config 8" in err, err


def _adapter_state(export: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{i}/{k}": v
        for i in range(K)
        for k, v in load_file(str(export / lora_weight_name(f"step_{i}"))).items()
    }


def test_per_step_lora_trains_the_same_under_zero3(
    world_of_one: None, tmp_path: Path, zero3_partition_everything: str
) -> None:
    """Per-step LoRA through the trainer, under ZeRO-2 and under ZeRO-3 with every parameter
    partitioned (its hooks see one base, K adapters): the same adapters after two steps of the
    block policy. The teacher holds the base without adapters; EMA shadows the adapters only."""
    from e2ed2.engine.train.trainer import Trainer

    exported = {}
    for name, ds_config in (("zero2", "zero2"), ("zero3", zero3_partition_everything)):
        config = load_config(
            "scratch",
            [
                *TINY,
                "model.lora_rank=4",
                "model.share_across_steps=false",
                "trajectory.checkpoint=block",
                "objective.teacher_weight=1.0",
                "objective.teacher_steps=4",
                "run.max_steps=2",
                "run.checkpoint_every_steps=100",
                "run.export_at_end=true",
                f"run.deepspeed_config={ds_config}",
                f"run.output_dir={tmp_path / name}",
            ],
        )
        trainer = Trainer(config)
        module = trainer.engine.module
        assert isinstance(module, PerStepLoRA) and not lora_layers(trainer.teacher.network)
        trainable = [p for p in module.parameters() if p.requires_grad]
        assert len(trainer.ema.params) == len(trainable) == 2 * K * len(lora_layers(module))
        trainer.train()
        exported[name] = _adapter_state(tmp_path / name / "export")
    assert exported["zero2"].keys() == exported["zero3"].keys()
    # peft starts B at 0: non-zero B means the adapters trained (the comparison is not vacuous).
    assert all(v.abs().sum() > 0 for k, v in exported["zero2"].items() if "lora_B" in k)
    for key, value in exported["zero2"].items():
        torch.testing.assert_close(exported["zero3"][key], value, rtol=1e-5, atol=1e-6)


def test_targets_matching_no_module_are_a_config_error(
    world_of_one: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = _train(
        tmp_path / "run",
        "run.max_steps=1",
        "model.lora_rank=4",
        'model.lora_target_modules=["to_qq"]',
    )
    err = capsys.readouterr().err
    assert code == 2 and "model.lora_target_modules=['to_qq'] match no module" in err, err
