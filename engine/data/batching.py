"""Distributed, deterministic, resumable batching of the training data.

Batching is owned by :class:`ResumableBatchSampler`: one permutation per epoch, global batch ``g``
is ``perm[g*B*W : (g+1)*B*W]`` and rank ``r`` takes the contiguous chunk ``[r*B : (r+1)*B]`` of
it. So the ranks' micro-batches concatenated in rank order are exactly the batch one process with
``batch_per_rank = B*W`` sees at the same step, and the position (epoch, global batch) is all the
state a resumed run needs, independent of ``num_workers``, prefetching and, for the same global
batch size, of the world size. :class:`BucketBatchSampler` does the same over aspect-ratio
buckets: every global batch is drawn from one bucket, so every micro-batch has one latent shape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from ..config.base import check_int
from ..config.data import DataConfig
from ..core.batch import Batch
from .digits import SPLITS, DigitsDataset, Split
from .prompts_source import PromptDataset
from .seeding import SampleKey, seeded_generator
from .shards import LatentShardDataset, check_bucket_table

__all__ = [
    "BucketBatchSampler",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "build_dataloader",
    "build_dataset",
]

logger = logging.getLogger(__name__)


class ResumableBatchSampler:
    """Per-rank micro-batches of sample indices, forever: deterministic per seed and resumable.

    Epoch ``e`` is a permutation of ``range(num_samples)`` (``torch.randperm`` with a generator
    seeded by ``(seed, e)``; the identity if not ``shuffle``), cut into
    ``batches_per_epoch = num_samples // (batch_per_rank * world_size)`` global batches; the
    incomplete tail is dropped (a different tail every epoch when shuffling). Global batch ``g``
    is ``perm[g*B*W : (g+1)*B*W]`` and rank ``r`` yields its chunk ``[r*B : (r+1)*B]``.

    ``state_dict()`` is the position of the next batch: ``{"epoch", "batch_in_epoch"}``
    (``batch_in_epoch`` counts global batches, so it means the same on every rank).
    :class:`ResumableDataLoader` keeps it equal to what the consumer has received, not what
    workers have prefetched. With ``yield_keys`` the batches hold :class:`SampleKey` s (index and
    epoch) instead of ints, for datasets whose items depend on the epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        *,
        yield_keys: bool = False,
    ) -> None:
        check_int("batch_per_rank", batch_per_rank, minimum=1)
        check_int("world_size", world_size, minimum=1)
        check_int("seed", seed, minimum=0)
        check_int("num_samples", num_samples, minimum=1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        global_batch = batch_per_rank * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"num_samples={num_samples} is smaller than one global batch "
                f"(batch_per_rank={batch_per_rank} x world_size={world_size} = {global_batch})"
            )
        self.num_samples = num_samples
        self.batch_per_rank = batch_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.yield_keys = yield_keys
        self.batches_per_epoch = num_samples // global_batch
        self._position = 0  # global batches delivered since epoch 0, batch 0
        self._loads = 0  # bumped by load_state_dict; running iterators then stop

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``, (num_samples,) long (the same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(
            self.num_samples, generator=seeded_generator(self.seed, "perm", epoch)
        )

    def __iter__(self) -> Iterator[list[int] | list[SampleKey]]:
        loads = self._loads
        position = self._position
        epoch, perm = -1, torch.empty(0, dtype=torch.long)
        begin = self.rank * self.batch_per_rank
        while True:
            if self._loads != loads:
                raise RuntimeError(
                    "ResumableBatchSampler.load_state_dict was called while iterating; "
                    "start a new iterator"
                )
            batch_epoch, batch = divmod(position, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, perm = batch_epoch, self.permutation(batch_epoch)
            start = batch * self.global_batch + begin
            indices = perm[start : start + self.batch_per_rank].tolist()
            position += 1
            self._position = position
            if self.yield_keys:
                yield [SampleKey(i, epoch) for i in indices]
            else:
                yield indices

    def state_dict(self) -> dict[str, int]:
        epoch, batch = divmod(self._position, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state``'s batch; iterators started before this call stop."""
        missing = {"epoch", "batch_in_epoch"} - set(state)
        if missing:
            raise KeyError(f"sampler state is missing {sorted(missing)}")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(
                f"sampler state {dict(state)} is out of range: epoch >= 0 and "
                f"batch_in_epoch in 0..{self.batches_per_epoch - 1}"
            )
        self._position = epoch * self.batches_per_epoch + batch
        self._loads += 1

    def _mark_delivered(self, position: int) -> None:
        self._position = position


class BucketBatchSampler(ResumableBatchSampler):
    """:class:`ResumableBatchSampler` over aspect-ratio buckets: every global batch (the
    ``batch_per_rank * world_size`` samples of one micro-step on all ranks) comes from one
    bucket, so each rank's micro-batch has one latent shape and all ranks run the same shape.

    ``buckets``: the bucket of every sample, (num_samples,) integers. Epoch ``e``: each bucket's
    samples are shuffled (a generator seeded by ``(seed, e, bucket)``) and cut into global
    batches; a bucket's leftover samples (``n_b mod global_batch``) are left out of that epoch
    (different ones each epoch when shuffling); then the order of all these global batches is
    shuffled (seeded by ``(seed, e)``). Without ``shuffle``: buckets in order, samples in index
    order. ``batches_per_epoch = sum_b n_b // global_batch`` is the same every epoch, so the
    state (``{"epoch", "batch_in_epoch"}``), rank slicing and world-size invariance are the
    parent's. A bucket smaller than one global batch never yields a batch (a warning names it).

    Gradient accumulation needs nothing more: each micro-step is its own forward and backward,
    so micro-steps of one optimizer step may come from different buckets.
    """

    def __init__(
        self,
        buckets: Sequence[int] | torch.Tensor,
        batch_per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        *,
        yield_keys: bool = False,
    ) -> None:
        bucket_of = torch.as_tensor(buckets, dtype=torch.long).flatten()
        super().__init__(
            len(bucket_of),
            batch_per_rank,
            rank,
            world_size,
            seed,
            shuffle,
            yield_keys=yield_keys,
        )
        if bucket_of.numel() and int(bucket_of.min()) < 0:
            raise ValueError("bucket ids must be >= 0")
        global_batch = self.global_batch
        #: Per bucket id: its samples' indices, ascending.
        self.members = {
            int(b): (bucket_of == b).nonzero().flatten() for b in torch.unique(bucket_of)
        }
        sizes = {b: len(m) for b, m in self.members.items()}
        too_small = {b: n for b, n in sizes.items() if n < global_batch}
        self.batches_per_epoch = sum(n // global_batch for n in sizes.values())
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no bucket fills one global batch (batch_per_rank={batch_per_rank} x "
                f"world_size={world_size} = {global_batch}); samples per bucket: {sizes}"
            )
        if too_small:
            logger.warning(
                "%d aspect-ratio buckets hold fewer samples than one global batch (%d) and are "
                "never trained on (%d samples): %s",
                len(too_small),
                global_batch,
                sum(too_small.values()),
                too_small,
            )
        #: Samples left out of every epoch (each bucket's n_b mod global_batch).
        self.dropped_per_epoch = sum(n % global_batch for n in sizes.values())

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of ``epoch``: ``batches_per_epoch * global_batch`` sample indices, each run
        of ``global_batch`` from one bucket (the same on every rank)."""
        global_batch = self.global_batch
        chunks = []
        for bucket, members in self.members.items():
            if self.shuffle:
                g = seeded_generator(self.seed, "bucket-perm", epoch, bucket)
                members = members[torch.randperm(len(members), generator=g)]
            full = len(members) // global_batch * global_batch
            chunks.append(members[:full].view(-1, global_batch))
        batches = torch.cat(chunks)
        if self.shuffle:
            g = seeded_generator(self.seed, "bucket-order", epoch)
            batches = batches[torch.randperm(len(batches), generator=g)]
        return batches.flatten()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableBatchSampler` whose state follows consumption;
    it yields :class:`~e2ed2.engine.core.batch.Batch` es (its collate is :meth:`Batch.collate`).

    Workers prefetch index batches ahead of the consumer, which moves the sampler's position
    ahead; after every batch this loader hands out, it resets the position to "batches handed out
    since this iterator started", so ``sampler.state_dict()`` is the same for any num_workers.
    """

    batch_sampler: ResumableBatchSampler

    def __init__(self, dataset: Dataset, batch_sampler: ResumableBatchSampler, **kwargs: Any):
        if not isinstance(batch_sampler, ResumableBatchSampler):
            raise TypeError("ResumableDataLoader needs a ResumableBatchSampler")
        kwargs.setdefault("collate_fn", Batch.collate)
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        sampler = self.batch_sampler
        start = sampler._position
        for delivered, batch in enumerate(super().__iter__(), start=1):
            sampler._mark_delivered(start + delivered)
            yield batch


def build_dataset(
    config: DataConfig, split: Split = "train"
) -> DigitsDataset | LatentShardDataset | PromptDataset:
    """The dataset ``config`` names: :class:`DigitsDataset` or :class:`LatentShardDataset`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
    if config.source == "digits":
        return DigitsDataset(config, split)
    if config.source == "prompts":
        return PromptDataset(config)
    if split != "train":
        raise ValueError(
            f"data.source='shards' has only a 'train' split (got split={split!r}); "
            "precompute a second folder for evaluation"
        )
    return LatentShardDataset(config)


def build_dataloader(
    config: DataConfig,
    batch_per_rank: int,
    rank: int = 0,
    world_size: int = 1,
    split: Split = "train",
    *,
    shuffle: bool = True,
    pin_memory: bool = False,
) -> tuple[ResumableDataLoader, ResumableBatchSampler]:
    """An endless loader of this rank's micro-batches (:class:`~e2ed2.engine.core.batch.Batch`)
    and its sampler (for state_dict/resume).

    Iterate it with ``next(iterator)`` (it never ends); call ``sampler.load_state_dict`` before
    creating the iterator to resume. With ``data.buckets`` other than "none" the sampler is a
    :class:`BucketBatchSampler` over the shards' buckets.
    """
    dataset = build_dataset(config, split)
    sampler: ResumableBatchSampler
    if isinstance(dataset, LatentShardDataset):
        check_bucket_table(config, dataset.index)
    if config.buckets == "none":
        sampler = ResumableBatchSampler(
            len(dataset),
            batch_per_rank,
            rank,
            world_size,
            seed=config.seed,
            shuffle=shuffle,
            yield_keys=True,
        )
    else:
        sampler = BucketBatchSampler(
            # The config allows data.buckets only with data.source = "shards".
            cast(LatentShardDataset, dataset).sample_buckets,
            batch_per_rank,
            rank,
            world_size,
            seed=config.seed,
            shuffle=shuffle,
            yield_keys=True,
        )
    loader = ResumableDataLoader(
        dataset,
        sampler,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
    )
    return loader, sampler
