"""What a checkpoint holds, registered once: one named entry per piece of state.

The trainer fills a :data:`Checkpointed` dict when it is built (torchtitan keeps its ``Stateful``
objects the same way); :class:`~e2ed2.engine.train.checkpoint.CheckpointStore` saves and restores
a checkpoint by iterating over it, so a new piece of state is one more entry, not an edit of the
save, the load and the trainer together. The entry's kind says how it is stored (checkpoint.py's
docstring has the whole layout):

- :class:`DeepSpeedEngineState`: DeepSpeed saves and loads the engine itself (weights, optimizer,
  LR schedule; under ZeRO each rank its own files) into a folder: the checkpoint's tag
  (``stepN/``) for the entry named :data:`MODEL`, else the entry's name (``discriminator/``).
  Only the model's state is converted for another number of ranks (reshard.py).
- :class:`RankTensors`: this rank's tensors (the EMA's partition) as ``rank<R>.safetensors`` for
  the entry named ``ema``, else ``rank<R>.<name>.safetensors``; resharded from every saved rank's
  file on another number of ranks.
- :class:`RankPrivate`: this rank's own state that has no meaning on another rank (its random
  generators) as ``rank<R>.state.pt`` for the entry named ``rng``, else ``rank<R>.<name>.pt``,
  read back with ``torch.load(weights_only=True)``; a rank the checkpoint did not have keeps its
  own.
- Any other :class:`Stateful` (the data position, the reliability counters): the key of
  ``trainer.json`` named like the entry, its ``state_dict`` JSON data. A checkpoint from before
  the entry existed gives its ``load_state_dict`` an empty dict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "MODEL",
    "Checkpointed",
    "DeepSpeedEngineState",
    "ProcessRng",
    "RankPrivate",
    "RankTensors",
    "Stateful",
    "capture_rng_state",
    "check_entries",
    "json_entries",
    "rank_file",
    "restore_rng_state",
]

#: The entry of the trained model's engine: its folder is the checkpoint's tag, its global batch
#: is recorded in ``trainer.json`` and its ZeRO state is what reshard.py converts.
MODEL = "model"

#: ``trainer.json`` keys the store writes itself; no entry may take one of these names.
RESERVED_KEYS = ("step", "fingerprint", "train_batch_size", "world_size")


class Stateful(Protocol):
    """An object whose state a checkpoint saves and restores in place."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass(frozen=True)
class DeepSpeedEngineState:
    """A DeepSpeed engine, saved by ``engine.save_checkpoint`` (every rank writes its part)."""

    engine: Any


@dataclass(frozen=True)
class RankTensors:
    """``state``'s tensors on this rank (``state_dict()``: name -> tensor, a partition of
    ``partitioned_like``'s parameters under ZeRO-3). ``label`` names it in errors."""

    state: Stateful
    partitioned_like: nn.Module
    label: str


@dataclass(frozen=True)
class RankPrivate:
    """``state`` on this rank only (``state_dict()``: tensors, ints and lists of them)."""

    state: Stateful


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ProcessRng:
    """This process's torch / Python (/ CUDA) random generators, as a checkpointed entry."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)


Checkpointed = dict[str, DeepSpeedEngineState | RankTensors | RankPrivate | Stateful]

# The entries that keep the file names checkpoints had before state was registered by name.
_RANK_FILES = {
    ("ema", RankTensors): "rank{rank:05d}.safetensors",
    ("rng", RankPrivate): "rank{rank:05d}.state.pt",
}


def rank_file(name: str, entry: RankTensors | RankPrivate, rank: int) -> str:
    """The file name of a per-rank entry on ``rank`` (see the module docstring)."""
    legacy = _RANK_FILES.get((name, type(entry)))
    if legacy is not None:
        return legacy.format(rank=rank)
    suffix = "safetensors" if isinstance(entry, RankTensors) else "pt"
    return f"rank{rank:05d}.{name}.{suffix}"


def json_entries(states: Checkpointed) -> dict[str, Stateful]:
    """The entries stored as keys of ``trainer.json`` (every one not of a storage kind above)."""
    kinds = (DeepSpeedEngineState, RankTensors, RankPrivate)
    return {name: entry for name, entry in states.items() if not isinstance(entry, kinds)}


def check_entries(states: Checkpointed) -> None:
    """Raises ValueError for a registry the layout cannot hold (programming errors)."""
    if not isinstance(states.get(MODEL), DeepSpeedEngineState):
        raise ValueError(f"the checkpointed state needs the model's engine as {MODEL!r}")
    taken = sorted(set(states) & set(RESERVED_KEYS))
    if taken:
        raise ValueError(f"checkpointed state names {taken} are trainer.json's own keys")
    if isinstance(states.get("export"), DeepSpeedEngineState):
        raise ValueError("a checkpointed engine cannot be named 'export' (the export's folder)")
    files = [
        rank_file(name, entry, 0)
        for name, entry in states.items()
        if isinstance(entry, RankTensors | RankPrivate)
    ]
    if len(set(files)) != len(files):
        raise ValueError(f"two checkpointed states share a per-rank file: {sorted(files)}")
