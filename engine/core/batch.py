"""The training batch: one typed record of every field the data yields and the trainer reads.

Datasets (data/digits.py, data/shards.py, data/prompts_source.py) return one dict per sample;
:meth:`Batch.collate` is the loader's collate function: torch's ``default_collate`` stacks the
items (in a worker, into shared memory, as before), and the result becomes a :class:`Batch`, so a
consumer reads ``batch.latents`` or ``batch.pooled_projections`` (None where the data has none)
instead of guessing dict keys. A key no field names is an error naming it, so a producer cannot
add one silently. Here in core (not data) so that every wing above the data can import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from .network import Conditioning

__all__ = ["SIZE_CONDITION_KEYS", "Batch"]

#: Per-sample fields that become ``Conditioning.added_cond_kwargs`` (PixArt-MS).
SIZE_CONDITION_KEYS = ("resolution", "aspect_ratio")


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """One micro-batch of B samples as the data loader collates it (CPU tensors)."""

    #: (B, C, h, w) float32: the clean latents the trajectory starts from / is scored against.
    latents: torch.Tensor
    #: (B, L, D) float32: the text encoder's output.
    encoder_hidden_states: torch.Tensor
    #: (B,) long: each sample's position in the dataset (global, the same on every rank).
    index: torch.Tensor
    #: (B, L) long, 1 = token, 0 = padding; None where the model attends to every token (SD3).
    encoder_attention_mask: torch.Tensor | None = None
    #: (B, D_p) float32: SD3's pooled text embedding; None for the other families.
    pooled_projections: torch.Tensor | None = None
    #: (B, 2) float32: the source image's (height, width) in pixels (shards and prompt folders:
    #: PixArt-MS's size condition); None for the digits.
    resolution: torch.Tensor | None = None
    #: (B, 1) float32: the stored crop's height / width (PixArt-MS's other size condition).
    aspect_ratio: torch.Tensor | None = None
    #: (B,) long: the digit 0..9 (the digits data only: the reward objective's prompt labels).
    label: torch.Tensor | None = None
    #: (B,) long: 1 where the drawn sample was bad and was replaced by the next good one (shards).
    bad_count: torch.Tensor | None = None
    #: B strings: where each bad drawn sample lives and why, "" for a good one (shards).
    bad_sample: tuple[str, ...] | None = None

    @classmethod
    def collate(cls, items: Sequence[Mapping[str, Any]]) -> Batch:
        """The loader's collate function: dataset items -> one :class:`Batch`."""
        return cls.from_mapping(default_collate(list(items)))

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> Batch:
        """A batch from collated fields by name; raises ValueError naming an unknown or missing
        field (the dataset and this record disagree)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"the data yields {unknown}, which Batch (engine/core/batch.py) has no field for"
            )
        missing = [
            name for name in ("latents", "encoder_hidden_states", "index") if name not in fields
        ]
        if missing:
            raise ValueError(f"the data yields no {missing}, which every Batch needs")
        values = dict(fields)
        if values.get("bad_sample") is not None:
            values["bad_sample"] = tuple(values["bad_sample"])
        return cls(**values)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def conditioning(self) -> Conditioning:
        """The text conditioning: states, mask and, where the data carries them, PixArt-MS's
        size conditions and SD3's pooled projections (tensors as stored: float32 / long)."""
        added = {
            name: value
            for name in SIZE_CONDITION_KEYS
            if (value := getattr(self, name)) is not None
        }
        return Conditioning(
            self.encoder_hidden_states,
            self.encoder_attention_mask,
            added or None,
            pooled_projections=self.pooled_projections,
        )

    def pin_memory(self) -> Batch:
        """Every tensor in page-locked memory (the DataLoader's ``pin_memory=True`` calls it)."""
        pinned: dict[str, Any] = {
            field.name: value.pin_memory()
            for field in dataclasses.fields(self)
            if isinstance(value := getattr(self, field.name), torch.Tensor)
        }
        return dataclasses.replace(self, **pinned)
