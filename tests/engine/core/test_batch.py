"""The typed training batch (core/batch.py): what the loader's collate makes of dataset items."""

from __future__ import annotations

import pytest
import torch

from e2ed2.engine.core.batch import Batch


def _item(index: int, **extra: object) -> dict[str, object]:
    return {
        "latents": torch.full((2, 3, 3), float(index)),
        "encoder_hidden_states": torch.ones(4, 5),
        "encoder_attention_mask": torch.tensor([1, 1, 0, 0]),
        "index": index,
        **extra,
    }


def test_collate_stacks_items_and_leaves_absent_fields_none() -> None:
    batch = Batch.collate(
        [
            _item(3, bad_count=0, bad_sample=""),
            _item(7, bad_count=1, bad_sample="s.safetensors row 7: NaN"),
        ]
    )
    assert len(batch) == 2 and batch.latents.shape == (2, 2, 3, 3)
    assert batch.index.tolist() == [3, 7] and batch.index.dtype == torch.long
    assert batch.bad_count.tolist() == [0, 1]
    assert batch.bad_sample == ("", "s.safetensors row 7: NaN")
    assert batch.pooled_projections is None and batch.label is None and batch.resolution is None
    cond = batch.conditioning()
    assert cond.added_cond_kwargs is None and cond.pooled_projections is None
    assert torch.equal(cond.encoder_attention_mask, batch.encoder_attention_mask)


def test_size_conditions_and_pooled_projections_reach_the_conditioning() -> None:
    extra = {"resolution": torch.tensor([64.0, 48.0]), "aspect_ratio": torch.tensor([0.75])}
    batch = Batch.collate([_item(0, pooled_projections=torch.ones(6), **extra)] * 2)
    cond = batch.conditioning()
    assert list(cond.added_cond_kwargs) == ["resolution", "aspect_ratio"]
    assert cond.added_cond_kwargs["resolution"].shape == (2, 2)
    assert cond.pooled_projections.shape == (2, 6)


def test_a_field_the_batch_does_not_know_or_lacks_is_named() -> None:
    with pytest.raises(ValueError, match=r"yields \['captoin'\], which Batch"):
        Batch.collate([_item(0, captoin="a cat")])
    item = _item(0)
    del item["index"]
    with pytest.raises(ValueError, match=r"no \['index'\]"):
        Batch.collate([item])
