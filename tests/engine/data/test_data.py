"""Data: the digits default, latent shards, and the distributed resumable batch sampler."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data.batching import ResumableBatchSampler, build_dataloader, build_dataset
from e2ed2.engine.data.digits import DIGIT_WORDS, DigitsDataset
from e2ed2.engine.data.seeding import SampleKey
from e2ed2.engine.data.shards import INDEX_FORMAT, INDEX_VERSION, LatentShardDataset


@pytest.fixture(scope="module")
def digits_train() -> DigitsDataset:
    return DigitsDataset(DataConfig(resolution=16), "train")


@pytest.fixture(scope="module")
def digits_holdout() -> DigitsDataset:
    return DigitsDataset(DataConfig(resolution=16), "holdout")


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(source="x"), r"data\.source='x' is not one of \['digits', 'shards', 'prompts'\]"),
        (dict(source="shards"), r"data\.shard_dir is required"),
        (dict(resolution=4), r"data\.resolution must be an integer >= 8"),
        (dict(resolution=16.0), r"data\.resolution must be an integer"),
        (dict(caption_max_tokens=0), r"data\.caption_max_tokens"),
        (dict(text_dim=30), r"data\.text_dim must be a multiple of 4"),
        (dict(text_dim=0), r"data\.text_dim"),
        (dict(holdout_fraction=1.0), r"data\.holdout_fraction must be a number in \[0, 1\)"),
        (dict(holdout_fraction=-0.1), r"data\.holdout_fraction"),
        (dict(seed=-1), r"data\.seed"),
        (dict(seed=2**63), r"data\.seed must be < 2\*\*63"),
        (dict(num_workers=-1), r"data\.num_workers"),
        (dict(num_workers=True), r"data\.num_workers"),
        (dict(shard_cache_size=0), r"data\.shard_cache_size"),
    ],
)
def test_bad_config_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**overrides)


def test_missing_shard_dir_or_index_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LatentShardDataset(DataConfig(source="shards", shard_dir=str(missing)))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*no index\.json"):
        LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------- digits


def test_digits_items_shapes_ranges_and_labels(digits_train: DigitsDataset) -> None:
    item = digits_train[5]
    assert set(item) == {
        "latents",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "index",
        "label",
    }
    assert item["latents"].shape == (1, 16, 16) and item["latents"].dtype == torch.float32
    assert item["encoder_hidden_states"].shape == (32, 64)
    assert item["encoder_hidden_states"].dtype == torch.float32
    assert item["encoder_attention_mask"].shape == (32,)
    assert item["encoder_attention_mask"].dtype == torch.long
    assert item["index"] == 5
    assert digits_train.latent_shape == (1, 16, 16) and digits_train.text_shape == (32, 64)

    images = digits_train.images
    assert images.min() == -1.0 and images.max() == 1.0  # blank background / full ink survive
    source = load_digits()
    rows = digits_train.source_indices
    assert torch.equal(digits_train.labels, torch.as_tensor(source.target)[rows])
    # Upscaling keeps the mean brightness of each image (bilinear, x2).
    originals = torch.as_tensor(source.images, dtype=torch.float32)[rows] / 8 - 1
    torch.testing.assert_close(images.mean((1, 2, 3)), originals.mean((1, 2)), atol=0.05, rtol=0)


def test_digits_at_native_resolution_are_the_scaled_source_pixels() -> None:
    dataset = DigitsDataset(DataConfig(resolution=8, holdout_fraction=0.0))
    source = torch.as_tensor(load_digits().images, dtype=torch.float32)
    assert len(dataset) == source.shape[0]
    torch.testing.assert_close(dataset.images[:, 0], source / 8 - 1, rtol=0, atol=0)


def test_digits_captions_name_the_label_and_match_the_embeddings(
    digits_train: DigitsDataset,
) -> None:
    captions = digits_train.captions
    assert len(captions) == len(digits_train)
    for i in range(0, len(digits_train), 97):
        word = DIGIT_WORDS[int(digits_train.labels[i])]
        assert word in captions[i].replace(",", " ").split()
    assert "a handwritten digit seven" in captions
    assert len(set(captions)) > 10  # several phrasings per digit
    # The item's embedding is the encoder's output for the item's caption; the mask marks the
    # caption's bytes plus EOS.
    i = 11
    states, mask = digits_train.encode([captions[i]])
    item = digits_train[i]
    torch.testing.assert_close(item["encoder_hidden_states"], states[0])
    assert torch.equal(item["encoder_attention_mask"], mask[0])
    assert int(mask[0].sum()) == len(captions[i].encode()) + 1
    # Different captions give different embeddings.
    other = next(j for j in range(len(captions)) if captions[j] != captions[i])
    assert not torch.allclose(digits_train[other]["encoder_hidden_states"], states[0])


def test_digits_holdout_is_disjoint_stratified_and_seeded(
    digits_train: DigitsDataset, digits_holdout: DigitsDataset
) -> None:
    train = set(digits_train.source_indices.tolist())
    holdout = set(digits_holdout.source_indices.tolist())
    assert not train & holdout
    assert len(train | holdout) == len(load_digits().target)
    target = torch.as_tensor(load_digits().target)
    for label in range(10):
        class_size = int((target == label).sum())
        assert int((digits_holdout.labels == label).sum()) == round(0.2 * class_size)
    # A caption belongs to the source row, not to the split.
    row = digits_holdout.source_indices[3]
    everything = DigitsDataset(DataConfig(holdout_fraction=0.0))
    assert digits_holdout.captions[3] == everything.captions[int(row)]
    other = DigitsDataset(DataConfig(seed=1), "holdout")
    assert set(other.source_indices.tolist()) != holdout


def test_digits_text_embeddings_are_deterministic_per_seed() -> None:
    config = DataConfig(text_dim=32, caption_max_tokens=24)
    first = DigitsDataset(config)
    torch.manual_seed(123)  # the global RNG must not matter
    second = DigitsDataset(config)
    assert torch.equal(first._text_states, second._text_states)
    assert torch.equal(first[7]["encoder_hidden_states"], second[7]["encoder_hidden_states"])
    assert first[7]["encoder_hidden_states"].shape == (24, 32)
    reseeded = DigitsDataset(DataConfig(text_dim=32, caption_max_tokens=24, seed=3))
    assert not torch.allclose(reseeded._text_states, first._text_states)


def test_long_captions_are_truncated_to_caption_max_tokens(digits_train: DigitsDataset) -> None:
    states, mask = digits_train.encode(["x" * 100, "short"])
    assert states.shape == (2, 32, 64)
    assert mask[0].tolist() == [1] * 32
    assert int(mask[1].sum()) == len("short") + 1


def test_empty_holdout_split_raises() -> None:
    with pytest.raises(ValueError, match="holdout_fraction"):
        DigitsDataset(DataConfig(holdout_fraction=0.0), "holdout")
    with pytest.raises(ValueError, match=r"split='test' is not one of"):
        build_dataset(DataConfig(), "test")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- sampler


def _take(sampler: ResumableBatchSampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


def test_ranks_are_disjoint_and_cover_each_global_batch() -> None:
    num_samples, batch, world = 50, 3, 4  # 12 per global batch, 4 batches/epoch, 2 dropped
    samplers = [ResumableBatchSampler(num_samples, batch, r, world, seed=5) for r in range(world)]
    per_rank = [_take(s, 8) for s in samplers]  # two epochs
    for step in range(8):
        chunks = [per_rank[r][step] for r in range(world)]
        assert all(len(c) == batch for c in chunks)
        flat = [i for c in chunks for i in c]
        assert len(set(flat)) == batch * world
        epoch, g = divmod(step, 4)
        perm = samplers[0].permutation(epoch)
        assert flat == perm[g * 12 : (g + 1) * 12].tolist()
    epoch0 = {i for step in range(4) for r in range(world) for i in per_rank[r][step]}
    assert len(epoch0) == 48  # no sample twice in an epoch; the incomplete tail is dropped


def test_rank_concatenation_equals_single_process_batch() -> None:
    world, batch = 3, 4
    single = _take(ResumableBatchSampler(100, batch * world, 0, 1, seed=9), 20)
    ranks = [_take(ResumableBatchSampler(100, batch, r, world, seed=9), 20) for r in range(world)]
    for step in range(20):
        assert sum((ranks[r][step] for r in range(world)), []) == single[step]


def test_sampler_is_deterministic_per_seed_and_seeds_differ() -> None:
    a = _take(ResumableBatchSampler(64, 8, seed=1), 16)
    b = _take(ResumableBatchSampler(64, 8, seed=1), 16)
    c = _take(ResumableBatchSampler(64, 8, seed=2), 16)
    assert a == b
    assert a != c
    assert a[:8] != a[8:]  # each epoch is a new permutation
    assert sorted(i for batch in a[:8] for i in batch) == list(range(64))
    ordered = _take(ResumableBatchSampler(10, 5, shuffle=False), 3)
    assert ordered == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("stop_after", [3, 7, 10, 14])  # mid-epoch, last of epoch, boundaries
def test_resume_continues_at_exactly_the_next_batch(stop_after: int) -> None:
    def make() -> ResumableBatchSampler:
        return ResumableBatchSampler(45, 2, rank=1, world_size=3, seed=4)  # 7 batches/epoch

    reference = _take(make(), 25)
    first = make()
    iterator = iter(first)
    seen = [next(iterator) for _ in range(stop_after)]
    state = first.state_dict()
    assert state == {"epoch": stop_after // 7, "batch_in_epoch": stop_after % 7}
    resumed = make()
    resumed.load_state_dict(state)
    assert seen + _take(resumed, 25 - stop_after) == reference


def test_load_state_dict_validates_and_stops_running_iterators() -> None:
    sampler = ResumableBatchSampler(20, 5)
    iterator = iter(sampler)
    next(iterator)
    sampler.load_state_dict({"epoch": 2, "batch_in_epoch": 1})
    with pytest.raises(RuntimeError, match="new iterator"):
        next(iterator)
    with pytest.raises(ValueError, match="batch_in_epoch in 0..3"):
        sampler.load_state_dict({"epoch": 0, "batch_in_epoch": 4})
    with pytest.raises(KeyError, match="batch_in_epoch"):
        sampler.load_state_dict({"epoch": 0})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 0), "batch_per_rank"),
        ((10, 2, 2, 2), r"rank must be in 0\.\.1"),
        ((10, 4, 0, 3), "smaller than one global batch"),
    ],
)
def test_sampler_rejects_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResumableBatchSampler(*args)


def test_dataloader_batches_and_state_do_not_depend_on_num_workers() -> None:
    def run(num_workers: int) -> tuple[list[list[int]], dict[str, int], torch.Tensor]:
        config = DataConfig(resolution=8, text_dim=16, num_workers=num_workers)
        loader, sampler = build_dataloader(config, batch_per_rank=4, rank=1, world_size=2)
        iterator = iter(loader)
        batches = [next(iterator) for _ in range(5)]
        return [b.index.tolist() for b in batches], sampler.state_dict(), batches[-1]

    indices, state, last = run(0)
    assert state == {"epoch": 0, "batch_in_epoch": 5}
    assert last.latents.shape == (4, 1, 8, 8)
    assert last.encoder_hidden_states.shape == (4, 32, 16)
    assert last.encoder_attention_mask.dtype == torch.long
    assert last.label.shape == (4,)
    worker_indices, worker_state, worker_last = run(2)
    assert worker_indices == indices
    assert worker_state == state  # prefetching workers do not move the position
    torch.testing.assert_close(worker_last.latents, last.latents)

    # The loader yields the sampler's batches for this rank.
    config = DataConfig(resolution=8, text_dim=16)
    reference = ResumableBatchSampler(len(DigitsDataset(config)), 4, 1, 2, seed=0)
    assert indices == _take(reference, 5)


# ---------------------------------------------------------------------------------- shards


def _write_shards(
    root: Path, counts: list[int], *, kind: str = "distribution", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Hand-written shard folder (C=4, 6x5 latents, L=7 tokens of D=12); returns the full data."""
    g = torch.Generator().manual_seed(seed)
    total = sum(counts)
    data = {
        "latent_mean": torch.randn(total, 4, 6, 5, generator=g).half(),
        "latent_std": (0.1 * torch.rand(total, 4, 6, 5, generator=g)).half(),
        "encoder_hidden_states": torch.randn(total, 7, 12, generator=g).half(),
        "encoder_attention_mask": torch.arange(7).expand(total, 7)
        < 3 + torch.arange(total)[:, None] % 4,
    }
    if kind == "sample":
        data["latents"] = data.pop("latent_mean")
        del data["latent_std"]
    shards, start = [], 0
    for number, count in enumerate(counts):
        name = f"shard-{number:05d}.safetensors"
        part = {k: v[start : start + count].contiguous() for k, v in data.items()}
        captions = [f"caption {i}" for i in range(start, start + count)]
        save_file(part, str(root / name), metadata={"captions": json.dumps(captions)})
        shards.append({"file": name, "num_samples": count})
        start += count
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "num_samples": total,
        "shards": shards,
        "latent": {"kind": kind, "shape": [4, 6, 5], "dtype": "float16"},
        "text": {"shape": [7, 12], "dtype": "float16"},
        "vae": {"scaling_factor": 0.5, "shift_factor": None},
    }
    (root / "index.json").write_text(json.dumps(index))
    return data


