"""Resuming a checkpoint on another number of ranks.

What is per rank in a checkpoint, and how it moves to M ranks from N:

- DeepSpeed's ZeRO (stage 1-3) partitions of the fp32 weights and Adam moments: converted once,
  by rank 0 before any engine loads, into DeepSpeed's universal checkpoint (one file per
  parameter and state, DeepSpeed's ``ds_to_universal``: deepspeed_compat.py) in
  ``checkpoints/.universal-stepN/`` (removed at the next save), which the engine loads with
  ``"checkpoint": {"load_universal": true}`` on any number of ranks. Without ZeRO (stage 0) the
  model file holds the whole optimizer state and loads as it is.
- The EMA (``rank<R>.safetensors``): without ZeRO-3 every rank holds the whole shadow, so rank
  0's is every rank's; under ZeRO-3 each holds its partition (a padded 1/N slice of the
  flattened parameter), so the N slices are joined, cut to the parameter's size, and this
  rank's 1/M slice is taken (:func:`reshard_ema`).
- The data position counts global batches, so it carries over only at the same global batch
  (``batch_per_rank x ranks x grad_accum_steps``, checked before anything loads, run_dir.py).
- The RNG state: rank R restores rank R's if the checkpoint has one, else keeps its fresh seed
  (the training noise is drawn from seeds of each sample's position, not from this state).

Checkpoints written before ``trainer.json`` recorded ``train_batch_size`` cannot be checked
for the global batch and are refused on another number of ranks.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .deepspeed_compat import convert_to_universal, local_partition, zero3_numel

__all__ = ["UNIVERSAL_PREFIX", "reshard_ema", "to_universal", "universal_folder"]

#: A converted checkpoint's folder name prefix (a leftover like ``.tmp-``: see remove_leftovers).
UNIVERSAL_PREFIX = ".universal-"


def universal_folder(checkpoints: Path, checkpoint: Path) -> Path:
    """Where the universal form of ``checkpoint`` goes: ``checkpoints/.universal-stepN``."""
    return checkpoints / f"{UNIVERSAL_PREFIX}{checkpoint.name}"


def to_universal(checkpoint: Path, target: Path) -> None:
    """Converts the DeepSpeed state of ``checkpoint`` (its ``stepN/`` tag folder) into
    ``target/stepN`` (rank 0, before the engines load). The checkpoint itself is only read."""
    shutil.rmtree(target, ignore_errors=True)
    convert_to_universal(checkpoint / checkpoint.name, target / checkpoint.name)


def _ema_params(params: Sequence[torch.nn.Parameter], count: int) -> list[torch.nn.Parameter]:
    """The parameters the EMA shadows, in its order: all of them, or (LoRA) the trained ones."""
    every = list(params)
    if len(every) == count:
        return every
    trained = [p for p in every if p.requires_grad]
    if len(trained) == count:
        return trained
    raise ValueError(
        f"the checkpoint's EMA has {count} tensors; the model has {len(every)} parameters "
        f"({len(trained)} trained)"
    )


def reshard_ema(
    saved: Sequence[dict[str, torch.Tensor]],
    params: Sequence[torch.nn.Parameter],
    rank: int,
) -> dict[str, torch.Tensor]:
    """This rank's EMA state from the N ranks' saved states (see the module doc)."""
    shadows = _ema_params(params, len(saved[0]))
    state = {}
    for i, param in enumerate(shadows):
        key = f"shadow.{i}"
        numel = zero3_numel(param)
        if numel is None:  # whole on every rank
            state[key] = saved[0][key]
            continue
        # ZeRO-3: rank r owns elements [r*p, (r+1)*p) of the flattened, zero-padded parameter.
        whole = torch.cat([s[key].flatten() for s in saved])[:numel]
        size = local_partition(param).numel()
        part = whole[rank * size : (rank + 1) * size]
        state[key] = torch.cat([part, part.new_zeros(size - part.numel())])
    return state
