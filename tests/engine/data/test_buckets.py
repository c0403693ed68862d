"""Aspect-ratio buckets end to end on the data side: the tables (against diffusers), the crop,
precompute into per-bucket shards, reading them (old indexes too), and the bucketed batch
sampler (one bucket per global batch, disjoint rank slices, resumable)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data.batching import BucketBatchSampler, build_dataloader
from e2ed2.engine.data.buckets import bucket_table, largest_bucket, nearest_bucket, pixart_table
from e2ed2.engine.data.precompute import load_image_and_size
from e2ed2.engine.data.prompts import sample_conditioning
from e2ed2.engine.data.shards import INDEX_VERSION, LatentShardDataset, ShardWriter, read_index


# -- tables ------------------------------------------------------------------------------------
def test_pixart_tables_and_nearest_bucket_match_diffusers() -> None:
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN

    assert bucket_table("pixart", 512) == {
        k: (int(h), int(w)) for k, (h, w) in ASPECT_RATIO_512_BIN.items()
    }
    assert bucket_table("pixart", 1024)["1.0"] == (1024, 1024)
    assert bucket_table("pixart", 2048)["1.0"] == (2048, 2048)  # PixArt-Σ's table
    table = pixart_table(1024)
    for height, width in [(100, 300), (300, 100), (480, 640), (999, 1000), (64, 112), (5, 80)]:
        expected = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
        assert nearest_bucket(height, width, table) == expected, (height, width)


@pytest.mark.parametrize("resolution", [64, 96, 768])
def test_scaled_tables_keep_labels_and_patch_multiples(resolution: int) -> None:
    table = bucket_table("pixart", resolution, multiple=16)
    assert list(table) == list(pixart_table(512))  # same aspect-ratio labels
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in table.values())
    assert table["1.0"] == (resolution, resolution)
    # Wide labels stay wide, tall stay tall, areas about resolution².
    assert table["0.25"][0] < table["0.25"][1] and table["4.0"][0] > table["4.0"][1]
    for height, width in table.values():
        assert 0.5 < height * width / resolution**2 < 1.5
    assert largest_bucket(table) == max(table.values(), key=lambda s: s[0] * s[1])
    assert bucket_table("none", resolution) == {"1.0": (resolution, resolution)}


def test_bad_table_names_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="'square' is not one of"):
        bucket_table("square", 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_table("none", 72)
    with pytest.raises(ValueError, match="must be positive"):
        nearest_bucket(0, 5, pixart_table(512))


# -- the crop ----------------------------------------------------------------------------------
def _thirds_image(path: Path, width: int, height: int) -> None:
    """Left third red, middle green, right blue."""
    from PIL import Image

    third = torch.div(torch.arange(width) * 3, width, rounding_mode="floor")
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    for channel in range(3):
        pixels[:, :, channel] = 255 * (third == channel)
    Image.fromarray(pixels.numpy()).save(path)


def test_a_panorama_keeps_its_width_in_its_bucket(tmp_path: Path) -> None:
    _thirds_image(tmp_path / "wide.png", 192, 64)  # 3:1
    square, size = load_image_and_size(tmp_path / "wide.png", 64)
    assert size == (64, 192) and square.shape == (3, 64, 64)
    # The square crop is the middle third: green only.
    assert square[0].max() < -0.9 and square[2].max() < -0.9 and square[1].min() > 0.9
    table = bucket_table("pixart", 64)
    bucketed, _ = load_image_and_size(tmp_path / "wide.png", 64, table)
    assert bucketed.shape == (3, *nearest_bucket(64, 192, table)) == (3, 32, 112)
    red, green, blue = (bucketed[c] > 0.5 for c in range(3))
    # All three thirds are kept, each about a third of the columns.
    for part in (red, green, blue):
        assert 0.28 < part.float().mean() < 0.38


# -- precompute into per-bucket shards ---------------------------------------------------------
def test_precompute_writes_one_latent_shape_per_bucket(bucket_shards_512: Path, real_models):
    index = read_index(str(bucket_shards_512))
    assert index["version"] == INDEX_VERSION == 3 and index["bucket_table"] == "pixart"
    assert "shape" not in index["latent"]  # several shapes
    sizes = {(b["height"], b["width"]): b for b in index["buckets"]}
    assert set(sizes) == {(32, 112), (64, 64), (80, 64)}
    assert all(b["num_samples"] == 2 for b in index["buckets"])
    assert sizes[(32, 112)]["latent_shape"] == [4, 4, 14]
    dataset = LatentShardDataset(
        DataConfig(source="shards", shard_dir=str(bucket_shards_512), buckets="pixart")
    )
    table = bucket_table("pixart", 64)
    for i in range(len(dataset)):
        item = dataset[i]
        width, height = real_models.BUCKET_IMAGE_SIZES[int(dataset.files[i][6])]
        bucket = int(dataset.sample_buckets[i])
        crop = dataset.bucket_sizes[bucket]
        assert crop == nearest_bucket(height, width, table)
        assert tuple(item["latents"].shape) == dataset.bucket_latent_shapes[bucket]
        assert item["latents"].shape[-2:] == (crop[0] // 8, crop[1] // 8)
        # PixArt-MS conditions: the source image's size, the stored crop's aspect ratio.
        assert item["resolution"].tolist() == [float(height), float(width)]
        assert item["aspect_ratio"].item() == pytest.approx(crop[0] / crop[1])
    assert dataset.largest_latent_shape == (4, 10, 8)  # 80x64 px
    assert dataset.base_latent_size == 8  # 64 px / 8
    # Sample grids: prompts of one bucket, drawn at its shape.
    cond, captions = sample_conditioning(dataset, 4)
    assert len(captions) == 2 and cond.encoder_hidden_states.shape[0] == 2
    grid = dataset.bucket_members(dataset.grid_bucket)
    assert all(dataset[int(i)]["latents"].shape == dataset.latent_shape for i in grid)


def test_the_writer_keeps_one_bucket_per_shard_and_bounded_memory(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_size=4, dtype=torch.float16)
    for i in range(9):
        bucket = i % 3 != 0  # buckets 0, 1, 1, 0, 1, 1, ...
        shape = (1, 2, 3) if bucket else (1, 3, 2)
        writer.add({"latents": torch.full((1, *shape), float(i))}, [f"c{i}"], [f"f{i}"], bucket)
        assert sum(len(b.captions) for b in writer.buffers.values()) < 4
    writer.close()
    assert writer.num_samples == 9 and writer.bucket_counts() == {0: 3, 1: 6}
    assert all(s["num_samples"] <= 4 for s in writer.shards)
    from safetensors import safe_open

    for shard in writer.shards:
        with safe_open(str(tmp_path / shard["file"]), framework="pt") as handle:
            rows = handle.get_tensor("latents")
        assert tuple(rows.shape[1:]) == ((1, 2, 3) if shard["bucket"] else (1, 3, 2))
        values = rows.flatten(1)[:, 0].long().tolist()
        assert all((v % 3 != 0) == shard["bucket"] for v in values)


def _bucket_folder(root: Path, nan_row: int | None = None) -> Path:
    """Two buckets written by ShardWriter: 3 samples of (2, 4, 6), 4 of (2, 6, 4)."""
    writer = ShardWriter(root, shard_size=8, dtype=torch.float16)
    for i in range(7):
        bucket = int(i >= 3)
        shape = (2, 6, 4) if bucket else (2, 4, 6)
        latents = torch.full((1, *shape), float(i))
        if i == nan_row:
            latents[0, 0, 0, 0] = float("nan")
        writer.add(
            {
                "latents": latents,
                "encoder_hidden_states": torch.randn(1, 3, 8),
                "encoder_attention_mask": torch.ones(1, 3, dtype=torch.bool),
            },
            [f"c{i}"],
            [f"f{i}"],
            bucket,
        )
    writer.close()
    index = {
        "format": "e2ed2-latent-shards",
        "version": 2,
        "num_samples": 7,
        "shards": writer.shards,
        "latent": {"kind": "sample", "dtype": "float16"},
        "bucket_table": "pixart",
        "buckets": [
            {"height": 32, "width": 48, "latent_shape": [2, 4, 6], "num_samples": 3},
            {"height": 48, "width": 32, "latent_shape": [2, 6, 4], "num_samples": 4},
        ],
        "text": {"shape": [3, 8], "dtype": "float16"},
        "resolution": 40,
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_a_bad_sample_is_replaced_from_its_own_bucket(tmp_path: Path) -> None:
    root = _bucket_folder(tmp_path, nan_row=6)
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(root), buckets="pixart"))
    last = dataset[6]  # NaN: the next good one *of its bucket* (3), not sample 0 of the other
    assert last["bad_count"] == 1 and last["index"] == 3
    assert tuple(last["latents"].shape) == (2, 6, 4)
    assert dataset.base_latent_size == 5  # resolution 40 over the VAE's 8


def test_old_and_bucketless_indexes_read_as_one_bucket(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {
            "latents": torch.randn(3, 2, 4, 4).half(),
            "encoder_hidden_states": torch.randn(3, 3, 8).half(),
            "encoder_attention_mask": torch.ones(3, 3, dtype=torch.bool),
        },
        str(tmp_path / "shard-00000.safetensors"),
    )
    index = {  # as version 1 wrote it
        "format": "e2ed2-latent-shards",
        "version": 1,
        "num_samples": 3,
        "shards": [{"file": "shard-00000.safetensors", "num_samples": 3}],
        "latent": {"kind": "sample", "shape": [2, 4, 4], "dtype": "float16"},
        "text": {"shape": [3, 8], "dtype": "float16"},
        "resolution": 32,
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    read = read_index(str(tmp_path))
    assert read["bucket_table"] == "none" and read["shards"][0]["bucket"] == 0
    assert read["buckets"] == [
        {"height": 32, "width": 32, "latent_shape": [2, 4, 4], "num_samples": 3}
    ]
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path)))
    assert dataset.latent_shape == (2, 4, 4) and dataset.sample_buckets.tolist() == [0, 0, 0]
    # A run that says "pixart" on square shards is told which table the folder has.
    with pytest.raises(ValueError, match="precomputed with buckets 'none'.*data.buckets='none'"):
        build_dataloader(DataConfig(source="shards", shard_dir=str(tmp_path), buckets="pixart"), 1)
    index["version"] = 4
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"version 4 is not supported \(expected one of \[1, 2, 3\]"
    ):
        read_index(str(tmp_path))


def test_bad_bucket_entries_are_named(tmp_path: Path) -> None:
    root = _bucket_folder(tmp_path)
    index = json.loads((root / "index.json").read_text())
    index["shards"][0]["bucket"] = 5
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has bucket 5, expected an index into the 2 buckets"):
        read_index(str(root))
    with pytest.raises(ValueError, match=r"data.buckets='pixart' needs data.source='shards'"):
        DataConfig(buckets="pixart")


# -- the bucketed batch sampler ----------------------------------------------------------------
BUCKETS = [0] * 10 + [1] * 7 + [2] * 3 + [3] * 1  # 21 samples in four buckets


def _epoch(sampler: BucketBatchSampler) -> list[list[int]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(sampler.batches_per_epoch)]


def test_every_global_batch_is_one_bucket_and_ranks_split_it(caplog) -> None:
    batch, world = 2, 2  # global batch 4: buckets of 10, 7, 3, 1 -> 2 + 1 + 0 + 0 batches
    with caplog.at_level(logging.WARNING, logger="e2ed2.engine.data.batching"):
        ranks = [BucketBatchSampler(BUCKETS, batch, r, world, seed=3) for r in range(world)]
    assert "2 aspect-ratio buckets hold fewer samples than one global batch (4)" in caplog.text
    assert ranks[0].batches_per_epoch == 3 and ranks[0].dropped_per_epoch == 2 + 3 + 3 + 1
    seen_epochs = []
    for _ in range(3):  # epochs
        per_rank = [_epoch(sampler) for sampler in ranks]
        seen = []
        for step in range(3):
            global_batch = per_rank[0][step] + per_rank[1][step]
            assert len({BUCKETS[i] for i in global_batch}) == 1  # one bucket
            assert not set(per_rank[0][step]) & set(per_rank[1][step])  # disjoint slices
            seen += global_batch
        assert len(seen) == len(set(seen)) == 12  # no sample twice per epoch
        seen_epochs.append(seen)
    assert seen_epochs[0] != seen_epochs[1]  # reshuffled per epoch
    # The same global batches as one rank with the whole global batch (world-size invariance).
    single = BucketBatchSampler(BUCKETS, batch * world, 0, 1, seed=3)
    assert _epoch(single) == [
        a + b
        for a, b in zip(
            *[_epoch(BucketBatchSampler(BUCKETS, batch, r, world, seed=3)) for r in range(world)],
            strict=True,
        )
    ]


def test_the_bucketed_sampler_resumes_exactly_and_is_seeded() -> None:
    full = BucketBatchSampler(BUCKETS, 2, 0, 1, seed=7, yield_keys=True)
    iterator = iter(full)
    reference = [next(iterator) for _ in range(20)]  # several epochs
    assert all(len({BUCKETS[k.index] for k in b}) == 1 for b in reference)
    for stop in (3, 8, 13):
        first = BucketBatchSampler(BUCKETS, 2, 0, 1, seed=7, yield_keys=True)
        it = iter(first)
        for _ in range(stop):
            next(it)
        resumed = BucketBatchSampler(BUCKETS, 2, 0, 1, seed=7, yield_keys=True)
        resumed.load_state_dict(first.state_dict())
        it = iter(resumed)
        assert [next(it) for _ in range(20 - stop)] == reference[stop:]
    other = BucketBatchSampler(BUCKETS, 2, 0, 1, seed=8)
    assert _epoch(other) != [[k.index for k in b] for b in reference[: other.batches_per_epoch]]
    ordered = BucketBatchSampler(BUCKETS, 2, 0, 1, shuffle=False)
    assert _epoch(ordered)[:2] == [[0, 1], [2, 3]]


def test_no_bucket_filling_a_global_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"no bucket fills one global batch .* \{0: 3, 1: 2\}"):
        BucketBatchSampler([0, 0, 0, 1, 1], 2, 0, 2)


def test_the_loader_batches_bucketed_shards(tmp_path: Path) -> None:
    root = _bucket_folder(tmp_path)
    config = DataConfig(source="shards", shard_dir=str(root), buckets="pixart")
    loader, sampler = build_dataloader(config, batch_per_rank=2)
    assert isinstance(sampler, BucketBatchSampler) and sampler.batches_per_epoch == 3
    iterator = iter(loader)
    shapes = {tuple(next(iterator).latents.shape) for _ in range(6)}
    assert shapes == {(2, 2, 4, 6), (2, 2, 6, 4)}
    with pytest.raises(ValueError, match="precomputed with buckets 'pixart'"):
        build_dataloader(DataConfig(source="shards", shard_dir=str(root)), batch_per_rank=2)