def test_shard_items_sample_the_posterior_deterministically(tmp_path: Path) -> None:
    data = _write_shards(tmp_path, [3, 4, 2])
    dataset = LatentShardDataset(
        DataConfig(source="shards", shard_dir=str(tmp_path), shard_cache_size=1)
    )
    assert len(dataset) == 9
    assert dataset.captions[5] == "caption 5"
    assert dataset.latent_shape == (4, 6, 5) and dataset.text_shape == (7, 12)
    for index in (0, 4, 8):  # one per shard, through the one-slot cache
        item = dataset[index]
        assert item["index"] == index
        assert item["latents"].shape == (4, 6, 5) and item["latents"].dtype == torch.float32
        mean, std = data["latent_mean"][index].float(), data["latent_std"][index].float()
        eps = (item["latents"] / 0.5 - mean) / std
        assert 0.3 < float(eps.std()) < 2.0  # noise was added, scaled by the std
        torch.testing.assert_close(
            item["encoder_hidden_states"], data["encoder_hidden_states"][index].float()
        )
        assert item["encoder_attention_mask"].dtype == torch.long
        assert torch.equal(
            item["encoder_attention_mask"], data["encoder_attention_mask"][index].long()
        )
    # Same (seed, epoch, index) -> same latent; another epoch or seed -> another posterior draw.
    assert torch.equal(dataset[4]["latents"], dataset[SampleKey(4, 0)]["latents"])
    assert not torch.equal(dataset[SampleKey(4, 1)]["latents"], dataset[4]["latents"])
    reseeded = LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path), seed=1))
    assert not torch.equal(reseeded[4]["latents"], dataset[4]["latents"])
    with pytest.raises(IndexError):
        dataset[9]


def test_shards_with_plain_latents_and_default_collate(tmp_path: Path) -> None:
    data = _write_shards(tmp_path, [5, 5], kind="sample")
    config = DataConfig(source="shards", shard_dir=str(tmp_path), seed=3)
    loader, sampler = build_dataloader(config, batch_per_rank=2, rank=0, world_size=2)
    batch = next(iter(loader))
    assert batch.latents.shape == (2, 4, 6, 5)
    assert batch.encoder_hidden_states.shape == (2, 7, 12)
    assert batch.encoder_attention_mask.shape == (2, 7)
    expected = 0.5 * data["latents"][batch.index].float()
    torch.testing.assert_close(batch.latents, expected)
    assert sampler.state_dict() == {"epoch": 0, "batch_in_epoch": 1}
    with pytest.raises(ValueError, match="only a 'train' split"):
        build_dataset(config, "holdout")


def test_shard_index_mismatch_is_reported(tmp_path: Path) -> None:
    _write_shards(tmp_path, [3, 4])
    index = json.loads((tmp_path / "index.json").read_text())
    index["latent"]["shape"] = [4, 6, 6]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"latent_mean has shape \(3, 4, 6, 5\)"):
        LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path)))
