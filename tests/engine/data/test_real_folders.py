"""``e2ed2 precompute`` on folders with the real checkpoints' structure: a sharded T5 with a bare
sentencepiece tokenizer, an SD-style VAE, images of mixed sizes and aspect ratios."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data import text as text_module
from e2ed2.engine.data.prompts import batch_conditioning, sample_conditioning, stack_items
from e2ed2.engine.data.shards import LatentShardDataset, read_index


def test_shards_carry_the_size_conditions(shards_1024: Path, real_models) -> None:
    index = read_index(str(shards_1024))
    assert index["num_samples"] == 6 and index["skipped"] == []
    assert index["latent"]["shape"] == [4, 8, 8]  # 64 px through the 8x VAE
    assert index["text"]["shape"] == [16, real_models.T5_WIDTH]
    assert index["vae"]["scaling_factor"] == pytest.approx(0.18215)
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_1024)))
    by_file = {dataset.files[i]: dataset[i] for i in range(len(dataset))}
    # (width, height) 192x64 on disk: the original (height, width) is kept, the crop is square.
    panorama = by_file["img2.png"]
    assert panorama["resolution"].tolist() == [64.0, 192.0]
    assert panorama["aspect_ratio"].tolist() == [1.0]
    assert by_file["img1.jpg"]["resolution"].tolist() == [120.0, 48.0]
    cond = batch_conditioning(stack_items([panorama, by_file["img1.jpg"]]))
    assert cond.added_cond_kwargs["resolution"].shape == (2, 2)
    grid_cond, captions = sample_conditioning(dataset, 3)
    assert grid_cond.added_cond_kwargs["aspect_ratio"].shape == (3, 1) and len(captions) == 3


def test_a_missing_sentencepiece_is_named(
    pixart_512_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without sentencepiece transformers says "`tiktoken` is required", naming the wrong package.
    monkeypatch.setattr(text_module, "_importable", lambda name: name != "sentencepiece")
    with pytest.raises(ValueError, match=r"spiece\.model.*needs the sentencepiece package"):
        text_module.load_tokenizer(str(pixart_512_folder / "tokenizer"))
    monkeypatch.undo()
    tokenizer = text_module.load_tokenizer(str(pixart_512_folder / "tokenizer"))
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert torch.tensor(ids).max() < len(tokenizer)
