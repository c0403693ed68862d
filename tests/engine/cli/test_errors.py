"""The error boundary of every command: a wrong value, argument or path is one line naming it,
exit 2, no traceback, nothing written; a bug is one line (exit 1) whose traceback ``--debug``
shows. Nothing here trains: each case fails before a model is built."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from e2ed2.engine.config import config_to_toml, load_config

TINY = ["model.num_layers=1", "data.resolution=8", "trajectory.num_steps=2"]
# `e2ed2 train` defaults to the embedded main job; these tests train the from-scratch toy.
TRAIN = ["--config", "scratch", *TINY]


def _check(err: str, prog: str, *names: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prog) or "error:" in line]
    assert lines, err
    for name in names:
        assert name in lines[-1], (name, err)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lr=nan", "optim.lr must be a finite number"),
        ("optim.eps=inf", "optim.eps must be a finite number"),
        ("sampler.timestep_scaling=nan", "sampler.timestep_scaling"),
        ("sampler.timestep_scaling=0", "sampler.timestep_scaling must be > 0"),
        ("model.patch_size=3", "model.patch_size=3 does not divide data.resolution=8"),
        ("trajectory.num_steps=51", "trajectory.num_steps=51 must be in 1..50"),
        ("trajectory.offload_device=gpu0", "trajectory.offload_device='gpu0'"),
        ("run.resume_from=0", "run.resume_from"),
    ],
)
def test_a_bad_value_is_refused_by_the_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, override: str, named: str
) -> None:
    from e2ed2.engine.cli.main import main

    out = tmp_path / "run"
    assert main(["train", "--dry-run", *TRAIN, f"run.output_dir={out}", override]) == 2
    _check(capsys.readouterr().err, "e2ed2 train: config error:", named)
    assert not out.exists()


def test_ddim_steps_beyond_its_schedule_and_path_kinds_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from e2ed2.engine.cli.main import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for overrides, named in (
        (
            ["sampler.kind=ddim", "sampler.num_train_timesteps=10", "trajectory.num_steps=12"],
            "trajectory.num_steps=12 must be in 1..10: the schedule has sampler.num_train_timesteps=10",
        ),
        ([f"run.output_dir={a_file}"], f"run.output_dir='{a_file}' is a file"),
        ([f"run.resume_from={tmp_path / 'nowhere'}"], "run.resume_from="),
        (["data.source=shards", f"data.shard_dir={a_file}"], "data.shard_dir"),
    ):
        before = a_file.read_text()
        assert main(["train", "--dry-run", *TRAIN, *overrides]) == 2, overrides
        _check(capsys.readouterr().err, "e2ed2 train:", named)
        assert a_file.read_text() == before


@pytest.mark.parametrize(
    ("command", "argv", "named"),
    [
        ("sample", ["--num-steps", "0"], "argument --num-steps: must be an integer >= 1, got 0"),
        ("sample", ["--num-images", "-1"], "argument --num-images"),
        ("sample", ["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        ("evaluate", ["--seeds", "0", "-3"], "argument --seeds"),
        ("evaluate", ["--batch-size", "0"], "argument --batch-size"),
        ("evaluate", ["--num-steps", "two"], "argument --num-steps: expected an integer"),
        ("precompute", ["--resolution", "4"], "argument --resolution: must be an integer >= 8"),
        ("precompute", ["--shard-size", "0"], "argument --shard-size"),
    ],
)
def test_cli_arguments_are_range_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str, argv: list[str], named: str
) -> None:
    from e2ed2.engine.cli.main import main

    positional = (
        [str(tmp_path)] if command != "precompute" else [str(tmp_path), str(tmp_path / "o")]
    )
    required = ["--vae", "v", "--text-encoder", "t"] if command == "precompute" else []
    assert main([command, *positional, *required, *argv]) == 2
    _check(capsys.readouterr().err, f"e2ed2 {command}:", named)
    assert sorted(tmp_path.iterdir()) == []


def test_sample_refuses_more_steps_than_the_schedule_has(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Checked against the export's own sampler before any model is loaded."""
    from e2ed2.engine.cli.main import main
    from e2ed2.engine.train.export import CONFIG_NAME

    (tmp_path / CONFIG_NAME).write_text(config_to_toml(load_config(None, TINY)))
    assert main(["sample", str(tmp_path), "--num-steps", "51"]) == 2
    _check(capsys.readouterr().err, "e2ed2 sample:", "--num-steps=51 must be in 1..50")


def test_a_bug_is_one_line_and_debug_shows_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from e2ed2.engine.cli.main import main
    from e2ed2.engine.train import trainer as trainer_module

    def broken(self, config) -> None:
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(trainer_module.Trainer, "__init__", broken)
    argv = ["train", *TRAIN, f"run.output_dir={tmp_path / 'run'}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(
        r"^e2ed2 train: internal error \(a bug.*\): RuntimeError: an invariant broke "
        r"\(rerun with --debug or E2ED2_DEBUG=1 for the traceback\)$",
        err,
        re.M,
    ), err
    assert main(["--debug", *argv]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("E2ED2_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_an_unwritable_file_is_named_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from e2ed2.engine.cli.main import main
    from e2ed2.engine.train import trainer as trainer_module

    def denied(self, config) -> None:
        raise PermissionError(13, "Permission denied", "/data/shards/index.json")

    monkeypatch.setattr(trainer_module.Trainer, "__init__", denied)
    assert main(["train", *TRAIN, f"run.output_dir={tmp_path / 'run'}"]) == 2
    _check(capsys.readouterr().err, "e2ed2 train: error:", "/data/shards/index.json")
