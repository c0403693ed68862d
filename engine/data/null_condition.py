"""Classifier-free guidance's null conditioning of a shard folder: the empty prompt, encoded once.

``PixArtAlphaPipeline.encode_prompt`` builds its unconditional half from the negative prompt
(``""`` for PixArt-α): the same tokenizer with ``padding="max_length"`` to the prompts' length,
truncation and special tokens (T5 appends EOS, so the mask holds one real token), through the
same T5 with that attention mask, keeping the states at padded positions.
:func:`~e2ed2.engine.data.text.encode_text` encodes captions exactly so; with the folder's
``caption_max_tokens`` it gives the pipeline's ``negative_prompt_embeds`` / mask.

File ``null_condition.safetensors`` next to ``index.json`` (``e2ed2 precompute`` writes it before
the index; :func:`add_null_condition` adds it to a folder written before)::

    encoder_hidden_states   (1, L, D)  in the shards' text storage dtype (rounded as the captions)
    encoder_attention_mask  (1, L)     bool (absent for SD3, which has no text mask)
    pooled_projections      (1, D_p)   SD3 only: the pooled CLIP projections of ""
    metadata                "prompt": the encoded prompt ("")

For an SD3 pipeline folder the empty prompt goes through ``StableDiffusion3Pipeline.encode_prompt``
as its default negative prompt does (:func:`~e2ed2.engine.data.text.encode_sd3_text`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .paths import ConfinedRoot
from .shards import read_index, write_atomic
from .text import (
    encode_sd3_text,
    encode_text,
    is_sd3_pipeline,
    load_sd3_text_encoders,
    load_tokenizer,
)

__all__ = [
    "NULL_CONDITION_FILE",
    "NULL_PROMPT",
    "add_null_condition",
    "encode_null_condition",
    "read_null_condition",
    "write_null_condition",
]

NULL_CONDITION_FILE = "null_condition.safetensors"
#: PixArt-α's negative prompt (``PixArtAlphaPipeline``'s default): no prompt at all.
NULL_PROMPT = ""

_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_null_condition(
    tokenizer: Any, encoder: torch.nn.Module, max_tokens: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's ``(states (1, max_tokens, D), mask (1, max_tokens) long)``, encoded as
    the captions are."""
    return encode_text(tokenizer, encoder, [NULL_PROMPT], max_tokens, device=device)


def write_null_condition(
    shard_dir: str | os.PathLike,
    states: torch.Tensor,
    mask: torch.Tensor | None,
    dtype: torch.dtype,
    *,
    pooled: torch.Tensor | None = None,
) -> Path:
    """Writes ``shard_dir/null_condition.safetensors`` (states and SD3's ``pooled`` (1, D_p) in
    ``dtype``, mask bool; SD3 has no mask: None)."""
    from safetensors.torch import save

    mask_shape = tuple(states.shape[:2]) if mask is None else tuple(mask.shape)
    if states.dim() != 3 or states.shape[0] != 1 or mask_shape != tuple(states.shape[:2]):
        raise ValueError(
            f"null condition must be states (1, L, D) and mask (1, L), got "
            f"{tuple(states.shape)} and {mask_shape}"
        )
    if pooled is not None and (pooled.dim() != 2 or pooled.shape[0] != 1):
        raise ValueError(f"null pooled projections must be (1, D_p), got {tuple(pooled.shape)}")
    tensors = {"encoder_hidden_states": states.detach().to("cpu", dtype).contiguous()}
    if mask is not None:
        tensors["encoder_attention_mask"] = mask.detach().to("cpu", torch.bool).contiguous()
    if pooled is not None:
        tensors["pooled_projections"] = pooled.detach().to("cpu", dtype).contiguous()
    path = Path(shard_dir) / NULL_CONDITION_FILE
    write_atomic(path, save(tensors, metadata={"prompt": json.dumps(NULL_PROMPT)}))
    return path


def read_null_condition(
    shard_dir: str | os.PathLike,
    text_shape: tuple[int, int],
    *,
    pooled_dim: int | None = None,
    masked: bool = True,
) -> dict[str, torch.Tensor] | None:
    """``{"encoder_hidden_states": (1, L, D) float32, "encoder_attention_mask": (1, L) long}``
    of ``shard_dir``, or None where the folder has no null condition; SD3 folders
    (``pooled_dim`` set, ``masked`` False): no mask, ``pooled_projections`` (1, D_p) float32.
    Raises ValueError naming the file when it does not match the captions' ``text_shape``
    (L, D)."""
    from safetensors.torch import load_file

    path = Path(shard_dir) / NULL_CONDITION_FILE
    if not path.is_file():
        return None
    real = ConfinedRoot(shard_dir, "data.shard_dir").resolve(NULL_CONDITION_FILE)
    try:
        tensors = load_file(str(real))
    except Exception as error:  # safetensors raises several types for a broken file
        raise ValueError(f"{path}: unreadable ({type(error).__name__}: {error})") from error
    states = tensors.get("encoder_hidden_states")
    length, width = text_shape
    mask = tensors.get("encoder_attention_mask")
    if not masked:  # SD3: every token is real
        mask = torch.ones(1, length, dtype=torch.long)
    if states is None or mask is None:
        raise ValueError(f"{path}: needs encoder_hidden_states and encoder_attention_mask")
    pooled = tensors.get("pooled_projections")
    if pooled_dim is not None and (pooled is None or tuple(pooled.shape) != (1, pooled_dim)):
        got = None if pooled is None else tuple(pooled.shape)
        raise ValueError(
            f"{path}: needs pooled_projections (1, {pooled_dim}) like the captions' (SD3), "
            f"got {got}; re-run `e2ed2 null-condition`"
        )
    if tuple(states.shape) != (1, length, width) or tuple(mask.shape) != (1, length):
        raise ValueError(
            f"{path}: states {tuple(states.shape)} / mask {tuple(mask.shape)} do not match the "
            f"captions' (1, {length}, {width}) / (1, {length}); re-run `e2ed2 null-condition`"
        )
    if not torch.isfinite(states).all():
        raise ValueError(f"{path}: non-finite values (NaN/Inf) in encoder_hidden_states")
    null = {"encoder_hidden_states": states.float(), "encoder_attention_mask": mask.long()}
    if pooled_dim is not None:
        null["pooled_projections"] = pooled.float()
    if not masked:
        del null["encoder_attention_mask"]
    return null


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
    dtype = _STORAGE_DTYPES.get(str(text.get("dtype")), torch.float16)
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
    encoder = T5EncoderModel.from_pretrained(
        encoder_dir, use_safetensors=True, **{dtype_key: compute_dtype}
    )
    encoder.to(device).eval().requires_grad_(False)
    states, mask = encode_null_condition(load_tokenizer(tokenizer_dir), encoder, max_tokens)
    if tuple(states.shape) != (1, length, width):
        raise ValueError(
            f"{encoder_dir!r} encodes to {tuple(states.shape[1:])}, but the captions of "
            f"{os.fspath(shard_dir)} are {(length, width)}: not the encoder they were made with"
        )
    return write_null_condition(shard_dir, states, mask, dtype)
