"""Checkpoints that are never seen half-written.

Layout under ``<output_dir>/checkpoints``::

    step00000200/                     a complete checkpoint (published by one rename)
        step00000200/...              DeepSpeed's model + optimizer (+ scheduler) shards
        discriminator/...             the discriminator's DeepSpeed checkpoint (GAN runs)
        rank00000.safetensors         per-rank EMA partition
        rank00000.state.pt            per-rank RNG states (tensors/ints only: weights_only loads)
        trainer.json                  step, data position, config fingerprint
        export/                       the EMA weights as a diffusers folder (see export.py)
        zero_to_fp32.py, latest       DeepSpeed's recovery script (ZeRO) and tag pointer: it runs
                                      as ``zero_to_fp32.py step00000200 OUT``, with no --tag
        COMPLETE                      written last: the size of every file above (JSON)
    .tmp-step00000400/                being written; ignored and removed by the next start/save
    .old-step00000000/                being deleted (keep_checkpoints); ignored likewise

What goes in is registered once, by the trainer, as a dict of named entries whose kind says
where each lives (checkpointed.py): ``model`` and ``discriminator`` are DeepSpeed engines, ``ema``
and ``rng`` per-rank files, ``data`` and ``counters`` keys of ``trainer.json``; the save and the
load iterate over it.

All ranks write into the temporary folder and agree that every write succeeded; rank 0 writes
the ``COMPLETE`` marker, fsyncs the folder and publishes it by an atomic ``os.replace``: a crash
leaves the old set of checkpoints or the new one. A failed write (a full disk) removes the
temporary folder and raises :class:`CheckpointSaveError` naming the cause. Only folders with a
marker count; :func:`verify_checkpoint` re-checks sizes, JSON and safetensors headers.

Loading never unpickles arbitrary objects: the EMA is safetensors, the RNG state is read with
``torch.load(weights_only=True)``, and DeepSpeed's own loader (``torch.load(weights_only=False)``
in DeepSpeed 0.19) is replaced on each engine by :func:`use_weights_only_loading`.

Size: over 400 lines because the layout above is read and written in one place (the save's
agreed phases, the load, the checks); what it holds is registered in checkpointed.py, what a
failed write means lives in write_errors.py and how another number of ranks resumes in
reshard.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpointed import (
    MODEL,
    Checkpointed,
    DeepSpeedEngineState,
    ProcessRng,
    RankPrivate,
    RankTensors,
    capture_rng_state,
    check_entries,
    json_entries,
    rank_file,
    restore_rng_state,
)
from .deepspeed_compat import (
    failing_checkpoint_writes,
    use_weights_only_loading,
    weights_only_torch_load,
)
from .reshard import UNIVERSAL_PREFIX, reshard_ema, universal_folder
from .write_errors import as_os_error, attempt_write, injected_save_fault

__all__ = [
    "MARKER",
    "CheckpointError",
    "CheckpointSaveError",
    "CheckpointStore",
    "ProcessRng",
    "checkpoint_step",
    "capture_rng_state",
    "restore_rng_state",
    "use_weights_only_loading",
    "verify_checkpoint",
    "weights_only_torch_load",
]

log = logging.getLogger("e2ed2.checkpoint")

_COMPLETE = re.compile(r"^step(\d{8})$")
#: Written last into every checkpoint: ``{"step": N, "files": {relative path: bytes}}``.
MARKER = "COMPLETE"
TRAINER_STATE = "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint to resume from is incomplete or unreadable; the message names the file."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (its temporary folder was removed); names the cause."""


def checkpoint_step(path: Path) -> int | None:
    """The step of a folder named like a checkpoint (``step00000200`` -> 200), else None."""
    match = _COMPLETE.match(path.name)
    return int(match.group(1)) if match else None


def _manifest(root: Path) -> dict[str, int]:
    return {
        str(Path(folder, name).relative_to(root)): os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(root)
        for name in names
        if not (folder == str(root) and name == MARKER)
    }


