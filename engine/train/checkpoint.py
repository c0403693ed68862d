"""Checkpoints that are never seen half-written.

Layout under ``<output_dir>/checkpoints``::

    step00000200/                     a complete checkpoint (published by one rename)
        step00000200/...              DeepSpeed's model + optimizer (+ scheduler) shards
        discriminator/...             the discriminator's DeepSpeed checkpoint (GAN runs)
        rank00000.safetensors         per-rank EMA partition
        rank00000.state.pt            per-rank RNG states (tensors/ints only: weights_only loads)
        trainer.json                  step, data position, config fingerprint
        export/                       the EMA weights as a diffusers folder (see export.py)
    .tmp-step00000400/                being written; ignored and removed by the next save
    .old-step00000000/                being deleted (keep_checkpoints); ignored likewise

All ranks write into the temporary folder, meet at a barrier, and rank 0 flushes it to disk and
publishes it with an atomic ``os.replace``; a crash at any point leaves either the old set of
complete checkpoints or the new one. The newest complete one is found by name, with no separate
"latest" pointer to fall out of sync.

Loading never unpickles arbitrary objects: the EMA is safetensors, the RNG state is read with
``torch.load(weights_only=True)``, and DeepSpeed's own loader (``torch.load(weights_only=False)``
in DeepSpeed 0.19) is replaced on each engine by :func:`use_weights_only_loading`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointStore",
    "capture_rng_state",
    "restore_rng_state",
    "use_weights_only_loading",
]

log = logging.getLogger("e2ed2.checkpoint")

_COMPLETE = re.compile(r"^step(\d{8})$")


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


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints (found by loading
    stage 0-3 fp32/bf16 checkpoints with ``weights_only=True``); plain data, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_weights_only_loading(engine: Any) -> bool:
    """Makes ``engine.load_checkpoint`` read its files with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19's ``TorchCheckpointEngine.load`` hard-codes ``weights_only=False`` (a
    checkpoint file could run code when loaded) and its API has no switch. Model, ZeRO optimizer
    and scheduler states all go through that one method (universal / MoE checkpoints, which call
    ``torch.load`` directly, are not used here), so it is replaced on this engine's instance by a
    ``weights_only`` load that allows only DeepSpeed's few plain-data classes. Returns False (and
    warns) for another checkpoint engine (Nebula, fast writer), which is left as it is.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine) is not TorchCheckpointEngine:
        log.warning(
            "DeepSpeed checkpoint engine %s keeps its own loader (torch.load may unpickle code)",
            type(checkpoint_engine).__name__,
        )
        return False
    allowed = _deepspeed_safe_globals()

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
    return True


def _fsync_tree(root: Path) -> None:
    """Flushes every file under ``root`` and the folders themselves: the rename that publishes
    a checkpoint must not reach the disk before its contents (a power loss, not only a crash)."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointStore:
    """Saves and finds complete checkpoints in ``root``; all ranks call every method."""

    def __init__(self, root: str | os.PathLike, *, rank: int, world_size: int, keep: int) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep = keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _COMPLETE.match(p.name)]
        return sorted(found, key=lambda p: int(_COMPLETE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(
        self,
        step: int,
        *,
        engine: Any,
        disc_engine: Any | None,
        ema_state: dict[str, torch.Tensor] | None,
        trainer_state: dict[str, Any],
        write_extra: Callable[[Path], object] | None = None,
    ) -> Path:
        """Writes checkpoint ``step`` (all ranks); ``write_extra(staging)`` runs on all ranks."""
        tag = self.tag(step)
        staging = self.root / f".tmp-{tag}"
        final = self.root / tag
        if self.rank == 0:
            for pattern in (".tmp-*", ".old-*"):
                for stale in self.root.glob(pattern) if self.root.is_dir() else []:
                    shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        if disc_engine is not None:
            disc_engine.save_checkpoint(str(staging), tag="discriminator", save_latest=False)
        if ema_state is not None:
            save_file(
                {k: v.contiguous().cpu() for k, v in ema_state.items()},
                str(staging / f"rank{self.rank:05d}.safetensors"),
            )
        torch.save(capture_rng_state(), staging / f"rank{self.rank:05d}.state.pt")
        if write_extra is not None:
            write_extra(staging)
        if self.rank == 0:
            with open(staging / "trainer.json", "w") as f:
                json.dump({**trainer_state, "world_size": self.world_size}, f, indent=2)
        _barrier()
        if self.rank == 0:
            _fsync_tree(staging)
            os.replace(staging, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep]:
                # Renamed first: a crash halfway through the deletion must not leave a partial
                # folder under a complete checkpoint's name.
                retired = old.with_name(f".old-{old.name}")
                os.replace(old, retired)
                shutil.rmtree(retired, ignore_errors=True)
        _barrier()
        return final

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        """``trainer.json`` of a checkpoint (step, data position, config fingerprint), read before
        any engine state so a mismatched config is reported by name, not by a shape error."""
        with open(path / "trainer.json") as f:
            return json.load(f)

    def load(
        self,
        path: Path,
        *,
        engine: Any,
        disc_engine: Any | None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """Restores engines and RNG; returns (trainer_state, this rank's EMA state or None)."""
        trainer_state = self.read_state(path)
        if trainer_state["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {trainer_state['world_size']} ranks; this run "
                f"has {self.world_size} (ZeRO partitions and the EMA shards are per rank)"
            )
        loaded, _ = engine.load_checkpoint(str(path), tag=path.name)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no model checkpoint in {path}/{path.name}")
        if disc_engine is not None:
            loaded, _ = disc_engine.load_checkpoint(str(path), tag="discriminator")
            if loaded is None:
                raise FileNotFoundError(f"no discriminator checkpoint in {path}/discriminator")
        ema_file = path / f"rank{self.rank:05d}.safetensors"
        ema_state = load_file(str(ema_file)) if ema_file.is_file() else None
        rng = torch.load(path / f"rank{self.rank:05d}.state.pt", weights_only=True)
        restore_rng_state(rng)
        return trainer_state, ema_state
