"""Classifier-free guidance's null conditioning of a shard folder: the empty prompt, encoded once.

``PixArtAlphaPipeline.encode_prompt`` builds its unconditional half from the negative prompt
(``""`` for PixArt-α): the same tokenizer with ``padding="max_length"`` to the prompts' length,
truncation and special tokens (T5 appends EOS, so the mask holds one real token), through the
same T5 with that attention mask, keeping the states at padded positions.
:func:`~e2ed2.engine.data.text.encode_text` encodes captions exactly so; with the folder's
``caption_max_tokens`` it gives the pipeline's ``negative_prompt_embeds`` / mask.

File ``null_condition.safetensors`` next to ``index.json`` (``e2ed2 precompute`` writes it before
the index; ``e2ed2 null-condition`` (data/null_condition_add.py) adds it to a folder written
before)::

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
from safetensors.torch import load_file, save

from .paths import ConfinedRoot
from .storage import write_atomic
from .text import (
    encode_text,
)

__all__ = [
    "NULL_CONDITION_FILE",
    "NULL_PROMPT",
    "encode_null_condition",
    "read_null_condition",
    "write_null_condition",
]

NULL_CONDITION_FILE = "null_condition.safetensors"
#: PixArt-α's negative prompt (``PixArtAlphaPipeline``'s default): no prompt at all.
NULL_PROMPT = ""


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
    if pooled_dim is not None and pooled is not None:  # pooled is present: checked above
        null["pooled_projections"] = pooled.float()
    if not masked:
        del null["encoder_attention_mask"]
    return null
