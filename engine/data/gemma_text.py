"""Sana's text encoding: captions -> Gemma-2 states and mask, exactly as SanaPipeline and
SanaSprintPipeline condition their transformer (the family record's ``text_encoding="gemma"``).

The pipelines do not feed Gemma the caption alone: they prepend the *complex human instruction*
(a fixed prompt-enhancement instruction, the default of their ``__call__``), tokenize to
``instruction tokens + max_sequence_length - 2`` with right padding, run Gemma-2 and keep the
first position (BOS) and the last ``max_sequence_length - 1`` (the instruction's last tokens,
the caption, its padding): ``max_sequence_length`` states and their mask, ones then zeros. The
encoding here is the pipeline's own ``encode_prompt`` with that instruction, so a change in
diffusers' recipe is followed, not re-implemented. The empty prompt of classifier-free guidance
is encoded as SanaPipeline encodes its negative prompt: no instruction, no selection.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..core.families import family_of_pipeline_folder

__all__ = [
    "complex_human_instruction",
    "encode_gemma_null",
    "encode_gemma_text",
    "is_gemma_pipeline",
    "load_gemma_text_encoder",
]


def is_gemma_pipeline(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a pipeline folder of a family with Sana's Gemma text encoding."""
    family = family_of_pipeline_folder(folder)
    return family is not None and family.text_encoding == "gemma"


def load_gemma_text_encoder(
    folder: str | os.PathLike, device: str | torch.device, dtype: torch.dtype
) -> Any:
    """The text half of a Sana / SANA-Sprint pipeline folder: its pipeline class (the family
    record's) with the Gemma-2 encoder in ``dtype`` on ``device`` and its tokenizer, without
    transformer or VAE (safetensors only)."""
    # lazy: diffusers adds ~3 s over torch, and config checks run before any model loads
    import diffusers

    family = family_of_pipeline_folder(folder)
    if family is None or family.text_encoding != "gemma":
        raise ValueError(f"{os.fspath(folder)!r} is no Sana / SANA-Sprint pipeline folder")
    pipeline_class = getattr(diffusers, family.pipeline_class)
    try:
        pipeline = pipeline_class.from_pretrained(
            os.fspath(folder), transformer=None, vae=None, dtype=dtype, use_safetensors=True
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the Gemma text encoder of {folder!r}: {error}") from error
    pipeline.text_encoder.to(device).eval().requires_grad_(False)
    return pipeline


def complex_human_instruction(pipeline: Any) -> list[str]:
    """The instruction lines the pipeline prepends by default (its ``__call__``'s default)."""
    default = (
        inspect.signature(type(pipeline).__call__).parameters["complex_human_instruction"].default
    )
    return list(default or [])


@torch.no_grad()
def encode_gemma_text(
    pipeline: Any,
    captions: Sequence[str],
    max_tokens: int,
    *,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ``(states (N, max_tokens, D), mask (N, max_tokens) long)`` by the pipeline's
    ``encode_prompt`` with its complex human instruction (module docstring)."""
    device = device if device is not None else pipeline.text_encoder.device
    kwargs: dict[str, Any] = {}
    if "do_classifier_free_guidance" in inspect.signature(pipeline.encode_prompt).parameters:
        kwargs["do_classifier_free_guidance"] = False  # SanaPipeline's; SANA-Sprint has none
    states, mask, *_ = pipeline.encode_prompt(
        list(captions),
        device=device,
        max_sequence_length=max_tokens,
        complex_human_instruction=complex_human_instruction(pipeline),
        **kwargs,
    )
    return states, mask.long()


@torch.no_grad()
def encode_gemma_null(
    pipeline: Any, max_tokens: int, *, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt as SanaPipeline encodes its negative prompt "": ``max_tokens`` tokens,
    no instruction, no selection; ``(states (1, max_tokens, D), mask (1, max_tokens) long)``.

    Calls the pipelines' ``_get_gemma_prompt_embeds``, the function their ``encode_prompt``
    runs for the negative prompt (SANA-Sprint's ``encode_prompt`` has no negative prompt)."""
    device = device if device is not None else pipeline.text_encoder.device
    states, mask = pipeline._get_gemma_prompt_embeds(
        prompt=[""],
        device=device,
        dtype=pipeline.text_encoder.dtype,
        clean_caption=False,
        max_sequence_length=max_tokens,
        complex_human_instruction=False,
    )
    return states, mask.long()
