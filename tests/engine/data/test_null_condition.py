"""Classifier-free guidance's null conditioning in the data: precompute stores the empty prompt as
``PixArtAlphaPipeline.encode_prompt`` encodes its negative prompt, shards and the digits expose
it, a folder without one is refused by name and can get one added."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from e2ed2.engine.cli.main import main as e2ed2_main
from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data import DigitsDataset, LatentShardDataset, null_conditioning
from e2ed2.engine.data.null_condition import NULL_CONDITION_FILE, read_null_condition


def test_precompute_stores_the_pipelines_negative_prompt(
    shards_512: Path, pixart_512_folder: Path
) -> None:
    from diffusers import PixArtAlphaPipeline

    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(shards_512)))
    null = dataset.null_condition
    length, width = dataset.text_shape
    assert null["encoder_hidden_states"].shape == (1, length, width)
    assert null["encoder_attention_mask"].tolist() == [[1] + [0] * (length - 1)]  # EOS only
    # The pipeline's own unconditional half for a prompt of the shards' caption length.
    pipe = PixArtAlphaPipeline.from_pretrained(pixart_512_folder)
    _, _, negative, negative_mask = pipe.encode_prompt(
        "a photo of a cat", negative_prompt="", max_sequence_length=length, device="cpu"
    )
    assert torch.equal(null["encoder_attention_mask"], negative_mask.long())
    # Stored in the shards' float16, as the captions are.
    torch.testing.assert_close(
        null["encoder_hidden_states"], negative.half().float(), rtol=1e-3, atol=1e-3
    )
    cond = null_conditioning(dataset, 4.5)
    assert torch.equal(cond.encoder_hidden_states, null["encoder_hidden_states"])
    assert null_conditioning(dataset, 1.0) is None  # guidance off: nothing needed


def test_a_folder_without_one_is_named_and_can_get_one(shards_512: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-shards"
    shutil.copytree(shards_512, old)
    original = (old / NULL_CONDITION_FILE).read_bytes()
    (old / NULL_CONDITION_FILE).unlink()
    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(old)))
    assert dataset.null_condition is None
    assert null_conditioning(dataset, 1.0) is None
    with pytest.raises(ValueError, match=rf"{old}.*no null_condition.*e2ed2 null-condition {old}"):
        null_conditioning(dataset, 4.5)
    # Added with the text encoder index.json records: the bytes precompute wrote.
    assert e2ed2_main(["null-condition", str(old)]) == 0
    assert (old / NULL_CONDITION_FILE).read_bytes() == original
    # A file that does not fit the captions is refused by path.
    (old / NULL_CONDITION_FILE).write_bytes(b"broken")
    with pytest.raises(ValueError, match=rf"{NULL_CONDITION_FILE}: unreadable"):
        read_null_condition(old, dataset.text_shape)
    assert e2ed2_main(["null-condition", str(tmp_path / "missing")]) == 2


def test_digits_null_condition_is_the_empty_prompt() -> None:
    dataset = DigitsDataset(DataConfig(resolution=8, text_dim=16, caption_max_tokens=8))
    null = dataset.null_condition
    states, mask = dataset.encode([""])
    assert torch.equal(null["encoder_hidden_states"], states)
    assert torch.equal(null["encoder_attention_mask"], mask)
    assert mask.tolist() == [[1] + [0] * 7]  # ByT5's EOS, then padding
    # Not one of the captions: the unconditional half differs from every prompt.
    prompts, _ = dataset.encode(["a handwritten digit one"])
    assert not torch.allclose(states, prompts)