def verify_checkpoint(path: Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed (naming the file), or None if it can.

    Checks what a resume reads without loading any tensor: the completion marker, that every
    file it lists is there with its size (a truncated or missing file), that ``trainer.json`` is
    a JSON object with step / world size / fingerprint, and that every safetensors header parses.
    """
    marker = path / MARKER
    if not path.is_dir():
        return f"{path} is not a folder"
    if not marker.is_file():
        return f"{marker} is missing (an interrupted save, or a folder that was copied in part)"
    try:
        files = json.loads(marker.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{marker} is unreadable ({type(err).__name__}: {err})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written (truncated?)"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        missing = [k for k in ("step", "world_size", "fingerprint") if k not in state]
        if missing:
            raise KeyError(f"no {missing}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path / TRAINER_STATE} is unreadable ({type(err).__name__}: {err})"
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 (safetensors raises its own and OS errors)
            return f"{file} is unreadable ({type(err).__name__}: {err})"
    return None


def _engines(states: Checkpointed) -> dict[str, Any]:
    """The DeepSpeed engines of ``states`` by name, the model's first (saved and loaded first)."""
    engines = {n: e.engine for n, e in states.items() if isinstance(e, DeepSpeedEngineState)}
    return dict(sorted(engines.items(), key=lambda item: item[0] != MODEL))


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


def _cause(error: OSError, where: Path) -> str:
    """``writing FILE failed: CAUSE`` (a full disk said so, however the writer reported it)."""
    if error.errno != errno.ENOSPC:
        return f"writing {error.filename or where} failed: {type(error).__name__}: {error}"
    # A writer that raised no OSError (write_errors.py): its own words, e.g. torch's "unexpected
    # pos", stay in the line for whoever searches for them.
    writer = error.__cause__
    said = "" if writer is None else f" ({type(writer).__name__}: {str(writer).splitlines()[0]})"
    return f"writing {error.filename or where} failed: the disk is full (ENOSPC){said}; free space"


class CheckpointStore:
    """Saves and finds complete checkpoints in ``root``; all ranks call every method."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        rank: int,
        world_size: int,
        keep: int,
        device: torch.device | str = "cpu",
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        # Written into every checkpoint's trainer.json (run_dir.py compares it before a resume).
        self.fingerprint = fingerprint
        # Where the save's agreement all-reduce runs (the process group's device: NCCL needs CUDA).
        self.device = torch.device(device)

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def named(self) -> list[Path]:
        """Folders named like a checkpoint, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        found = {
            p: step
            for p in self.root.iterdir()
            if p.is_dir() and (step := checkpoint_step(p)) is not None
        }
        return sorted(found, key=found.__getitem__)

    def complete(self) -> list[Path]:
        """Published checkpoints (with their completion marker), oldest first."""
        return [p for p in self.named() if (p / MARKER).is_file()]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def _all_ranks_ok(self, ok: bool) -> bool:
        """True if ``ok`` on every rank (replaces a barrier, so a rank that failed a write does
        not leave the others waiting at one)."""
        if not (dist.is_available() and dist.is_initialized() and self.world_size > 1):
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _failed_save(self, staging: Path, step: int, error: OSError | None) -> NoReturn:
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if error is None:
            raise CheckpointSaveError(
                f"checkpoint step {step} was not saved: another rank failed to write into "
                f"{staging} (its message says why); the temporary folder was removed"
            )
        raise CheckpointSaveError(
            f"checkpoint step {step} was not saved: {_cause(error, staging)}; the temporary "
            "folder was removed and the previous checkpoints are untouched"
        ) from error

    def _stop_inside_deepspeed(self, step: int, error: OSError) -> NoReturn:
        """A write inside DeepSpeed's save failed on this rank of several: its peers may wait
        in one of that save's collectives, which this rank can no longer match, so it agrees
        with no one and stops; the launcher ends the others (README: Multi-GPU)."""
        raise CheckpointSaveError(
            f"checkpoint step {step} was not saved: rank {self.rank} of {self.world_size}: "
            f"{_cause(error, self.root)}; the other ranks wait inside DeepSpeed's save and are "
            "stopped by the launcher; the previous checkpoints are untouched (the temporary "
            "folder is removed at the next start)"
        ) from error

    def save(
        self,
        step: int,
        states: Checkpointed,
        *,
        write_extra: Callable[[Path], object] | None = None,
    ) -> Path:
        """Writes checkpoint ``step`` of every entry of ``states`` (all ranks; see
        checkpointed.py); ``write_extra(staging)`` runs on all ranks.

        A failed write (a full disk, a permission) on any rank removes the temporary folder and
        raises :class:`CheckpointSaveError` on every rank; nothing published is touched. Inside
        DeepSpeed's own save on a rank of several, the failing rank raises alone (see
        :meth:`_stop_inside_deepspeed`). Every rank still runs every collective (DeepSpeed's
        save, ``write_extra``'s ZeRO-3 gather) after a local failure, so none is left waiting.
        """
        check_entries(states)
        engines = _engines(states)
        tag = self.tag(step)
        staging = self.root / f".tmp-{tag}"
        final = self.root / tag
        error: OSError | None = None
        try:
            if self.rank == 0:
                self.remove_leftovers()
                staging.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            error = err
        if not self._all_ranks_ok(error is None):
            self._failed_save(staging, step, error)
        fault = injected_save_fault(self.rank)
        try:
            with ExitStack() as faults:
                if fault is not None:  # the test hook fails the model engine's writes
                    faults.enter_context(failing_checkpoint_writes(engines[MODEL], fault))
                for name, engine in engines.items():
                    # The model in the tag's folder: DeepSpeed's own layout, zero_to_fp32.py's.
                    folder = tag if name == MODEL else name
                    engine.save_checkpoint(str(staging), tag=folder, save_latest=False)
        except Exception as err:
            error = as_os_error(err)
            if error is None:
                raise
            if self.world_size > 1:
                self._stop_inside_deepspeed(step, error)
        error = attempt_write(error, lambda: self._write_rank_files(staging, states))
        if write_extra is not None:  # collective (the ZeRO-3 gather of an export): always run
            error = attempt_write(error, lambda: write_extra(staging), always=self.world_size > 1)
        if self.rank == 0:
            error = attempt_write(
                error,
                lambda: self._write_trainer_state(
                    staging,
                    tag,
                    {
                        "step": step,
                        **{name: e.state_dict() for name, e in json_entries(states).items()},
                        **({} if self.fingerprint is None else {"fingerprint": self.fingerprint}),
                        # The global batch: a resume on other ranks keeps it (reshard.py).
                        "train_batch_size": engines[MODEL].train_batch_size(),
                    },
                ),
            )
        if not self._all_ranks_ok(error is None):
            self._failed_save(staging, step, error)
        try:
            if self.rank == 0:
                # The marker last: a folder is a checkpoint only once every file above is in it.
                marker = {"step": step, "files": _manifest(staging)}
                (staging / MARKER).write_text(json.dumps(marker, indent=1))
                _fsync_tree(staging)
                if final.exists():  # a checkpoint of this step from an abandoned branch
                    retired = final.with_name(f".old-{final.name}")
                    os.replace(final, retired)
                    shutil.rmtree(retired, ignore_errors=True)
                os.replace(staging, final)
                _fsync_dir(self.root)
        except OSError as err:
            error = err
        if not self._all_ranks_ok(error is None):
            self._failed_save(staging, step, error)
        if self.rank == 0:
            for old in self.complete()[: -self.keep]:
                # Renamed first: a crash mid-deletion leaves no partial folder under its name.
                retired = old.with_name(f".old-{old.name}")
                os.replace(old, retired)
                shutil.rmtree(retired, ignore_errors=True)
        _barrier()
        return final

    def _write_rank_files(self, staging: Path, states: Checkpointed) -> None:
        # Tensors first, then the private states (the order of the files before the registry).
        for name, entry in states.items():
            if isinstance(entry, RankTensors):
                save_file(
                    {k: v.contiguous().cpu() for k, v in entry.state.state_dict().items()},
                    str(staging / rank_file(name, entry, self.rank)),
                )
        for name, entry in states.items():
            if isinstance(entry, RankPrivate):
                torch.save(entry.state.state_dict(), staging / rank_file(name, entry, self.rank))

    def _write_trainer_state(self, staging: Path, tag: str, trainer_state: dict[str, Any]) -> None:
        with open(staging / TRAINER_STATE, "w") as f:
            json.dump({**trainer_state, "world_size": self.world_size}, f, indent=2)
        # DeepSpeed's own pointer, inside the folder: its bundled zero_to_fp32.py (and
        # engine.load_checkpoint(folder)) find the tag without --tag.
        (staging / "latest").write_text(tag)

    def remove_leftovers(self) -> None:
        """Rank 0: removes what interrupted saves and deletions left, and converted forms of a
        checkpoint resumed on another number of ranks (never a checkpoint)."""
        leftovers = [".tmp-*", ".old-*", f"{UNIVERSAL_PREFIX}*"]
        for stale in [p for pattern in leftovers for p in self.root.glob(pattern)]:
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        """``trainer.json`` of a checkpoint (step, data position, config fingerprint), read before
        any engine state so a mismatched config is reported by name, not by a shape error."""
        with open(path / TRAINER_STATE) as f:
            return json.load(f)

    def load(self, path: Path, states: Checkpointed) -> dict[str, Any]:
        """Restores every entry of ``states`` from checkpoint ``path``; returns its
        ``trainer.json`` (step, data position, fingerprint, ...).

        The engines load first; every other entry's file is read before any of those entries
        changes (per-rank files, then ``trainer.json``'s keys). A file that passed
        :func:`verify_checkpoint` but still cannot be read (same size, bad bytes) raises
        :class:`CheckpointError` naming the checkpoint and the failure; a per-rank tensor entry
        without this rank's file raises FileNotFoundError.
        """
        check_entries(states)
        engines = _engines(states)
        trainer_state = self.read_state(path)
        # Another number of ranks (allowed by run_dir.plan_start at the same global batch):
        # the ZeRO state from its universal form, the EMA resharded (see reshard.py).
        saved_ranks = trainer_state["world_size"]
        universal = universal_folder(self.root, path)
        source = universal if saved_ranks != self.world_size and universal.is_dir() else path
        universal_load = weights_only_torch_load() if source == universal else nullcontext()
        tensors: list[tuple[RankTensors, dict[str, torch.Tensor] | None]] = []
        private: list[tuple[RankPrivate, Any]] = []
        try:
            for name, engine in engines.items():
                if name == MODEL:
                    with universal_load:
                        loaded, _ = engine.load_checkpoint(str(source), tag=path.name)
                    if loaded is None:
                        raise FileNotFoundError(
                            f"DeepSpeed found no model checkpoint in {source / path.name}"
                        )
                else:
                    loaded, _ = engine.load_checkpoint(str(path), tag=name)
                    if loaded is None:
                        raise FileNotFoundError(f"no {name} checkpoint in {path}/{name}")
            for name, entry in states.items():
                if isinstance(entry, RankTensors):
                    tensors.append((entry, self._read_rank_tensors(path, name, entry, saved_ranks)))
            for name, entry in states.items():
                if isinstance(entry, RankPrivate):
                    file = path / rank_file(name, entry, self.rank)
                    state = torch.load(file, weights_only=True) if file.is_file() else None
                    if state is None and saved_ranks == self.world_size:
                        raise FileNotFoundError(f"{file} is missing")
                    private.append((entry, state))
        except Exception as err:  # noqa: BLE001 (torch, DeepSpeed and safetensors raise many)
            raise CheckpointError(
                f"checkpoint {path} could not be loaded ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); choose an older one with "
                "run.resume_from=STEP or start over with run.overwrite=true"
            ) from err
        for rank_entry, state in private:
            if state is not None:  # a rank the checkpoint did not have keeps its fresh seed
                rank_entry.state.load_state_dict(state)
        for entry, tensor_state in tensors:
            if tensor_state is None:
                raise FileNotFoundError(
                    f"checkpoint {path} has no {entry.label} for rank {self.rank}"
                )
            entry.state.load_state_dict(tensor_state)
        for name, stateful in json_entries(states).items():
            stateful.load_state_dict(trainer_state.get(name, {}))
        return trainer_state

    def _read_rank_tensors(
        self, path: Path, name: str, entry: RankTensors, saved_ranks: int
    ) -> dict[str, torch.Tensor] | None:
        """This rank's tensors of ``entry`` in checkpoint ``path``, resharded from every saved
        rank's file if it was written by another number of ranks; None if it has none."""
        if saved_ranks == self.world_size:
            file = path / rank_file(name, entry, self.rank)
            return load_file(str(file)) if file.is_file() else None
        if not (path / rank_file(name, entry, 0)).is_file():
            return None
        every = [load_file(str(path / rank_file(name, entry, r))) for r in range(saved_ranks)]
        return reshard_ema(every, list(entry.partitioned_like.parameters()), self.rank)
