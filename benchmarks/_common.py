"""Shared by the benchmark scripts: the CPU benchmark model, one measured training step, output.

Not a benchmark itself (no question of its own). Scripts import it as ``_common`` (they run as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from e2ed2.engine import LiveTensorTracker
from e2ed2.engine.core.estimate import (
    DenoiserShape,
    build_pixart,
    make_inputs,
    make_trajectory,
    run_iteration,
)

RESULTS = Path(__file__).resolve().parent / "results"

# "Large enough to be meaningful on CPU": a PixArt block stack at hidden 384 (6 heads x 64) with
# 256 image tokens (32x32 latent, patch 2), 32 text tokens, batch 2. Activations dominate the step
# (as at full size), and one network call takes tens of milliseconds on one core.
CPU_MODEL = DenoiserShape(
    num_layers=6, num_attention_heads=6, attention_head_dim=64, caption_channels=384, text_tokens=32
)
CPU_LATENT = 32
CPU_BATCH = 2
# --smoke: the same code path on a toy (seconds).
SMOKE_MODEL = DenoiserShape(
    num_layers=2, num_attention_heads=2, attention_head_dim=16, caption_channels=32, text_tokens=8
)
SMOKE_LATENT = 8


@dataclass(frozen=True)
class StepMeasurement:
    """One forward+backward through K steps (plain autograd: full gradients kept as ``.grad``)."""

    policy: str
    num_steps: int
    peak_bytes: int  # tracker peak of the step (activations + gradients; parameters excluded)
    step_seconds: float  # fastest of the timed repeats (the machine is shared: min, not mean)
    flops: int  # FlopCounterMode total (matmuls, convolutions, attention) incl. recomputes

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def measure_policies(
    shape: DenoiserShape,
    latent_size: int,
    batch: int,
    policies: list[str],
    num_steps: int,
    *,
    repeats: int = 3,
) -> list[StepMeasurement]:
    """Peak bytes (real tensors, tracker), FLOPs (fake tensors) and the fastest seconds of each
    policy at one K, on one model and one batch.

    Timing is interleaved: each repeat runs every policy once, in turn, so that load from other
    jobs on a shared machine falls on all policies alike and the ratios between them (what the
    benchmarks report) stay meaningful even when the absolute times drift.
    """
    model = build_pixart(shape, latent_size)
    clean, cond = make_inputs(shape, latent_size, batch, torch.float32)
    trajectories = {policy: make_trajectory(policy, num_steps) for policy in policies}

    def step(policy: str) -> None:
        model.zero_grad(set_to_none=True)
        run_iteration(model, trajectories[policy], clean, cond)

    peaks, flops = {}, {}
    for policy in policies:
        step(policy)  # warm-up (allocator, lazy init)
        model.zero_grad(set_to_none=True)
        with LiveTensorTracker(track_cuda=False) as tracker:
            run_iteration(model, trajectories[policy], clean, cond)
        peaks[policy] = tracker.report().peak_bytes
        with FakeTensorMode():
            fake_model = build_pixart(shape, latent_size)
            fake_clean, fake_cond = make_inputs(shape, latent_size, batch, torch.float32)
            with FlopCounterMode(display=False) as counter:
                run_iteration(fake_model, trajectories[policy], fake_clean, fake_cond)
        flops[policy] = counter.get_total_flops()
    seconds: dict[str, list[float]] = {policy: [] for policy in policies}
    for _ in range(repeats):
        for policy in policies:
            start = time.perf_counter()
            step(policy)
            seconds[policy].append(time.perf_counter() - start)
    return [
        StepMeasurement(
            policy=policy,
            num_steps=num_steps,
            peak_bytes=peaks[policy],
            step_seconds=min(seconds[policy]),
            flops=flops[policy],
        )
        for policy in policies
    ]


def measure_cells(
    cells: list[Hashable], once: Callable[[Any], object], repeats: int
) -> dict[Any, dict[str, Any]]:
    """Per cell: device and host peak of one ``once(cell)`` after a warm-up (tracker, real
    tensors), and the fastest of ``repeats`` timed runs. The cells run in turn within each repeat,
    so load from other jobs falls on all of them alike and their ratios stay side by side."""
    rows: dict[Any, dict[str, Any]] = {}
    for cell in cells:
        once(cell)  # warm-up (allocator, lazy init)
        with LiveTensorTracker(track_cuda=False) as tracker:
            once(cell)
        report = tracker.report()
        rows[cell] = {
            "device_peak_bytes": report.peak_bytes,
            "host_peak_bytes": report.host_peak_bytes,
            "seconds": [],
        }
    for _ in range(repeats):
        for cell in cells:
            started = time.perf_counter()
            once(cell)
            rows[cell]["seconds"].append(time.perf_counter() - started)
    for row in rows.values():
        row["step_seconds"] = min(row["seconds"])
    return rows


def machine() -> dict[str, Any]:
    """Where a result was measured (CPU timings are CPU timings, not GPU performance)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_1min"] = os.getloadavg()[0]
    return info


def write_result(name: str, payload: dict[str, Any], figure: Any, *, smoke: bool) -> Path:
    """``results/<name>.json`` + ``.png`` (``results/smoke/`` for --smoke; not committed).

    ``E2ED2_BENCH_RESULTS`` replaces ``results/`` (the tests write their smoke runs elsewhere).
    """
    root = Path(os.environ.get("E2ED2_BENCH_RESULTS", RESULTS))
    folder = root / "smoke" if smoke else root
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"benchmark": name, "smoke": smoke, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return path


def mib(nbytes: float) -> float:
    return nbytes / 2**20
