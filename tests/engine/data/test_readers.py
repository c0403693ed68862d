"""Precompute's readers (data/readers/) on small real folders built here: an imagefolder with
metadata.jsonl / metadata.csv, a ``datasets`` folder and parquet files, webdataset tars. Each
gives shards equal (tensors and captions) to the same images through captions.jsonl, and skips
and lists its bad inputs."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from e2ed2.engine.cli.precompute import main
from e2ed2.engine.data.precompute import precompute
from e2ed2.engine.data.readers import detect_source, open_reader

#: name -> (width, height, mode, caption); sorted names are the captions reader's order.
IMAGES = {
    "a.png": (20, 12, "RGB", "a wide picture"),
    "b.png": (16, 16, "RGBA", "a see-through square"),
    "c.jpg": (12, 20, "RGB", "a tall photo"),
}


def _image_bytes(name: str) -> bytes:
    width, height, mode, _ = IMAGES[name]
    rng = np.random.default_rng(sorted(IMAGES).index(name))
    pixels = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(
        buffer, format="PNG" if name.endswith("png") else "JPEG"
    )
    return buffer.getvalue()


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        (folder / name).write_bytes(_image_bytes(name))


def _run(tiny_models, image_dir: Path, out: Path, **kwargs) -> dict:
    vae, t5 = tiny_models
    return precompute(
        image_dir,
        out,
        vae_path=vae,
        text_encoder_path=t5,
        resolution=8,
        caption_max_tokens=12,
        batch_size=2,
        progress=False,
        **kwargs,
    )


def _stored(out: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every stored tensor (shards concatenated in index order) and the captions."""
    index = json.loads((out / "index.json").read_text())
    tensors: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    for shard in index["shards"]:
        with safe_open(str(out / shard["file"]), framework="pt") as handle:
            captions += json.loads(handle.metadata()["captions"])
            for key in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
                tensors.setdefault(key, []).append(handle.get_tensor(key))
    return {k: torch.cat(v) for k, v in tensors.items()}, captions


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The images through the existing path: captions.jsonl."""
    root = tmp_path_factory.mktemp("reference")
    _write_images(root / "images")
    lines = [json.dumps({"file": n, "caption": c}) for n, (*_, c) in IMAGES.items()]
    (root / "images" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    _run(tiny_models, root / "images", root / "out", source="captions")
    tensors, captions = _stored(root / "out")
    assert captions == [c for *_, c in IMAGES.values()] and len(tensors["latent_mean"]) == 3
    return tensors, captions


def _assert_same_shards(out: Path, reference) -> None:
    tensors, captions = _stored(out)
    want_tensors, want_captions = reference
    assert captions == want_captions
    assert sorted(tensors) == sorted(want_tensors)
    for key, value in want_tensors.items():
        assert torch.equal(tensors[key], value), key


def test_imagefolder_metadata_jsonl_and_csv(tmp_path: Path, tiny_models, reference) -> None:
    images = tmp_path / "jsonl"
    _write_images(images)
    (images / "unlisted.png").write_bytes(_image_bytes("a.png"))
    rows = [json.dumps({"file_name": n, "text": c}).encode() for n, (*_, c) in IMAGES.items()]
    rows.insert(1, b'{"file_name": "a.png", "text": "bad \xff bytes"}')
    rows.insert(2, b"{not json")
    (images / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    assert detect_source(images) == "imagefolder"
    index = _run(tiny_models, images, tmp_path / "out_jsonl")
    _assert_same_shards(tmp_path / "out_jsonl", reference)
    assert index["source"]["reader"] == "imagefolder" and index["source"]["images_found"] == 4
    skipped = {entry["path"]: entry["reason"] for entry in index["skipped"]}
    assert set(skipped) == {"metadata.jsonl:2", "metadata.jsonl:3", "unlisted.png"}
    assert skipped["metadata.jsonl:2"].startswith("not UTF-8 text")
    assert skipped["metadata.jsonl:3"].startswith("not JSON")
    assert "no metadata row names it" in skipped["unlisted.png"]

    # metadata.csv in a split folder, another caption column, through the CLI.
    images = tmp_path / "csv"
    _write_images(images / "train")
    with open(images / "train" / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "prompt"])
        for name, (*_, caption) in IMAGES.items():
            writer.writerow([name, caption])
    with open(images / "train" / "metadata.csv", "ab") as f:
        f.write(b"a.png,caf\xe9\n")  # Latin-1 bytes: that row alone is skipped
    vae, t5 = tiny_models
    argv = [str(images), str(tmp_path / "out_csv"), "--vae", str(vae), "--text-encoder", str(t5)]
    common = ["--resolution", "8", "--max-tokens", "12", "--batch-size", "2", "--no-progress"]
    assert main([*argv, *common, "--caption-column", "prompt"]) == 0
    index = json.loads((tmp_path / "out_csv" / "index.json").read_text())
    assert [entry["path"] for entry in index["skipped"]] == ["train/metadata.csv:5"]
    tensors, captions = _stored(tmp_path / "out_csv")
    assert captions == reference[1]
    assert all(torch.equal(tensors[k], v) for k, v in reference[0].items())


def test_imagefolder_refusals_name_the_file_or_column(tmp_path: Path, tiny_models, capsys) -> None:
    images = tmp_path / "images"
    _write_images(images)
    rows = [json.dumps({"file_name": n, "caption": c}) for n, (*_, c) in IMAGES.items()]
    rows.append(json.dumps({"file_name": "../outside.png", "caption": "leaves"}))
    (images / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    # The default caption column is absent: every image is skipped, each naming it.
    with pytest.raises(ValueError, match=r"no usable images .*\(3 found, 4 skipped"):
        _run(tiny_models, images, tmp_path / "out")
    index = _run(tiny_models, images, tmp_path / "out", caption_column="caption")
    assert [entry["path"] for entry in index["skipped"]] == ["metadata.jsonl:4"]
    assert "'../outside.png' resolves to" in index["skipped"][0]["reason"]
    vae, t5 = tiny_models
    argv = [str(images), str(tmp_path / "o2"), "--vae", str(vae), "--text-encoder", str(t5)]
    assert main([*argv, "--source", "captions", "--caption-column", "x", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "captions source" in err


def _dataset(blank_caption_row: bool = False) -> datasets.Dataset:
    """The images as a datasets Image column (their bytes); optionally one more row whose
    caption is blank."""
    images = [{"bytes": _image_bytes(n), "path": n} for n in IMAGES]
    captions = [c for *_, c in IMAGES.values()]
    if blank_caption_row:
        images.insert(1, {"bytes": _image_bytes("a.png"), "path": "x.png"})
        captions.insert(1, "   ")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": captions}, features=features)


def test_hf_dataset_folder_and_parquet_files(tmp_path: Path, tiny_models, reference) -> None:
    _dataset(blank_caption_row=True).save_to_disk(str(tmp_path / "saved"))
    assert detect_source(tmp_path / "saved") == "hf"
    index = _run(tiny_models, tmp_path / "saved", tmp_path / "out_saved")
    _assert_same_shards(tmp_path / "out_saved", reference)
    assert [entry["path"] for entry in index["skipped"]] == ["row 1"]
    assert "no caption" in index["skipped"][0]["reason"]

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    _dataset().to_parquet(str(parquet / "train-00000.parquet"))
    index = _run(tiny_models, parquet, tmp_path / "out_parquet")
    _assert_same_shards(tmp_path / "out_parquet", reference)
    assert index["skipped"] == [] and index["source"]["reader"] == "hf"
    with pytest.raises(ValueError, match=r"no column 'prompt' \(--caption-column\); its columns"):
        _run(tiny_models, parquet, tmp_path / "o", caption_column="prompt")
    # A datasets folder whose state names a data file outside it is refused before loading.
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    state["_data_files"][0]["filename"] = "../parquet/train-00000.parquet"
    (tmp_path / "saved" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"'\.\./parquet/train-00000\.parquet' resolves to"):
        _run(tiny_models, tmp_path / "saved", tmp_path / "o")


def test_hf_dataset_of_image_paths_stays_inside(tmp_path: Path, tiny_models, reference) -> None:
    # A path column (relative to the dataset folder): a row pointing outside is skipped.
    root = tmp_path / "paths"
    _write_images(root)
    secret = tmp_path / "secret.png"
    secret.write_bytes(_image_bytes("a.png"))
    files = [*IMAGES, str(secret)]
    captions = [*(c for *_, c in IMAGES.values()), "the text of another file"]
    datasets.Dataset.from_dict({"file": files, "text": captions}).save_to_disk(str(root))
    index = _run(tiny_models, root, tmp_path / "out", image_column="file")
    _assert_same_shards(tmp_path / "out", reference)
    assert [entry["path"] for entry in index["skipped"]] == ["row 3"]
    assert f"'{secret}' resolves to" in index["skipped"][0]["reason"]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_webdataset_tars_read_as_a_stream(tmp_path: Path, tiny_models, reference) -> None:
    shards, outside = tmp_path / "tars", tmp_path / "elsewhere"
    shards.mkdir()
    outside.mkdir()
    (a, b, c) = IMAGES
    _tar(
        shards / "part-0.tar",
        {
            f"s/000.{a[-3:]}": _image_bytes(a),
            "s/000.txt": IMAGES[a][3].encode(),
            "s/001.png": _image_bytes(b),  # its caption in the .json
            "s/001.json": json.dumps({"text": IMAGES[b][3]}).encode(),
            "s/002.png": _image_bytes(a),  # no caption
        },
    )
    _tar(shards / "part-1.tar", {"003.jpg": _image_bytes(c), "003.txt": IMAGES[c][3].encode()})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("004.png")
        info.size = 4096
        tar.addfile(info, io.BytesIO(bytes(4096)))
    (shards / "part-2.tar").write_bytes(buffer.getvalue()[:1000])  # cut inside its member
    _tar(outside / "stolen.tar", {"005.jpg": _image_bytes(c), "005.txt": b"not yours"})
    os.symlink(outside / "stolen.tar", shards / "part-3.tar")
    assert detect_source(shards) == "webdataset"
    index = _run(tiny_models, shards, tmp_path / "out")
    _assert_same_shards(tmp_path / "out", reference)
    skipped = {entry["path"]: entry["reason"] for entry in index["skipped"]}
    assert set(skipped) == {"part-3.tar", "part-0.tar:s/002", "part-2.tar"}
    assert "path outside the dataset" in skipped["part-3.tar"]
    assert "no caption" in skipped["part-0.tar:s/002"]
    assert skipped["part-2.tar"].startswith("unreadable tar")
    names = json.loads((tmp_path / "out" / "index.json").read_text())
    assert names["source"]["images_found"] == 4


def test_progress_shows_images_per_second_and_the_total(
    tmp_path: Path, tiny_models, capsys
) -> None:
    # The total of each reader that knows it: every image it yields, usable or skipped.
    _write_images(tmp_path / "sidecars")
    (tmp_path / "sidecars" / "a.txt").write_text("only a has a caption")
    _dataset().to_parquet(str(tmp_path / "data.parquet"))
    (tmp_path / "parquet").mkdir()
    os.replace(tmp_path / "data.parquet", tmp_path / "parquet" / "data.parquet")
    for folder, total in (("sidecars", 3), ("parquet", 3)):
        reader = open_reader("auto", tmp_path / folder)
        records = list(reader)
        assert reader.total == total == sum(r.sample for r in records), folder
    vae, t5 = tiny_models
    capsys.readouterr()
    precompute(
        tmp_path / "sidecars",
        tmp_path / "out",
        vae_path=vae,
        text_encoder_path=t5,
        resolution=8,
        caption_max_tokens=12,
    )
    err = capsys.readouterr().err
    assert "precompute: 100%" in err and "3/3" in err and "img/s" in err
