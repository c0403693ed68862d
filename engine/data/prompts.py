"""Prompts for sample grids, taken from the run's data so that sampling needs no text encoder:
for the embedded digits, :func:`~e2ed2.engine.data.digits.digit_prompt` for each digit in turn
(encoded by the dataset's own frozen text encoder); for latent shards, the stored text
embeddings of the first samples."""

from __future__ import annotations

import torch

from ..core.network import Conditioning
from .digits import DigitsDataset, digit_prompt

__all__ = ["sample_conditioning"]


def sample_conditioning(dataset, count: int) -> tuple[Conditioning, list[str]]:
    """``count`` prompts as conditioning (CPU, float32) and their captions."""
    if isinstance(dataset, DigitsDataset):
        captions = [digit_prompt(i % 10) for i in range(count)]
        states, mask = dataset.encode(captions)
    else:
        items = [dataset[i] for i in range(min(count, len(dataset)))]
        states = torch.stack([it["encoder_hidden_states"] for it in items])
        mask = torch.stack([it["encoder_attention_mask"] for it in items])
        captions = [dataset.captions[i] for i in range(len(items))]
    return Conditioning(states, mask), captions
