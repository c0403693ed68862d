"""A rank killed with SIGKILL in the middle of a checkpoint save loses at most one interval.

The real ``deepspeed`` launcher runs 2 CPU ranks (gloo) of ZeRO-3 training; rank 1 is killed while
the step-4 checkpoint is being written (after the step-2 one is complete), the launcher takes the
other rank down, and the same command is started again. It must resume from the newest complete
checkpoint by itself, never from the half-written one, finish, and from there on log exactly the
losses and end with exactly the weights of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from e2ed2.engine.train.checkpoint import CheckpointStore
from e2ed2.engine.train.deepspeed_compat import SHM_DIR
from e2ed2.engine.train.distributed import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = [
    "--config",
    "scratch",
    "model.num_layers=2",
    "run.batch_per_rank=2",
    "run.log_every_steps=1",
    "run.sample_every_steps=1000",
    "run.num_sample_images=0",
    "trajectory.num_steps=4",
    "trajectory.checkpoint=step",
    "run.max_steps=6",
    "run.checkpoint_every_steps=2",
    "run.keep_checkpoints=2",
]


def _command(output_dir: Path, zero3: str) -> list[str]:
    # The port is part of "the same command": a restarted job gets the launcher line it had.
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "e2ed2.engine.cli.train",
        f"run.output_dir={output_dir}",
        f"run.deepspeed_config={zero3}",
        *TINY,
    ]


def _rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "e2ed2.engine.cli.train" in " ".join(
                child.cmdline()
            ):
                return child
        except psutil.Error:
            continue
    return None


def _kill_rank_during_save(
    cmd: list[str], checkpoints: Path, log: Path, env: dict[str, str]
) -> None:
    """Starts ``cmd`` and SIGKILLs rank 1 as soon as the step-4 save has begun."""
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 400
        while not (checkpoints / ".tmp-step00000004").is_dir():
            assert launcher.poll() is None, f"run ended before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no step-4 save began in time"
            time.sleep(0.002)
        assert (checkpoints / "step00000002").is_dir()
        victim = _rank_process(psutil.Process(launcher.pid), rank=1)
        assert victim is not None, "rank 1 not found among the launcher's processes"
        victim.send_signal(signal.SIGKILL)
        # The launcher sees a rank die and takes the other one down: the job fails as a whole.
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # our own session only
            launcher.wait()


def _losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    return {r["step"]: r["total"] for r in records}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=checkpoint.name)


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path,
    launcher_env: dict[str, str],
    run_checked: Callable[..., str],
    zero3_partition_everything: str,
) -> None:
    zero3 = zero3_partition_everything
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    checkpoints = crashed / "checkpoints"

    killed = _command(crashed, zero3)
    _kill_rank_during_save(killed, checkpoints, tmp_path / "killed.log", launcher_env)
    # DeepSpeed's CPU all-reduce buffers (64 MiB of RAM each in /dev/shm) are unlinked once every
    # rank has mapped them, so not even the SIGKILLed run leaves one behind.
    port = killed[killed.index("--master_port") + 1]
    left = [p.name for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert left == [], left
    on_disk = sorted(p.name for p in checkpoints.iterdir())
    store = CheckpointStore(checkpoints, rank=0, world_size=2, keep=2)
    resume_from = store.latest()
    # Killed mid-save: the half-written step 4 is under its temporary name and is not a
    # candidate; had the rename won the race, step 4 would be complete and chosen.
    assert resume_from is not None and resume_from.name in ("step00000002", "step00000004")
    if resume_from.name == "step00000002":
        assert on_disk == [".tmp-step00000004", "step00000002"], on_disk
    resume_step = int(resume_from.name.removeprefix("step"))

    output = run_checked(_command(crashed, zero3))
    assert f"resumed from {resume_from} at step {resume_step}" in output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step00000004", "step00000006"]
    run_checked(_command(straight, zero3))

    got, ref = _losses(crashed), _losses(straight)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    after = [step for step in ref if step > resume_step]
    worst_loss = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in after)
    a = _weights(checkpoints / "step00000006")
    b = _weights(straight / "checkpoints" / "step00000006")
    assert a.keys() == b.keys()
    worst_weight = max(
        ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b
    )
    print(
        f"resumed at step {resume_step}; steps {after} vs uninterrupted: max relative loss "
        f"difference {worst_loss:.1e}, weights at step 6 {worst_weight:.1e}"
    )
    # Not bitwise on 2 ranks: the first step after the restart is (loss and gradient norm),
    # later ones differ at fp32 rounding level (measured: losses 6e-7, weights 7e-6 relative).
    # A clean stop and restart does the same (measured with ZeRO-2 too), so it is not the kill;
    # a 1-rank resume is bitwise. Tolerances as in test_launcher.py.
    assert worst_loss <= 1e-5, {s: (got[s], ref[s]) for s in after}
    assert worst_weight <= 1e-4
    # Not vacuous: the weights moved after the restart.
    c = _weights(checkpoints / "step00000004")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4
