"""Training with classifier-free guidance: the trainer brings the data's null conditioning to the
unroll, the teacher and the sample grid; a shard folder without one is refused at start."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from e2ed2.engine.config import ConfigError, load_config
from e2ed2.engine.data.null_condition import NULL_CONDITION_FILE

_GUIDED_RUN = [
    "run.max_steps=1",
    "run.batch_per_rank=2",
    "run.num_sample_images=2",
    "run.export_at_end=false",
    "run.deepspeed_config=none",
    "model.num_layers=1",
    "model.num_attention_heads=2",
    "model.attention_head_dim=8",
    "data.resolution=8",
    "data.text_dim=16",
    "data.caption_max_tokens=8",
    "trajectory.num_steps=2",
    "objective.l2_weight=0",
    "objective.teacher_weight=1",
    "objective.teacher_sampler=lcm",
    "objective.teacher_steps=2",
    "sampler.guidance_scale=4.5",
]


def test_guided_student_teacher_and_grid(tmp_path: Path) -> None:
    """Teacher = the initial student on its own path (LCM, K steps), both guided: the first loss
    is exactly 0; every network call of the step (student, teacher, recompute) and of the
    sample grid runs the doubled batch; the batch carries the data's empty prompt."""
    from e2ed2.engine.train.trainer import Trainer

    trainer = Trainer(load_config(None, [f"run.output_dir={tmp_path}", *_GUIDED_RUN]))
    assert trainer.teacher.schedule.config.guidance_scale == 4.5
    assert trainer.teacher.walks_student_path(trainer.schedule)
    batches: list[int] = []
    for network in (trainer.engine.module, trainer.teacher.network):
        network.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    terms = trainer.train_step(iter(trainer.loader))
    assert terms["teacher"] == 0.0
    # K = 2 student calls, 2 teacher calls, 2 recomputes in backward (checkpoint 'step'):
    # each on 2 x batch 2.
    assert batches == [4] * 6
    batches.clear()
    assert trainer.write_samples().is_file()
    assert batches == [4, 4]  # K = 2 calls on 2 x 2 prompts

    cond = trainer._batch_to_device(next(iter(trainer.loader)))[1]
    assert cond.unconditional is not None and torch.equal(
        cond.unconditional.encoder_hidden_states,
        trainer.loader.dataset.null_condition["encoder_hidden_states"],
    )


def test_shards_without_a_null_condition_are_refused_at_start(
    shards_512: Path, tmp_path: Path
) -> None:
    from e2ed2.engine.train.dry_run import dry_run_forward
    from e2ed2.engine.train.trainer import Trainer

    old = tmp_path / "old-shards"
    shutil.copytree(shards_512, old)
    (old / NULL_CONDITION_FILE).unlink()
    config = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            *_GUIDED_RUN,
            "data.source=shards",
            f"data.shard_dir={old}",
            "data.num_workers=0",
        ],
    )
    with pytest.raises(ConfigError, match=rf"\[sampler\].*{old}.*e2ed2 null-condition"):
        Trainer(config)
    # The dry run refuses it too, and runs the guided (doubled) call where the data has one.
    with pytest.raises(ValueError, match=rf"{old}.*no null_condition"):
        dry_run_forward(config)
    guided = dataclasses.replace(
        config, data=dataclasses.replace(config.data, shard_dir=str(shards_512))
    )
    assert "guidance_scale 4.5 (doubled batch)" in dry_run_forward(guided)


def test_a_guided_export_says_so_and_samples_guided(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from e2ed2.engine.cli.main import main
    from e2ed2.engine.core.models import build_denoiser
    from e2ed2.engine.train.export import write_export

    config = load_config(
        None,
        ["model.num_layers=1", "data.resolution=8", "trajectory.num_steps=2", *_GUIDED_RUN[-1:]],
    )
    torch.manual_seed(0)
    model = build_denoiser(config.model, latent_channels=1, latent_size=8, text_dim=64)
    export = write_export(tmp_path / "export", config, model, model.state_dict())
    assert "num_inference_steps=2, guidance_scale=4.5)" in (export / "README.md").read_text()
    assert main(["sample", str(export), "--num-images", "2"]) == 0
    assert "(K=2, guidance_scale=4.5)" in capsys.readouterr().out
    assert main(["sample", str(export), "--guidance-scale", "0.5"]) == 2
    assert "sampler.guidance_scale must be >= 1" in capsys.readouterr().err
