"""Prompts for sample grids, taken from the run's data so that sampling needs no text encoder:
for the embedded digits, :func:`~e2ed2.engine.data.digits.digit_prompt` for each digit in turn
(encoded by the dataset's own frozen text encoder); for latent shards, the stored text
embeddings of the first samples, with their PixArt-MS size conditions; with aspect-ratio buckets,
the first samples of the grid bucket (``LatentShardDataset.grid_bucket``, the most populous), so
the prompts' size conditions match ``dataset.latent_shape``, the shape the grid is drawn at."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.batch import Batch
from ..core.network import Conditioning
from .digits import DigitsDataset, digit_prompt
from .shards import LatentShardDataset

__all__ = ["batch_conditioning", "null_conditioning", "sample_conditioning", "stack_items"]


def batch_conditioning(batch: Batch) -> Conditioning:
    """The conditioning of a collated batch (:meth:`Batch.conditioning`): text states, mask and,
    where the data carries them, PixArt-MS's size conditions (``resolution``, ``aspect_ratio``)
    and SD3's pooled projections (SD3's shards carry no mask: its transformer attends to all
    tokens)."""
    return batch.conditioning()


def stack_items(items: Sequence[Mapping[str, Any]]) -> Batch:
    """Dataset items -> a batch, as the data loader collates them (:meth:`Batch.collate`)."""
    return Batch.collate(items)


def sample_conditioning(dataset, count: int) -> tuple[Conditioning, list[str]]:
    """``count`` prompts as conditioning (CPU, float32) and their captions."""
    if isinstance(dataset, DigitsDataset):
        captions = [digit_prompt(i % 10) for i in range(count)]
        states, mask = dataset.encode(captions)
        return Conditioning(states, mask), captions
    indices: Sequence[int] = range(min(count, len(dataset)))
    if isinstance(dataset, LatentShardDataset):
        indices = dataset.bucket_members(dataset.grid_bucket)[:count].tolist()
    items = [dataset[i] for i in indices]
    captions = [dataset.captions[int(it["index"])] for it in items]
    return batch_conditioning(stack_items(items)), captions


def null_conditioning(dataset: Any, guidance_scale: float) -> Conditioning | None:
    """The unconditional half of classifier-free guidance where ``guidance_scale`` > 1: the
    dataset's empty-prompt conditioning (one row for any batch; attach it with
    ``Conditioning.with_unconditional``); None where guidance is off. Raises ValueError naming
    the shard folder and the command that writes it where the data has none."""
    if guidance_scale <= 1:
        return None
    null = getattr(dataset, "null_condition", None)
    if null is None:
        root = getattr(dataset, "root", None)
        raise ValueError(
            f"sampler.guidance_scale={guidance_scale} needs the empty prompt's conditioning, but "
            f"the shard folder {root!r} has no null_condition.safetensors (precomputed before "
            f"`e2ed2 precompute` stored it): add it with `e2ed2 null-condition {root}` (the "
            "text encoder its index.json records), or re-run `e2ed2 precompute IMAGE_DIR "
            f"{root} --overwrite ...`; or set sampler.guidance_scale = 1.0"
        )
    return Conditioning(
        null["encoder_hidden_states"],
        null.get("encoder_attention_mask"),
        pooled_projections=null.get("pooled_projections"),
    )
