"""Paths confined to the user's roots (data/paths.py), per reader: precompute's images, sidecars
and captions.jsonl; a shard folder's index, shard files and null condition."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2ed2.engine.cli.precompute import main
from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data.null_condition import NULL_CONDITION_FILE, read_null_condition
from e2ed2.engine.data.paths import ConfinedRoot, PathOutsideRoot
from e2ed2.engine.data.precompute import precompute
from e2ed2.engine.data.shards import LatentShardDataset, read_index


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)


def test_confined_root_resolves_links_and_dots(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("private")
    (root / "a.txt").write_text("fine")
    os.symlink(tmp_path / "secret.txt", root / "out.txt")
    os.symlink(root / "a.txt", root / "sub" / "in.txt")  # a link inside the root is followed
    confined = ConfinedRoot(root, "image_dir")
    assert confined.resolve("sub/in.txt") == (root / "a.txt").resolve()
    assert confined.resolve("sub/../a.txt") == (root / "a.txt").resolve()
    for bad in ("out.txt", "../secret.txt", "sub/../../secret.txt", str(tmp_path / "secret.txt")):
        with pytest.raises(PathOutsideRoot, match=r"outside image_dir") as caught:
            confined.resolve(bad)
        assert repr(bad) in str(caught.value)  # the path as the user wrote it
    # A root reached through a link is its target: paths inside the target stay inside.
    os.symlink(root, tmp_path / "alias")
    assert ConfinedRoot(tmp_path / "alias", "image_dir").resolve("a.txt").read_text() == "fine"


def test_precompute_skips_and_lists_what_leaves_the_folder(tmp_path: Path, tiny_models) -> None:
    vae, t5 = tiny_models
    images, outside = tmp_path / "images", tmp_path / "elsewhere"
    _png(images / "a.png", 10)
    _png(images / "b.png", 20)
    (images / "b.txt").write_text("a fine sidecar")
    _png(images / "c.png", 30)
    _png(outside / "photo.png", 40)
    (outside / "secret.txt").write_text("the private text of another file")
    os.symlink(outside / "photo.png", images / "linked.png")  # image link out
    (images / "linked.txt").write_text("caption of a linked image")
    os.symlink(outside / "secret.txt", images / "c.txt")  # sidecar link out
    os.symlink(images / "a.png", images / "alias.png")  # a link inside: kept
    lines = [
        {"file": "a.png", "caption": "the first"},
        {"file": "alias.png", "caption": "the first again"},
        {"file": "../elsewhere/photo.png", "caption": "leaves"},
    ]
    (images / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    index = precompute(
        images,
        tmp_path / "out",
        vae_path=vae,
        text_encoder_path=t5,
        resolution=8,
        caption_max_tokens=8,
        progress=False,
    )
    skipped = {entry["path"]: entry["reason"] for entry in index["skipped"]}
    assert set(skipped) == {"linked.png", "c.png", "captions.jsonl:3"}
    assert "path outside the dataset" in skipped["linked.png"]
    assert str(outside / "photo.png") in skipped["linked.png"]
    assert "sidecar caption outside the dataset" in skipped["c.png"]
    assert "'../elsewhere/photo.png'" in skipped["captions.jsonl:3"]
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path / "out")))
    assert dataset.files == ["a.png", "alias.png", "b.png"]
    assert dataset.captions == ["the first", "the first again", "a fine sidecar"]


def test_a_caption_file_linked_from_outside_is_refused_by_name(
    tmp_path: Path, tiny_models, capsys
) -> None:
    vae, t5 = tiny_models
    images = tmp_path / "images"
    _png(images / "a.png", 10)
    (tmp_path / "list.jsonl").write_text(json.dumps({"file": "a.png", "caption": "x"}) + "\n")
    os.symlink(tmp_path / "list.jsonl", images / "captions.jsonl")
    argv = [str(images), str(tmp_path / "out"), "--vae", str(vae), "--text-encoder", str(t5)]
    assert main([*argv, "--resolution", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'captions.jsonl' resolves to" in err and "outside image_dir" in err
    assert not (tmp_path / "out" / "index.json").exists()


def test_a_shard_folder_reads_only_its_own_files(tmp_path: Path, tiny_models) -> None:
    vae, t5 = tiny_models
    _png(tmp_path / "images" / "a.png", 10)
    (tmp_path / "images" / "a.txt").write_text("a caption")
    good = tmp_path / "good"
    precompute(
        tmp_path / "images",
        good,
        vae_path=vae,
        text_encoder_path=t5,
        resolution=8,
        caption_max_tokens=8,
        progress=False,
    )
    original = {p.name: p.read_bytes() for p in good.iterdir()}

    # An index naming a shard outside the folder (here: the good folder's, by "..").
    escaped = tmp_path / "escaped"
    escaped.mkdir()
    index = json.loads((good / "index.json").read_text())
    index["shards"][0]["file"] = "../good/shard-00000.safetensors"
    (escaped / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shards\[0\]\.file '\.\./good/shard-00000.*outside"):
        read_index(str(escaped))
    index["shards"][0]["file"] = str(good / "shard-00000.safetensors")  # absolute: the same
    (escaped / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shards\[0\]\.file .*outside data\.shard_dir"):
        LatentShardDataset(DataConfig(source="shards", shard_dir=str(escaped)))

    # index.json and null_condition.safetensors as links out of the folder.
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(good / "shard-00000.safetensors", linked)
    os.symlink(good / "index.json", linked / "index.json")
    with pytest.raises(ValueError, match=r"'index\.json' resolves to .*outside data\.shard_dir"):
        read_index(str(linked))
    (linked / "index.json").unlink()
    shutil.copy(good / "index.json", linked)
    os.symlink(good / NULL_CONDITION_FILE, linked / NULL_CONDITION_FILE)
    assert len(LatentShardDataset(DataConfig(source="shards", shard_dir=str(linked)))) == 1
    with pytest.raises(ValueError, match=rf"'{NULL_CONDITION_FILE}' resolves to .*outside"):
        read_null_condition(linked, tuple(index["text"]["shape"]))
    # Nothing of the good folder changed.
    assert {p.name: p.read_bytes() for p in good.iterdir()} == original


def test_a_prompt_folder_reads_only_its_own_files(tmp_path: Path) -> None:
    """data/prompts_source.py: the shard files a prompt folder's index names, and the index
    itself, stay inside data.prompt_dir (refused before any shard is opened)."""
    import torch
    from safetensors.torch import save_file

    from e2ed2.engine.data.prompts_source import PROMPTS_FORMAT, PromptDataset

    outside = tmp_path / "other"
    outside.mkdir()
    save_file({"encoder_hidden_states": torch.zeros(1, 4, 8)}, outside / "p.safetensors")
    folder = tmp_path / "prompts"
    folder.mkdir()
    index = {
        "format": PROMPTS_FORMAT,
        "version": 1,
        "num_samples": 1,
        "shards": [{"file": "../other/p.safetensors", "num_samples": 1}],
        "text": {"shape": [4, 8], "dtype": "float16"},
        "latent": {"channels": 4, "downsample": 8},
    }
    (folder / "index.json").write_text(json.dumps(index))
    config = DataConfig(source="prompts", prompt_dir=str(folder), resolution=64)
    with pytest.raises(ValueError, match=r"shards\[0\]\.file '\.\./other/p\.safetensors' resolves"):
        PromptDataset(config)
    index["shards"][0]["file"] = str(outside / "p.safetensors")  # absolute: the same
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shards\[0\]\.file .*outside data\.prompt_dir"):
        PromptDataset(config)
    # index.json as a link out of the folder.
    shutil.copy(folder / "index.json", outside / "index.json")
    (folder / "index.json").unlink()
    os.symlink(outside / "index.json", folder / "index.json")
    with pytest.raises(ValueError, match=r"'index\.json' resolves to .*outside data\.prompt_dir"):
        PromptDataset(config)
