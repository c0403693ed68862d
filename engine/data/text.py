"""Text encoding: captions -> (T5 hidden states, attention mask), PixArt's convention; for an SD3
pipeline folder, captions -> (joint CLIP + T5 states, pooled CLIP projections) by the pipeline's
own ``encode_prompt``."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..config.data import DIGITS_TEXT_HEADS
from ..core.families import family_of_pipeline_folder
from .seeding import derive_seed

__all__ = [
    "digits_text_encoder",
    "encode_sd3_text",
    "encode_text",
    "is_sd3_pipeline",
    "load_sd3_text_encoders",
    "load_tokenizer",
]

# The digits text encoder: a T5 encoder (gated-GELU, as T5 v1.1 / ByT5) small enough to build in
# milliseconds. d_kv = text_dim // heads.
_DIGITS_TEXT_LAYERS = 2


def digits_text_encoder(text_dim: int, seed: int) -> tuple[Any, torch.nn.Module]:
    """The embedded default's frozen text encoder: ``(ByT5Tokenizer, T5EncoderModel)``.

    ByT5 tokenizes UTF-8 bytes, so it needs no vocabulary files; the encoder is built from a
    ``T5Config`` with random weights drawn from ``seed`` (inside ``fork_rng``, leaving the global
    RNG untouched), so two constructions give identical embeddings.
    """
    # lazy: transformers adds ~1 s over torch; only building test encoders needs it
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    # T5Config takes decoder_start_token_id through PretrainedConfig's **kwargs, which its
    # annotations leave out.
    config = T5Config(  # type: ignore[call-arg]
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


def load_tokenizer(folder: str) -> Any:
    """The tokenizer of ``folder``: its ``tokenizer_config.json`` class (AutoTokenizer), or a
    T5Tokenizer for a bare ``spiece.model`` (PixArt's T5 tokenizer folders ship no
    ``tokenizer.json``; transformers converts the sentencepiece model, which needs the
    ``sentencepiece`` and ``protobuf`` packages). A missing package is named here: transformers
    itself then reports that "`tiktoken` is required", which points at the wrong package.
    """
    # lazy: transformers adds ~1 s over torch; only loading a tokenizer needs it
    from transformers import AutoTokenizer, T5Tokenizer

    spiece = os.path.join(folder, "spiece.model")
    converts = os.path.isfile(spiece) and not os.path.isfile(os.path.join(folder, "tokenizer.json"))
    if converts:
        missing = [m for m in ("sentencepiece", "google.protobuf") if not _importable(m)]
        if missing:
            names = " and ".join("protobuf" if m == "google.protobuf" else m for m in missing)
            raise ValueError(
                f"tokenizer {folder!r} is a sentencepiece model (spiece.model, no tokenizer.json):"
                f" loading it needs the {names} package{'s' if len(missing) > 1 else ''} "
                f"(pip install {names.replace(' and ', ' ')}; both are e2ed2 dependencies)"
            )
    try:
        if converts and not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return T5Tokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as error:
        raise ValueError(f"cannot load the tokenizer in {folder!r}: {error}") from error


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (google) is missing
        return False


def is_sd3_pipeline(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a pipeline folder of a family with SD3's joint text encoding
    (core/families.py): three encoders' joint states plus pooled projections, not one T5's
    states and mask."""
    family = family_of_pipeline_folder(folder)
    return family is not None and family.text_encoding == "sd3"


def load_sd3_text_encoders(
    folder: str | os.PathLike, device: str | torch.device, dtype: torch.dtype
) -> Any:
    """The text half of an SD3 pipeline folder: a ``StableDiffusion3Pipeline`` with its
    tokenizers and text encoders (CLIP-L, CLIP-G with projections, T5) loaded in ``dtype`` on
    ``device`` and no transformer or VAE, so :func:`encode_sd3_text` runs the pipeline's own
    ``encode_prompt`` (safetensors only)."""
    # lazy: diffusers adds ~3 s over torch; only SD3 pipeline folders need it
    from diffusers import StableDiffusion3Pipeline

    try:
        pipeline = StableDiffusion3Pipeline.from_pretrained(
            os.fspath(folder), transformer=None, vae=None, dtype=dtype, use_safetensors=True
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the SD3 text encoders of {folder!r}: {error}") from error
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(pipeline, name).to(device).eval().requires_grad_(False)
    return pipeline


@torch.no_grad()
def encode_sd3_text(
    pipeline: Any,
    captions: Sequence[str],
    max_tokens: int,
    *,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ``(states (N, 77 + max_tokens, D_T5), pooled (N, D_pooled))`` exactly as
    ``StableDiffusion3Pipeline`` conditions its transformer: CLIP-L's and CLIP-G's penultimate
    hidden states (77 tokens, concatenated and zero-padded to T5's width) before T5's
    ``max_tokens`` (the pipeline's ``max_sequence_length``), and the two CLIP projections
    concatenated as the pooled embedding. No attention mask: SD3 attends to every position."""
    device = device if device is not None else pipeline.text_encoder.device
    states, _, pooled, _ = pipeline.encode_prompt(
        list(captions),
        None,
        None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_tokens,
    )
    return states, pooled
