"""Text states stored trimmed to each caption's tokens (index version 3, ``text.packed``) and
padded back when read: items equal the encoder's outputs on the real tokens, zeros beyond,
with the tokenizer's mask; a shard whose packed text disagrees with its lengths is bad."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import ByT5Tokenizer, T5EncoderModel

from e2ed2.engine.config.data import DataConfig
from e2ed2.engine.data.precompute import precompute
from e2ed2.engine.data.shards import PACKED_STATES, TEXT_LENGTHS, LatentShardDataset
from e2ed2.engine.data.text import encode_text

MAX_TOKENS = 24
CAPTIONS = ["a cat", "a much longer caption about a dog on a beach", "x" * 40]


def test_packed_text_reads_as_the_padded_states(tmp_path: Path, tiny_models) -> None:
    vae, t5 = tiny_models
    images = tmp_path / "images"
    images.mkdir()
    for number, caption in enumerate(CAPTIONS):
        Image.fromarray(np.full((8, 8, 3), 40 * number, np.uint8)).save(images / f"{number}.png")
        (images / f"{number}.txt").write_text(caption)
    index = precompute(
        images,
        tmp_path / "out",
        vae_path=vae,
        text_encoder_path=t5,
        resolution=8,
        caption_max_tokens=MAX_TOKENS,
        progress=False,
    )
    assert index["version"] == 3 and index["text"]["packed"] is True
    assert index["text"]["shape"] == [MAX_TOKENS, 16]
    states, mask = encode_text(ByT5Tokenizer(), T5EncoderModel.from_pretrained(t5), CAPTIONS, 24)
    lengths = mask.sum(dim=1)
    assert lengths.tolist() == [6, 24, 24]  # bytes + EOS, truncated at 24

    shard = load_file(str(tmp_path / "out" / index["shards"][0]["file"]))
    assert "encoder_hidden_states" not in shard and "encoder_attention_mask" not in shard
    assert shard[TEXT_LENGTHS].tolist() == lengths.tolist()
    assert shard[PACKED_STATES].shape == (int(lengths.sum()), 16)

    dataset = LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path / "out")))
    for row in range(len(CAPTIONS)):
        item, length = dataset[row], int(lengths[row])
        assert item["encoder_attention_mask"].tolist() == mask[row].tolist()
        assert item["encoder_hidden_states"].shape == (MAX_TOKENS, 16)
        torch.testing.assert_close(
            item["encoder_hidden_states"][:length],
            states[row, :length].detach(),
            atol=5e-3,
            rtol=5e-3,
        )
        assert not item["encoder_hidden_states"][length:].any()

    # A shard whose lengths do not add up to its packed rows is a bad shard, named.
    path = tmp_path / "out" / index["shards"][0]["file"]
    shard[TEXT_LENGTHS] = shard[TEXT_LENGTHS] - 1
    save_file(shard, str(path), metadata={"captions": json.dumps(CAPTIONS)})
    with pytest.raises(ValueError, match=r"no usable shard .*packed has shape \(54, 16\), exp"):
        LatentShardDataset(DataConfig(source="shards", shard_dir=str(tmp_path / "out")))
