"""Fixtures shared by the objective tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: The tiny CLIP's vision input side (the processor resizes the shortest side to it and crops;
#: test_clip_reward.py's IMAGE_PX).
IMAGE_PX = 32


@pytest.fixture(scope="module")
def clip_folder(real_models, tmp_path_factory) -> Path:
    """A CLIPModel (2-layer 16-wide towers, ViT patch 8 at 32 px) and its CLIPProcessor (CLIP's
    BPE tokenizer from tests/engine/real_models.py, bicubic shortest-edge resize + center crop,
    OpenAI's mean / std), saved as save_pretrained writes a published CLIP folder."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer.from_pretrained(real_models.save_clip_tokenizer(folder / "bpe"))
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "num_attention_heads": 2, "image_size": IMAGE_PX, "patch_size": 8},
        projection_dim=12,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
