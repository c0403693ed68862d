"""The embedded default data: scikit-learn's 8x8 digits, upscaled, captioned and text-encoded."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config.data import DataConfig
from .null_condition import encode_null_condition
from .seeding import SampleKey, seeded_generator, unpack_key
from .text import digits_text_encoder, encode_text

__all__ = ["DIGIT_WORDS", "DigitsDataset", "Split", "digit_prompt"]

Split = Literal["train", "holdout"]
SPLITS: tuple[str, ...] = typing.get_args(Split)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A few phrasings so the text encoder sees more than ten strings; each sample keeps one phrasing
# (drawn once from the seed), so captions are fixed per sample. The first is the prompt that
# sampling and evaluation use (:func:`digit_prompt`).
_CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten {word}",
    "the digit {word}, written by hand",
)
# load_digits pixel values are integers 0..16.
_DIGITS_MAX_VALUE = 16.0


def digit_prompt(digit: int) -> str:
    """The prompt that samples and scores digit ``digit``: "a handwritten digit seven"."""
    return _CAPTION_TEMPLATES[0].format(word=DIGIT_WORDS[digit])


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits, upscaled, captioned and text-encoded.

    Images: ``load_digits`` values 0..16 scaled to [-1, 1], bilinearly upscaled to
    ``config.resolution`` (one channel, pixel space: the trainer pairs it with an identity
    autoencoder). Captions: "a handwritten digit seven" and two other phrasings, one per sample.
    Text embeddings of the few distinct captions are computed once here (no grad) and shared.

    Split: ``holdout_fraction`` of every class (rounded) is held out, chosen by a permutation
    seeded by ``config.seed``; ``train`` is the rest. Both are sorted by source row.
    """

    def __init__(self, config: DataConfig, split: Split = "train") -> None:
        # lazy: scikit-learn adds ~2 s over torch; only the digits source needs it
        from sklearn.datasets import load_digits

        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        self.config = config
        self.split = split
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32)  # (N, 8, 8), 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        num_source = images.shape[0]

        rows = _stratified_split(labels, config.holdout_fraction, config.seed)[split]
        if rows.numel() == 0:
            raise ValueError(
                f"the digits {split!r} split is empty (data.holdout_fraction="
                f"{config.holdout_fraction}); use a fraction that leaves samples in it"
            )
        #: Row of each sample in ``load_digits()`` (for tracing a sample back to its source).
        self.source_indices: torch.Tensor = rows
        #: The digit of each sample, (N,) long.
        self.labels: torch.Tensor = labels[rows]

        pixels = images[rows].unsqueeze(1) * (2.0 / _DIGITS_MAX_VALUE) - 1.0  # (N, 1, 8, 8)
        size = config.resolution
        if size != pixels.shape[-1]:
            # Bilinear interpolation is a convex combination, so [-1, 1] is kept; the clamp only
            # absorbs rounding.
            pixels = F.interpolate(
                pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            ).clamp_(-1.0, 1.0)
        #: All images, (N, 1, resolution, resolution) float32 in [-1, 1].
        self.images: torch.Tensor = pixels.contiguous()

        # One phrasing per source row, drawn once for the whole set so a sample's caption does
        # not depend on the split it lands in.
        phrasing = torch.randint(
            len(_CAPTION_TEMPLATES),
            (num_source,),
            generator=seeded_generator(config.seed, "digits-captions"),
        )[rows]
        caption_ids = phrasing * len(DIGIT_WORDS) + self.labels
        #: Caption of each sample (for sample grids and logs).
        self.captions: list[str] = [_digit_caption(int(c)) for c in caption_ids]
        self._caption_ids = caption_ids

        self.tokenizer, self.text_encoder = digits_text_encoder(config.text_dim, config.seed)
        all_captions = [
            _digit_caption(i) for i in range(len(_CAPTION_TEMPLATES) * len(DIGIT_WORDS))
        ]
        states, mask = encode_text(
            self.tokenizer, self.text_encoder, all_captions, config.caption_max_tokens
        )
        # (num distinct captions, L, D) float32 and (num distinct captions, L) long.
        self._text_states = states.float().contiguous()
        self._text_mask = mask.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of ``item["latents"]``: here the pixels themselves."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def largest_latent_shape(self) -> tuple[int, int, int]:
        """The one latent shape (the shards' bucketed datasets have several)."""
        return self.latent_shape

    @property
    def base_latent_size(self) -> int:
        """The square latent side a denoiser built from config gets as ``sample_size``."""
        return int(self.images.shape[-1])

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of ``item["encoder_hidden_states"]``."""
        return tuple(self._text_states.shape[1:])  # type: ignore[return-value]

    @property
    def null_condition(self) -> dict[str, torch.Tensor]:
        """The empty prompt through this dataset's text encoder, as the captions (classifier-free
        guidance's unconditional half): states (1, L, D) float32 and mask (1, L) long."""
        states, mask = encode_null_condition(
            self.tokenizer, self.text_encoder, self.config.caption_max_tokens
        )
        return {"encoder_hidden_states": states.float(), "encoder_attention_mask": mask}

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Any captions through this dataset's text encoder: ((N, L, D) float32, (N, L) long)."""
        states, mask = encode_text(
            self.tokenizer, self.text_encoder, captions, self.config.caption_max_tokens
        )
        return states.float(), mask

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, _ = unpack_key(key, len(self))
        caption_id = int(self._caption_ids[index])
        return {
            "latents": self.images[index],
            "encoder_hidden_states": self._text_states[caption_id],
            "encoder_attention_mask": self._text_mask[caption_id],
            "index": index,
            "label": int(self.labels[index]),
        }


def _digit_caption(caption_id: int) -> str:
    phrasing, digit = divmod(caption_id, len(DIGIT_WORDS))
    return _CAPTION_TEMPLATES[phrasing].format(word=DIGIT_WORDS[digit])


def _stratified_split(
    labels: torch.Tensor, holdout_fraction: float, seed: int
) -> dict[str, torch.Tensor]:
    """Source rows of each split: ``round(fraction * class size)`` of every class held out."""
    holdout: list[torch.Tensor] = []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        order = torch.randperm(
            rows.numel(), generator=seeded_generator(seed, "digits-split", label)
        )
        holdout.append(rows[order[: round(holdout_fraction * rows.numel())]])
    held = torch.zeros(labels.numel(), dtype=torch.bool)
    held[torch.cat(holdout)] = True
    return {
        "train": torch.nonzero(~held).flatten(),
        "holdout": torch.nonzero(held).flatten(),
    }
