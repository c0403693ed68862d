"""Shared by the tests that start the real ``deepspeed`` launcher on CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
# Set by the launcher for each rank; a value left over in this process must not leak into it.
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def launcher_env() -> dict[str, str]:
    """Environment for launcher subprocesses: CPU only, one BLAS thread per rank (2 cores)."""
    env = {key: value for key, value in os.environ.items() if key not in _RENDEZVOUS}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture
def run_checked(launcher_env: dict[str, str]) -> Callable[..., str]:
    """Runs a command in ``launcher_env``; fails the test with its output tail unless it exits 0.
    Returns stdout + stderr."""

    def run(cmd: list[str], timeout: int = 600) -> str:
        done = subprocess.run(
            cmd, env=launcher_env, capture_output=True, text=True, timeout=timeout
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, (
            f"{' '.join(cmd)} failed ({done.returncode}):\n{output[-4000:]}"
        )
        return output

    return run


@pytest.fixture
def zero3_partition_everything(tmp_path: Path) -> str:
    """The shipped ZeRO-3 config with no persistent parameters, as a JSON path.

    ZeRO-3 keeps parameters under ``stage3_param_persistence_threshold`` elements whole on every
    rank; with the shipped 1e5 nearly all of a tiny model would be, and the tests would not
    exercise gathering and partitioning at all.
    """
    config = json.loads((DS_CONFIGS / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partition_everything.json"
    path.write_text(json.dumps(config))
    return str(path)
