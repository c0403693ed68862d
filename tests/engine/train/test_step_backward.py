"""``trajectory.per_step_backward`` through the trainer: one DeepSpeed micro-step per sampler
step trains the weights that one backward per micro-batch trains, under every shipped ZeRO stage,
with gradient accumulation; and the config refuses what it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from e2ed2.engine.config import ConfigError, load_config

_TINY = [
    "model.num_layers=2",
    "model.num_attention_heads=2",
    "model.attention_head_dim=8",
    "data.resolution=8",
    "data.text_dim=16",
    "data.caption_max_tokens=8",
    "trajectory.num_steps=3",
    "trajectory.checkpoint=block_offload",
    "run.batch_per_rank=2",
    "run.grad_accum_steps=2",
    "run.num_sample_images=0",
    "run.export_at_end=false",
    "run.checkpoint_every_steps=100",
    "optim.lr=1e-3",
]
_PER_STEP = "trajectory.per_step_backward=true"


def _step_gradients(out: Path, ds_config: str, *extra: str) -> list[dict[str, torch.Tensor]]:
    """The full (gathered) gradient the optimizer applies at each of two optimizer steps of two
    micro-batches each: read at the accumulation boundary, just before ``engine.step()``."""
    from deepspeed.utils import safe_get_full_grad

    from e2ed2.engine.train.trainer import Trainer

    config = load_config(
        "scratch",
        [
            *_TINY,
            f"run.deepspeed_config={ds_config}",
            f"run.output_dir={out}",
            *extra,
        ],
    )
    trainer = Trainer(config)
    engine, guard_step = trainer.engine, trainer.guard.step
    applied: list[dict[str, torch.Tensor]] = []

    def read_then_step() -> bool:
        if engine.is_gradient_accumulation_boundary():
            applied.append(
                {
                    n: safe_get_full_grad(p).float().clone()
                    for n, p in engine.module.named_parameters()
                }
            )
        return guard_step()

    trainer.guard.step = read_then_step
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.train_step(batches)
    assert engine.global_steps == 2 and len(applied) == 2, "one optimizer step per train_step"
    return applied


def _worst_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Largest element error relative to the largest gradient element. (Per tensor would not
    do: the attention key biases have a zero gradient in exact arithmetic, ~1e-9 of rounding
    noise in practice, and any two summation orders give different noise.)"""
    scale = max(g.abs().max() for g in ref.values())
    assert scale > 0
    return max(((got[n] - g).abs().max() / scale).item() for n, g in ref.items())


@pytest.mark.parametrize("ds_config", ["none", "zero2", "zero3"])
def test_per_step_backward_applies_the_gradients_of_one_backward(
    world_of_one: None, tmp_path: Path, ds_config: str, zero3_partition_everything: str
) -> None:
    """fp32, K = 3, 2 micro-batches per optimizer step, 2 steps: the optimizer applies the same
    gradients. ZeRO-3 with every parameter partitioned: each piece must be a micro-step of its
    own to ZeRO, or its copy-then-add accumulation would overwrite earlier pieces' gradients."""
    if ds_config == "zero3":
        ds_config = zero3_partition_everything
    whole = _step_gradients(tmp_path / "whole", ds_config)
    stepwise = _step_gradients(tmp_path / "stepwise", ds_config, _PER_STEP)
    for step, (got, ref) in enumerate(zip(stepwise, whole, strict=True), start=1):
        worst = _worst_error(got, ref)
        assert worst <= 1e-5, f"step {step}: relative gradient error {worst:.2e}"


def test_per_step_backward_in_bf16_under_zero3_with_gan(
    world_of_one: None, tmp_path: Path, zero3_partition_everything: str
) -> None:
    """bf16 (the presets' precision) with the GAN term: the same gradients within bf16 rounding
    (the K-term gradient sum is added in another order)."""
    extra = ("run.precision=bf16", "gan.enabled=true", "gan.base_channels=8")
    whole = _step_gradients(tmp_path / "whole", zero3_partition_everything, *extra)
    stepwise = _step_gradients(tmp_path / "stepwise", zero3_partition_everything, _PER_STEP, *extra)
    for got, ref in zip(stepwise, whole, strict=True):
        worst = _worst_error(got, ref)
        assert worst <= 2e-2, f"bf16: relative gradient error {worst:.2e}"


@pytest.mark.parametrize(
    "cut",
    [
        ["trajectory.rows_per_pass=3"],
        ["trajectory.rows_per_pass=1", _PER_STEP],
    ],
    ids=["passes_of_3", "passes_of_1_per_step"],
)
def test_row_passes_apply_the_gradients_of_one_batch(
    world_of_one: None, tmp_path: Path, zero3_partition_everything: str, cut: list[str]
) -> None:
    """m = 2 trajectories per prompt scored by the energy score (which compares a prompt's two
    samples, here split across passes), 4 rows per micro-batch in passes, ZeRO-3: the optimizer
    applies the gradients of one batch."""
    energy = ("trajectory.samples_per_prompt=2", "objective.energy_weight=1.0")
    whole = _step_gradients(tmp_path / "whole", zero3_partition_everything, *energy)
    passes = _step_gradients(tmp_path / "passes", zero3_partition_everything, *energy, *cut)
    for step, (got, ref) in enumerate(zip(passes, whole, strict=True), start=1):
        worst = _worst_error(got, ref)
        assert worst <= 1e-5, f"step {step}: relative gradient error {worst:.2e}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.kind=diffusion"], "objective.kind='e2ed2'"),
        (["model.share_across_steps=false"], "share_across_steps=true"),
        (["run.precision=fp16"], "bf16 or fp32"),
        (
            [
                "trajectory.per_step_backward=false",
                "trajectory.rows_per_pass=2",
                "run.precision=fp16",
            ],
            r"rows_per_pass=2 \(of run.batch_per_rank x trajectory.samples_per_prompt = 8 rows\)",
        ),
        (["trajectory.rows_per_pass=-1"], "rows_per_pass must be >= 0"),
    ],
)
def test_config_refuses_what_per_step_backward_cannot_run(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("scratch", ["trajectory.per_step_backward=true", *overrides])
