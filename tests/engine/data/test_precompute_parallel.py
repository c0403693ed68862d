"""``e2ed2 precompute`` at scale: N processes give the folder of one, and a run killed mid-chunk
resumes into the folder of an uninterrupted run (data/precompute_parallel.py)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from e2ed2.engine.data.precompute import precompute
from e2ed2.engine.data.precompute_parallel import FAIL_AFTER_CHUNK_ENV, ChunkFailed

RESOLUTION = 16
#: 9 images (one unreadable) in chunks of 2 records: chunks 0..4, the last of one record.
IMAGES = 9
SHARD_SIZE = 2


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for number in range(IMAGES):
        g = torch.Generator().manual_seed(number)
        pixels = torch.randint(0, 256, (12 + number, 20, 3), generator=g, dtype=torch.uint8)
        path = root / f"img{number}.png"
        Image.fromarray(pixels.numpy()).save(path)
        (root / f"img{number}.txt").write_text(f"caption number {number}")
    (root / "img4.png").write_bytes(b"not a png")  # listed as skipped, in chunk 2
    return root


def _hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (dot files too): its path -> sha256."""
    return {
        os.fspath(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(images: Path, out: Path, models: tuple[Path, Path], **kwargs) -> dict:
    vae, t5 = models
    return precompute(
        images,
        out,
        vae_path=vae,
        text_encoder_path=t5,
        resolution=RESOLUTION,
        caption_max_tokens=16,
        shard_size=SHARD_SIZE,
        **{"progress": False, "batch_size": 2, **kwargs},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> tuple[Path, Path]:
    """(image folder, its shard folder from one uninterrupted process)."""
    root = tmp_path_factory.mktemp("parallel")
    images = _folder(root / "images")
    index = _run(images, root / "one", tiny_models)
    assert index["num_samples"] == IMAGES - 1
    assert [entry["path"] for entry in index["skipped"]] == ["img4.png"]
    assert "created" not in index  # no time stamp: resumed and parallel folders hash equal
    return images, root / "one"


def test_two_processes_write_the_folder_of_one(reference, tmp_path, tiny_models, capsys) -> None:
    images, one = reference
    index = _run(images, tmp_path / "two", tiny_models, num_processes=2, progress=True)
    assert _hashes(tmp_path / "two") == _hashes(one)
    # The folder holds the index's files only: no state folder, no temporary files.
    assert sorted(_hashes(one)) == sorted(
        ["index.json", "null_condition.safetensors", *(s["file"] for s in index["shards"])]
    )
    assert [s["file"] for s in index["shards"]] == [
        f"shard-{chunk:05d}.safetensors" for chunk in range(5)
    ]
    # One bar for the whole run, fed by both workers: every image, a rate.
    bar = capsys.readouterr().err
    assert f"{IMAGES}/{IMAGES}" in bar and "img/s" in bar


def test_a_run_killed_mid_chunk_resumes_into_the_same_folder(
    reference, tmp_path, tiny_models, monkeypatch, caplog
) -> None:
    images, one = reference
    out = tmp_path / "resumed"
    # Worker 1 (chunks 1, 3) is killed after writing chunk 3's shard, before its manifest;
    # worker 0 finishes chunks 0, 2, 4.
    monkeypatch.setenv(FAIL_AFTER_CHUNK_ENV, "3")
    with pytest.raises(ChunkFailed, match="worker 1 killed by signal 9.*rerun the same command"):
        _run(images, out, tiny_models, num_processes=2)
    assert not (out / "index.json").exists()
    finished = {int(p.stem.split("-")[1]) for p in (out / ".precompute").glob("chunk-*.json")}
    assert finished == {0, 1, 2, 4}
    assert (out / "shard-00003.safetensors").is_file()  # written, never published
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}

    monkeypatch.delenv(FAIL_AFTER_CHUNK_ENV)
    with pytest.raises(FileExistsError, match="other settings.*batch_size"):
        _run(images, out, tiny_models, batch_size=1)  # a resume must not mix settings
    caplog.set_level(logging.INFO, logger="e2ed2.engine.data.precompute")
    _run(images, out, tiny_models)  # resumed by one process
    assert _hashes(out) == _hashes(one)
    encoded = [r.getMessage() for r in caplog.records if " encoded: " in r.getMessage()]
    assert encoded == ["chunk 3 encoded: 2 samples in 1 files"]  # only the unfinished chunk
    for name, stamp in kept.items():  # finished chunks' files untouched, chunk 3's rewritten
        now = ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns)
        assert (now == stamp) == (name != "shard-00003.safetensors"), name


@pytest.mark.slow
def test_two_launcher_ranks_write_the_folder_of_one(
    reference, tmp_path, tiny_models, run_checked, deepspeed_command
) -> None:
    """The real deepspeed launcher, 2 ranks on CPU: each rank encodes its chunks, rank 0
    merges; the folder equals one process's."""
    images, one = reference
    vae, t5 = tiny_models
    out = tmp_path / "ranks"
    output = run_checked(
        deepspeed_command(
            "--module",
            "e2ed2.engine.cli.precompute",
            str(images),
            str(out),
            *("--vae", str(vae), "--text-encoder", str(t5), "--resolution", str(RESOLUTION)),
            *("--max-tokens", "16", "--batch-size", "2", "--shard-size", str(SHARD_SIZE)),
        )
    )
    hashes = _hashes(out)
    hashes.pop(".e2ed2.lock")  # the CLI's one-run lock (its holder's pid and start time)
    assert hashes == _hashes(one)
    # Rank 1 encoded the odd chunks, rank 0 the even ones.
    for chunk in range(5):
        assert f"chunk {chunk} encoded" in output
    assert output.count("wrote 8 samples in 5 shards") == 2  # both ranks return the index
