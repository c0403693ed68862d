"""Seeds for every random draw the data makes, derived from ``(seed, purpose, integers)``.

Never the global RNG: items must not depend on which worker loads them or in which order.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from typing import NamedTuple

import torch

__all__ = ["SampleKey", "derive_seed", "seeded_generator", "unpack_key"]


def derive_seed(seed: int, purpose: str, *values: int) -> int:
    """A 64-bit seed for one purpose, from the run seed and integers (epoch, sample index, ...).

    A hash rather than ``seed + epoch`` so that streams never collide across seeds, epochs and
    purposes (``seed=0, epoch=1`` and ``seed=1, epoch=0`` give unrelated permutations).
    """
    payload = struct.pack(f"<{1 + len(values)}q", seed, *values) + purpose.encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def seeded_generator(seed: int, purpose: str, *values: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *values))


class SampleKey(NamedTuple):
    """What the batch sampler hands the datasets: a sample and the epoch it is drawn in.

    The epoch reaches the dataset through the key (not through a ``set_epoch`` call) because with
    ``num_workers > 0`` the dataset lives in worker processes that a call on the main copy does not
    reach. Datasets also accept a plain ``int`` (epoch 0).
    """

    # The field's name shadows tuple.index (a NamedTuple allows it; mypy flags any override).
    index: int  # type: ignore[assignment]
    epoch: int


def unpack_key(key: int | SampleKey | tuple[int, int], length: int) -> tuple[int, int]:
    if isinstance(key, tuple):
        index, epoch = operator.index(key[0]), operator.index(key[1])
    else:
        index, epoch = operator.index(key), 0
    if not 0 <= index < length:
        raise IndexError(f"sample index {index} out of range for {length} samples")
    return index, epoch
