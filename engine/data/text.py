"""Text encoding: captions -> (T5 hidden states, attention mask), PixArt's convention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config.data import DIGITS_TEXT_HEADS
from .seeding import derive_seed

__all__ = ["digits_text_encoder", "encode_text"]

# The digits text encoder: a T5 encoder (gated-GELU, as T5 v1.1 / ByT5) small enough to build in
# milliseconds. d_kv = text_dim // heads.
_DIGITS_TEXT_LAYERS = 2


def digits_text_encoder(text_dim: int, seed: int) -> tuple[Any, torch.nn.Module]:
    """The embedded default's frozen text encoder: ``(ByT5Tokenizer, T5EncoderModel)``.

    ByT5 tokenizes UTF-8 bytes, so it needs no vocabulary files; the encoder is built from a
    ``T5Config`` with random weights drawn from ``seed`` (inside ``fork_rng``, leaving the global
    RNG untouched), so two constructions give identical embeddings.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=text_dim,
        d_kv=text_dim // DIGITS_TEXT_HEADS,
        d_ff=2 * text_dim,
        num_layers=_DIGITS_TEXT_LAYERS,
        num_heads=DIGITS_TEXT_HEADS,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "digits-text-encoder"))
        encoder = T5EncoderModel(config)
    encoder.eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_text(
    tokenizer: Any,
    encoder: torch.nn.Module,
    captions: Sequence[str],
    max_tokens: int,
    *,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ``(hidden states (N, max_tokens, D), attention mask (N, max_tokens) long)``.

    PixArt's convention: pad to ``max_tokens``, truncate longer captions (the tokenizer appends
    EOS), and keep the encoder output at padded positions (the mask tells the denoiser to ignore
    them). The states come back in the encoder's dtype on ``device`` (default: the encoder's).
    """
    if device is None:
        device = next(encoder.parameters()).device
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_tokens,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    states = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return states, mask.long()
