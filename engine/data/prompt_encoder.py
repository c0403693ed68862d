"""Prompts encoded as a folder's captions were: the text encoder (T5, an SD3 pipeline's three
encoders, or a Sana pipeline's Gemma-2) and tokenizer that ``index.json`` records, at its token length, giving the same tensors
the shards store (``encoder_hidden_states``, ``encoder_attention_mask`` or SD3's
``pooled_projections``). Used for validation prompts and by ``e2ed2 encode-prompts``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .gemma_text import (
    encode_gemma_null,
    encode_gemma_text,
    is_gemma_pipeline,
    load_gemma_text_encoder,
)
from .null_condition import NULL_PROMPT
from .text import (
    encode_sd3_text,
    encode_text,
    is_sd3_pipeline,
    load_sd3_text_encoders,
    load_tokenizer,
)

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """A loaded text encoder; :meth:`encode` maps prompts to the stored text tensors."""

    def __init__(
        self,
        encoder_dir: str | os.PathLike,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        max_tokens: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.encoder_dir = os.fspath(encoder_dir)
        self.tokenizer_dir = os.fspath(tokenizer_dir or encoder_dir)
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.sd3 = is_sd3_pipeline(self.encoder_dir)
        self.gemma = is_gemma_pipeline(self.encoder_dir)
        if self.gemma:  # Sana / SANA-Sprint: the pipeline's own Gemma-2 encode_prompt
            self.tokenizer_dir = self.encoder_dir
            self.encoder: Any = load_gemma_text_encoder(self.encoder_dir, self.device, dtype)
            self.tokenizer = None
            return
        if self.sd3:
            self.tokenizer_dir = self.encoder_dir  # the pipeline brings its three tokenizers
            self.encoder = load_sd3_text_encoders(self.encoder_dir, self.device, dtype)
            self.tokenizer = None
            return
        # lazy: transformers adds ~1 s over torch; only loading the T5 encoder needs it
        import transformers
        from transformers import T5EncoderModel

        # transformers 5 renamed torch_dtype to dtype.
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        dtype_kwargs: dict[str, Any] = {dtype_key: dtype}
        try:
            encoder = T5EncoderModel.from_pretrained(
                self.encoder_dir, use_safetensors=True, **dtype_kwargs
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot load the T5 encoder in {self.encoder_dir!r}: {error}"
            ) from None
        # transformers wraps Module.to with functools.wraps, whose type loses the bound self.
        moved = encoder.to(self.device)  # type: ignore[arg-type]
        self.encoder = moved.eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)

    @classmethod
    def from_index(
        cls,
        index: Mapping[str, Any],
        root: str | os.PathLike | None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> PromptEncoder:
        """The encoder a shard (or prompt) folder's ``index.json`` records. Raises
        FileNotFoundError naming the folder when the record or its folders are missing."""
        recorded = index.get("text_encoder") or {}
        encoder_dir = recorded.get("path")
        tokenizer_dir = recorded.get("tokenizer") or encoder_dir
        for what, folder in (("text encoder", encoder_dir), ("tokenizer", tokenizer_dir)):
            if not folder or not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"{root}/index.json records no usable {what} folder ({folder!r}): the "
                    "prompts must be encoded by the encoder the captions were"
                )
        assert encoder_dir is not None and tokenizer_dir is not None  # checked just above
        text = index["text"]
        max_tokens = int(text.get("max_tokens") or text["shape"][0])
        return cls(
            encoder_dir,
            tokenizer_dir=tokenizer_dir,
            max_tokens=max_tokens,
            device=device,
            dtype=dtype,
        )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (N, L, D), "encoder_attention_mask": (N, L) bool}`` (T5)
        or ``{"encoder_hidden_states", "pooled_projections": (N, D_p)}`` (SD3), on the encoder's
        device in its dtype."""
        if self.gemma:
            states, mask = encode_gemma_text(
                self.encoder, prompts, self.max_tokens, device=self.device
            )
            return {"encoder_hidden_states": states, "encoder_attention_mask": mask.bool()}
        if self.sd3:
            states, pooled = encode_sd3_text(
                self.encoder, prompts, self.max_tokens, device=self.device
            )
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        states, mask = encode_text(
            self.tokenizer, self.encoder, prompts, self.max_tokens, device=self.device
        )
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask.bool()}

    @torch.no_grad()
    def encode_null(self) -> dict[str, torch.Tensor]:
        """Classifier-free guidance's empty prompt, as the pipeline encodes its negative prompt
        (Sana: without the instruction; data/gemma_text.py), else as any prompt."""
        if self.gemma:
            states, mask = encode_gemma_null(self.encoder, self.max_tokens, device=self.device)
            return {"encoder_hidden_states": states, "encoder_attention_mask": mask.bool()}
        return self.encode([NULL_PROMPT])
