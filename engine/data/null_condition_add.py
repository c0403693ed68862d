"""``e2ed2 null-condition``'s library side: the empty prompt's encoding added to a shard folder
written before ``e2ed2 precompute`` stored it (data/null_condition.py has the file's format).

Apart from null_condition.py because it reads the shard index (data/shards.py), which itself
reads the null condition: the two would otherwise import each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .null_condition import NULL_PROMPT, encode_null_condition, write_null_condition
from .shards import read_index
from .storage import STORAGE_DTYPES
from .text import encode_sd3_text, is_sd3_pipeline, load_sd3_text_encoders, load_tokenizer

__all__ = ["add_null_condition"]


def add_null_condition(
    shard_dir: str | os.PathLike,
    *,
    text_encoder_path: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
) -> Path:
    """Encodes the empty prompt for an existing shard folder and writes its null condition.

    The text encoder and tokenizer default to the folders ``index.json`` records (those the
    captions were encoded with); the length and storage dtype are the captions'.
    """
    # lazy: transformers adds ~1 s over torch; only encoding the empty prompt needs it
    import transformers
    from transformers import T5EncoderModel

    index = read_index(os.fspath(shard_dir))
    recorded = index.get("text_encoder") or {}
    encoder_dir = os.fspath(text_encoder_path or recorded.get("path") or "")
    tokenizer_dir = os.fspath(tokenizer_path or recorded.get("tokenizer") or encoder_dir)
    for key, folder in (("text encoder", encoder_dir), ("tokenizer", tokenizer_dir)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{os.fspath(shard_dir)}: the {key} folder {folder!r} (index.json's, else "
                "given) does not exist; pass the folder the captions were encoded with"
            )
    text = index["text"]
    length, width = (int(s) for s in text["shape"])
    max_tokens = int(text.get("max_tokens") or length)
    dtype = STORAGE_DTYPES.get(str(text.get("dtype")), torch.float16)
    if is_sd3_pipeline(encoder_dir):
        pipeline = load_sd3_text_encoders(encoder_dir, device, compute_dtype)
        states, pooled = encode_sd3_text(pipeline, [NULL_PROMPT], max_tokens)
        if tuple(states.shape) != (1, length, width):
            raise ValueError(
                f"{encoder_dir!r} encodes to {tuple(states.shape[1:])}, but the captions of "
                f"{os.fspath(shard_dir)} are {(length, width)}: not the pipeline they were made "
                "with"
            )
        return write_null_condition(shard_dir, states, None, dtype, pooled=pooled)
    # transformers 5 renamed torch_dtype to dtype.
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    dtype_kwargs: dict[str, Any] = {dtype_key: compute_dtype}
    encoder = T5EncoderModel.from_pretrained(encoder_dir, use_safetensors=True, **dtype_kwargs)
    # transformers wraps Module.to with functools.wraps, whose type loses the bound self.
    encoder.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    states, mask = encode_null_condition(load_tokenizer(tokenizer_dir), encoder, max_tokens)
    if tuple(states.shape) != (1, length, width):
        raise ValueError(
            f"{encoder_dir!r} encodes to {tuple(states.shape[1:])}, but the captions of "
            f"{os.fspath(shard_dir)} are {(length, width)}: not the encoder they were made with"
        )
    return write_null_condition(shard_dir, states, mask, dtype)
