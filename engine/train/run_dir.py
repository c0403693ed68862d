"""The start of a run: decide, by reading ``run.output_dir`` only, whether to resume and from
which checkpoint; then (rank 0) carry out the few moves that decision needs.

Nothing is written into the output folder before the decision, so a refused start (another
run's folder, a mismatched config, no usable checkpoint) leaves every file as it was. The moves
never delete: an incomplete or corrupt checkpoint goes to ``checkpoints/corrupt-stepN``,
checkpoints newer than ``run.resume_from`` to ``checkpoints/superseded-<time>/``, and with
``run.overwrite`` the whole old run to ``<output_dir>.replaced-<time>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig, load_config
from .checkpoint import CheckpointStore, checkpoint_step, verify_checkpoint
from .fingerprint import (
    CheckpointMismatchError,
    check_fingerprint,
    fingerprint_differences,
    run_fingerprint,
)
from .metrics import METRICS_FILE
from .reshard import to_universal, universal_folder
from .run_lock import LOCK_FILE, FolderInUseError

__all__ = ["StartPlan", "apply_start", "plan_start"]

log = logging.getLogger("e2ed2.train")

#: What marks a folder as holding a run (anything else in it is left alone).
RUN_CONTENTS = ("config.toml", METRICS_FILE, "tensorboard", "checkpoints", "samples", "export")


@dataclasses.dataclass
class StartPlan:
    """Where a run starts: a checkpoint (or None = step 0) and the moves that come first."""

    checkpoint: Path | None = None
    # Set for a checkpoint of another number of ranks under ZeRO: its universal form's folder,
    # written by apply_start, loaded with DeepSpeed's "load_universal" (see reshard.py).
    universal: Path | None = None
    moves: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    copies: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _holds_run(output_dir: Path) -> list[str]:
    return [name for name in RUN_CONTENTS if (output_dir / name).exists()]


def _resolve_resume_from(value: int | str, checkpoints: Path) -> Path:
    if isinstance(value, int) or value.isdigit():
        return checkpoints / CheckpointStore.tag(int(value))
    return Path(value)


def _check_resumable(
    path: Path, fingerprint: dict[str, Any], config: TrainConfig, world_size: int
) -> bool:
    """Raises where ``path`` cannot be resumed by this run; True if it was written by another
    number of ranks (then resharded, see reshard.py): allowed at the same global batch only,
    which the data position counts in."""
    state = CheckpointStore.read_state(path)
    check_fingerprint(path, fingerprint, state["fingerprint"])
    if state["world_size"] == world_size:
        return False
    run = config.run
    ours = run.batch_per_rank * world_size * run.grad_accum_steps
    theirs = state.get("train_batch_size")
    if theirs != ours:
        written = (
            f"a global batch of {theirs}"
            if theirs is not None
            else "no recorded global batch (an older checkpoint)"
        )
        raise ConfigError(
            f"checkpoint {path} was written by {state['world_size']} ranks with {written}; this "
            f"run has {world_size} ranks x run.batch_per_rank={run.batch_per_rank} x "
            f"run.grad_accum_steps={run.grad_accum_steps} = {ours}: resume at the same global "
            f"batch (its data position counts global batches), launch {state['world_size']} "
            "ranks, or start a new run.output_dir"
        )
    return True


def _reshard(plan: StartPlan, checkpoints: Path, fingerprint: dict[str, Any]) -> None:
    """A checkpoint of another number of ranks: ZeRO state goes through its universal form."""
    if fingerprint["zero_optimization.stage"] > 0 and plan.checkpoint is not None:
        plan.universal = universal_folder(checkpoints, plan.checkpoint)
        plan.warnings.append(
            f"checkpoint {plan.checkpoint} was written by another number of ranks: its ZeRO "
            f"state is converted into {plan.universal} and resharded"
        )


def plan_start(config: TrainConfig, fingerprint: dict[str, Any], world_size: int) -> StartPlan:
    """The start decision, from reading the output folder only (every rank may call it).

    Raises ConfigError / CheckpointMismatchError (naming the file or key) where the run must not
    start: the folder is a file or holds another run, no checkpoint is usable, the chosen one is
    broken, or a checkpoint's config differs.
    """
    run = config.run
    output_dir = Path(run.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir={run.output_dir!r} is a file; it must be a folder")
    checkpoints = output_dir / "checkpoints"
    store = CheckpointStore(checkpoints, rank=0, world_size=world_size, keep=1)
    held = _holds_run(output_dir)
    plan = StartPlan()

    if run.overwrite:
        if run.resume_from is not None:
            chosen = _resolve_resume_from(run.resume_from, checkpoints).resolve()
            if chosen.is_relative_to(output_dir.resolve()):
                raise ConfigError(
                    "run.overwrite=true moves run.output_dir aside, so run.resume_from cannot "
                    f"point into it ({chosen}); unset one of them"
                )
        if held:
            aside = output_dir.with_name(f"{output_dir.name}.replaced-{_stamp()}")
            plan.moves.append((output_dir, aside))
            plan.warnings.append(
                f"run.overwrite=true: the run in {output_dir} ({', '.join(held)}) is moved "
                f"to {aside}"
            )
        if run.resume_from is None:
            return plan

    if run.resume_from is not None:
        chosen = _resolve_resume_from(run.resume_from, checkpoints)
        problem = verify_checkpoint(chosen)
        if problem is not None:
            raise ConfigError(f"run.resume_from={run.resume_from!r}: {problem}")
        reshard = _check_resumable(chosen, fingerprint, config, world_size)
        plan.checkpoint = chosen
        if reshard:
            _reshard(plan, checkpoints, fingerprint)
        step = CheckpointStore.read_state(chosen)["step"]
        newer = [p for p in store.named() if checkpoint_step(p) > step]
        if newer and not run.overwrite:
            aside = checkpoints / f"superseded-{_stamp()}"
            plan.moves += [(p, aside / p.name) for p in newer]
            if (output_dir / METRICS_FILE).is_file():
                # The metrics past `step` are truncated at the start; their copy stays with the
                # checkpoints they belong to.
                plan.copies.append((output_dir / METRICS_FILE, aside / METRICS_FILE))
            plan.warnings.append(
                f"run.resume_from={run.resume_from!r}: the newer checkpoints "
                f"{[p.name for p in newer]} are moved to {aside}"
            )
        return plan

    if not run.resume:
        if held:
            raise ConfigError(
                f"run.output_dir={run.output_dir!r} already holds a run ({', '.join(held)}) and "
                "run.resume=false would mix a new one into it: set run.overwrite=true to move "
                "the old run aside, or choose a new run.output_dir"
            )
        return plan

    problems: list[str] = []
    for candidate in reversed(store.named()):
        problem = verify_checkpoint(candidate)
        if problem is None:
            reshard = _check_resumable(candidate, fingerprint, config, world_size)
            plan.checkpoint = candidate
            if reshard:
                _reshard(plan, checkpoints, fingerprint)
            if problems:
                plan.warnings.append(f"resuming from the older complete checkpoint {candidate}")
            return plan
        aside = checkpoints / f"corrupt-{candidate.name}-{_stamp()}"
        problems.append(f"{candidate.name}: {problem}")
        plan.moves.append((candidate, aside))
        plan.warnings.append(
            f"checkpoint {candidate} cannot be resumed: {problem}; moved to {aside}"
        )
    if problems:
        # Never silently a fresh start over a run whose checkpoints all failed.
        raise ConfigError(
            f"no usable checkpoint in {checkpoints} ({'; '.join(problems)}); choose one with "
            "run.resume_from=PATH, or start over with run.overwrite=true"
        )
    if "config.toml" in held:
        # Killed before its first checkpoint: the same run starts over at step 0; another
        # run's folder is refused (it would be mixed with this one).
        try:
            theirs = load_config(str(output_dir / "config.toml"))
            differ = fingerprint_differences(fingerprint, _fingerprint_like(theirs, fingerprint))
        except ConfigError as err:
            differ = [f"its config.toml does not load ({err})"]
        if differ:
            raise CheckpointMismatchError(
                f"run.output_dir={run.output_dir!r} holds another run without a checkpoint "
                f"({'; '.join(differ)}): start a new run.output_dir, or set run.overwrite=true to "
                "move it aside"
            )
    return plan


def _fingerprint_like(config: TrainConfig, ours: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of another run's config.toml (the ZeRO stage: ours, its JSON may be gone)."""
    # Through JSON, as a checkpoint's saved fingerprint is (tuples become lists).
    return json.loads(json.dumps(run_fingerprint(config, ours["zero_optimization.stage"])))


