"""A shard folder whose latent sides do not split into the transformer's patches is refused at
launch, naming the key: model.patch_size, or a pretrained transformer's own patch size (only its
config.json knows it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2ed2.engine.config.base import ConfigError
from e2ed2.engine.config.loader import load_config
from e2ed2.engine.data.shards import INDEX_FORMAT, INDEX_VERSION
from e2ed2.engine.train.launch import check_launch


def _shard_index(folder: Path, latent_side: int) -> Path:
    """An index of one bucket of (4, side, side) latents (launch reads the index only)."""
    folder.mkdir(parents=True)
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "num_samples": 1,
        "shards": [{"file": "shard-00000.safetensors", "num_samples": 1, "bucket": 0}],
        "latent": {"kind": "distribution", "shape": [4, latent_side, latent_side]},
        "bucket_table": "none",
        "buckets": [
            {
                "height": 8 * latent_side,
                "width": 8 * latent_side,
                "latent_shape": [4, latent_side, latent_side],
                "num_samples": 1,
            }
        ],
        "text": {"shape": [8, 16], "dtype": "float16"},
    }
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def _pretrained(folder: Path, patch_size: int) -> Path:
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"patch_size": patch_size}))
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return folder


def test_latent_sides_must_split_into_patches(tmp_path: Path) -> None:
    odd = _shard_index(tmp_path / "odd", 6)  # e.g. --resolution 48 through an 8x VAE
    shards = ["data.source=shards", f"data.shard_dir={odd}", f"run.output_dir={tmp_path / 'r'}"]
    config = load_config(None, [*shards, "model.patch_size=4"])
    with pytest.raises(
        ConfigError, match=r"model\.patch_size=4 does not divide the latent size 6x6 of data\.sh"
    ):
        check_launch(config, world_size=1)
    check_launch(load_config(None, [*shards, "model.patch_size=2"]), world_size=1)

    # A pretrained transformer: its config.json's patch_size, whatever model.patch_size says.
    four = _pretrained(tmp_path / "four", 4)
    config = load_config(None, [*shards, f"model.pretrained_path={four}"])
    with pytest.raises(ConfigError, match=r"pretrained_path='.*four': its patch_size=4 does not"):
        check_launch(config, world_size=1)
    two = _pretrained(tmp_path / "two", 2)
    check_launch(load_config(None, [*shards, f"model.pretrained_path={two}"]), world_size=1)
