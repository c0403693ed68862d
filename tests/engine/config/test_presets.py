"""Shipped presets and DeepSpeed JSONs: each loads, validates and is installed as package data."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib

from e2ed2.engine.config import (
    TrainConfig,
    config_to_toml,
    field_docs,
    load_config,
    shipped_ds_configs,
    shipped_presets,
)
from e2ed2.engine.config.base import ConfigError
from e2ed2.engine.config.presets import resolve_preset
from e2ed2.engine.train.distributed import build_ds_config

ROOT = Path(__file__).resolve().parents[3]


def test_the_shipped_presets_are_the_configs_folder() -> None:
    assert set(shipped_presets()) == {p.stem for p in (ROOT / "configs").glob("*.toml")}
    assert set(shipped_ds_configs()) == {p.stem for p in (ROOT / "ds_configs").glob("*.json")}
    assert {"embedded", "scratch", "pixart_alpha_512", "pixart_alpha_1024"} <= set(
        shipped_presets()
    )


@pytest.mark.parametrize("name", sorted(shipped_presets()))
def test_every_preset_loads_and_validates(name: str) -> None:
    by_name = load_config(name)
    by_path = load_config(str(ROOT / "configs" / f"{name}.toml"))
    assert by_name == by_path
    # Its DeepSpeed JSON resolves and agrees with the run config for one and eight ranks.
    for world_size in (1, 8):
        build_ds_config(
            by_name.run.deepspeed_config,
            batch_per_rank=by_name.run.batch_per_rank,
            grad_accum_steps=by_name.run.grad_accum_steps,
            world_size=world_size,
            optim=by_name.optim,
            precision=by_name.run.precision,
        )
    # The written config (with its field docs as comments) reads back to the same config.
    written = config_to_toml(by_name)
    assert tomllib.loads(written)
    assert load_config_text(written) == by_name


def load_config_text(text: str) -> TrainConfig:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    return load_config(f.name)


def test_the_scratch_preset_is_the_dataclass_default() -> None:
    assert load_config("scratch") == load_config(None)


@pytest.mark.parametrize("name", sorted(shipped_ds_configs()))
def test_every_ds_config_holds_only_deepspeed_keys(name: str) -> None:
    config = json.loads(Path(shipped_ds_configs()[name]).read_text())
    assert not [key for key in config if key.startswith("e2ed2")], config


def test_every_field_is_documented() -> None:
    """Every field has an attribute docstring; the dry run and config.toml carry them."""
    config = TrainConfig()
    for section in fields(config):
        cls = type(getattr(config, section.name))
        undocumented = {f.name for f in fields(cls)} - set(field_docs(cls))
        assert not undocumented, f"[{section.name}] undocumented: {sorted(undocumented)}"
    text = config_to_toml(config)
    assert "# Resume from the newest complete checkpoint" in text
    assert "# K: sampler steps run with gradients" in text


def test_an_unknown_preset_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"does not exist \(shipped presets: embedded, pixart"):
        resolve_preset("pixart_alpha_2048")


def test_bad_choices_come_from_the_literal_types() -> None:
    with pytest.raises(ConfigError, match=r"sampler\.beta_schedule='cosine' is not one of"):
        load_config(None, ["sampler.beta_schedule=cosine"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be a finite number, got nan"):
        load_config(None, ["optim.lr=nan"])


@pytest.mark.slow
def test_a_built_wheel_ships_presets_and_ds_configs_and_dry_runs_elsewhere(tmp_path: Path) -> None:
    """``pip install .`` (not editable) carries configs/ and ds_configs/; the installed package
    dry-runs a shipped preset from an unrelated directory."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("e2ed2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in (ROOT / "configs").glob("*.toml"):
        assert f"e2ed2/configs/{preset.name}" in names
    for ds_config in (ROOT / "ds_configs").glob("*.json"):
        assert f"e2ed2/ds_configs/{ds_config.name}" in names
    assert "e2ed2/engine/core/trajectory.py" in names and "e2ed2/kernels/__init__.py" in names
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import sys, e2ed2.engine.cli.main as m;"
        f"assert m.__file__.startswith({str(site)!r}), m.__file__;"
        "sys.exit(m.main(['train', '--config', 'pixart_alpha_512', '--dry-run']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    # The preset names local weight folders that do not exist here: the dry run prints the
    # resolved config, then stops at the launch check naming the missing folder (exit 2).
    assert 'deepspeed_config = "zero3"' in done.stdout, done.stderr
    assert done.returncode == 2 and "model.pretrained_path" in done.stderr, done.stderr