def apply_start(plan: StartPlan, output_dir: Path) -> None:
    """Rank 0: logs the plan's warnings, makes its moves, removes interrupted saves' leftovers."""
    for warning in plan.warnings:
        log.warning("%s", warning)
    for source, target in plan.copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    for source, target in plan.moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        if source == output_dir:
            _keep_lock_file(target, output_dir)
    CheckpointStore(output_dir / "checkpoints", rank=0, world_size=1, keep=1).remove_leftovers()
    if plan.universal is not None and plan.checkpoint is not None:
        to_universal(plan.checkpoint, plan.universal)


def _keep_lock_file(aside: Path, output_dir: Path) -> None:
    """After ``run.overwrite`` moved the whole folder aside (one atomic rename), the lock file
    this run holds goes back to ``output_dir`` (the lock follows the file, see run_lock.py).

    Neither step replaces what is there: a folder or lock file that appeared at ``output_dir``
    in between belongs to a process that started meanwhile, and this run stops instead.
    """
    held = aside / LOCK_FILE
    if not held.is_file():
        return
    try:
        output_dir.mkdir()
        os.link(held, output_dir / LOCK_FILE)
    except FileExistsError:
        raise FolderInUseError(
            f"run.output_dir={str(output_dir)!r} was created again by another process while "
            f"this run moved the old one to {aside}; one process writes a folder at a time"
        ) from None
    held.unlink()
