"""The live-tensor tracker, and what the checkpoint policies buy (memory) and cost (FLOPs)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from e2ed2.engine import (
    LiveTensorTracker,
    SamplerConfig,
    Trajectory,
    TrajectoryConfig,
    build_schedule,
    track_memory,
)
from e2ed2.engine.core.memory import host_allocations


def test_tracker_counts_allocations_frees_and_peak() -> None:
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(2000, dtype=torch.float16)  # 4000 B
        assert tracker.live_bytes == 8000
        del a
        c = torch.empty(500, dtype=torch.float64)  # 4000 B
        view = c[:10]  # a view allocates nothing
        c.add_(1.0)  # neither does an in-place op
    report = tracker.report()
    assert report.peak_bytes == 8000
    assert report.end_bytes == 8000
    assert report.peak_bytes_per_device == {"cpu": 8000}
    del b, c, view


def test_tracker_ignores_views_of_pre_existing_tensors() -> None:
    weight = torch.randn(256, 256)
    with LiveTensorTracker() as tracker:
        transposed = weight.t()
        detached = weight.detach()
        out = torch.randn(4, 256) @ transposed  # 4 KiB input + 4 KiB output
    assert tracker.report().peak_bytes == 2 * 4 * 256 * 4
    del transposed, detached, out


def test_track_memory_of_autograd_saved_tensors() -> None:
    x = torch.randn(64, 128, requires_grad=True)

    def forward():
        return torch.tanh(x).sum()

    loss, report = track_memory(forward)
    # tanh's output (32 KiB) is saved for backward and stays alive with the graph.
    assert report.end_bytes >= 64 * 128 * 4
    del loss


def _pixart_step_peak(make_pixart, make_conditioning, policy: str, num_steps: int, fake: bool):
    size, batch = 32, 4

    def build():
        model = make_pixart(
            sample_size=size, num_layers=2, heads=4, head_dim=16, reinit_zeros=not fake
        )
        cond = make_conditioning(batch)
        clean = torch.randn(batch, 4, size, size)
        return model, cond, clean

    trajectory = Trajectory(
        TrajectoryConfig(num_steps=num_steps, checkpoint=policy),
        build_schedule(SamplerConfig(), num_steps),
    )
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        model, cond, clean = build()
    latent_bytes = clean.numel() * clean.element_size()
    with mode, LiveTensorTracker() as tracker:
        sample, _ = trajectory(model, cond, clean=clean)
        (sample - clean).square().mean().backward()
    return tracker.report().peak_bytes, latent_bytes


def test_fake_tensor_measurement_equals_real(make_pixart, make_conditioning) -> None:
    real, _ = _pixart_step_peak(make_pixart, make_conditioning, "step", 2, fake=False)
    fake, _ = _pixart_step_peak(make_pixart, make_conditioning, "step", 2, fake=True)
    assert fake == real, f"fake-tensor peak {fake} B != real peak {real} B"


def test_step_checkpointing_memory_is_flat_in_num_steps(make_pixart, make_conditioning) -> None:
    """Peak of one forward+backward: flat in K under `step`/`block`, linear under `none`.

    Measured under fake tensors (exactly equal to real; see the test above) to keep it fast.
    Each step keeps its input latent and injected noise (2 latents); that allowance is removed.
    """
    peaks: dict[tuple[str, int], int] = {}
    latent_bytes = 0
    for policy in ("none", "step", "block"):
        for k in (1, 2, 8):
            peaks[policy, k], latent_bytes = _pixart_step_peak(
                make_pixart, make_conditioning, policy, k, fake=True
            )
    table = ", ".join(f"{p}/K={k}: {v / 2**20:.2f} MiB" for (p, k), v in peaks.items())

    def without_latents(policy: str, k: int) -> int:
        return peaks[policy, k] - 2 * k * latent_bytes

    step_growth = without_latents("step", 8) / without_latents("step", 1)
    block_growth = without_latents("block", 8) / without_latents("block", 1)
    assert step_growth <= 1.15, f"step: peak(K=8)/peak(K=1) = {step_growth:.3f} > 1.15 ({table})"
    assert block_growth <= 1.15, f"block: peak(K=8)/peak(K=1) = {block_growth:.3f} > 1.15 ({table})"
    # `none` keeps every step's activations: each extra step adds about the same.
    per_step = peaks["none", 2] - peaks["none", 1]
    linearity = (peaks["none", 8] - peaks["none", 1]) / (7 * per_step)
    none_growth = peaks["none", 8] / peaks["none", 1]
    assert 0.9 <= linearity <= 1.1 and none_growth >= 5, (
        f"none: peak(8)/peak(1) = {none_growth:.2f}, linearity {linearity:.3f} ({table})"
    )
    assert peaks["block", 8] < peaks["step", 8] < peaks["none", 8], table


def _flops(make_pixart, make_conditioning, policy: str) -> int:
    model = make_pixart(sample_size=16, num_layers=2, heads=4, head_dim=16)
    cond = make_conditioning(2)
    clean = torch.randn(2, 4, 16, 16)
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=4, checkpoint=policy), build_schedule(SamplerConfig(), 4)
    )
    with FlopCounterMode(display=False) as counter:
        sample, _ = trajectory(model, cond, clean=clean)
        (sample - clean).square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("policy", ["step", "offload"])
def test_step_checkpointing_recomputes_each_step_once(make_pixart, make_conditioning, policy):
    """forward (F) + backward (2F) + recompute (F): FLOPs are 4/3 of plain autograd."""
    plain = _flops(make_pixart, make_conditioning, "none")
    checkpointed = _flops(make_pixart, make_conditioning, policy)
    ratio = checkpointed / plain
    assert abs(ratio - 4 / 3) <= 0.02, f"FLOPs {policy}/none = {ratio:.4f}, expected ~4/3"


def test_block_checkpointing_recomputes_each_block_once_more(make_pixart, make_conditioning):
    """Blocks run forward, step recompute and block recompute; the rest of the net twice."""
    plain = _flops(make_pixart, make_conditioning, "none")
    step = _flops(make_pixart, make_conditioning, "step")
    block = _flops(make_pixart, make_conditioning, "block")
    assert step < block < plain * 5 / 3, (plain, step, block)


def test_tracker_counts_host_copies_apart() -> None:
    """Inside host_allocations storages count as host bytes, not device bytes (CPU runs)."""
    with LiveTensorTracker() as tracker:
        device = torch.empty(1000)  # 4000 B on the device
        with host_allocations():
            host = torch.empty(500)  # 2000 B offloaded
        assert tracker.live_bytes == 4000
        del device
        fetched = torch.empty(250)  # 1000 B on the device again
    report = tracker.report()
    assert report.peak_bytes == 4000
    assert report.host_peak_bytes == 2000
    assert report.end_bytes == 1000
    assert report.peak_bytes_per_device == {"cpu": 4000, "host": 2000}
    del host, fetched


def _policy_step(make_pixart, make_conditioning, policy: str, num_steps: int):
    """Device and host peak of one forward+backward of a 4-block PixArt, for real (the host
    copies are real copies on CPU)."""
    size, batch = 16, 2
    model = make_pixart(sample_size=size, num_layers=4, heads=4, head_dim=16)
    cond = make_conditioning(batch)
    clean = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(3))
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=num_steps, checkpoint=policy),
        build_schedule(SamplerConfig(kind="ddim"), num_steps),
    )
    with LiveTensorTracker() as tracker:
        sample, _ = trajectory(model, cond, clean=clean)
        (sample - clean).square().mean().backward()
    return tracker.report()


def test_block_offload_device_memory_is_flat_and_below_block(make_pixart, make_conditioning):
    """`block_offload` keeps nothing per step on the device: its device peak does not grow from
    K=2 to K=8 and stays at or below `block`'s; what grows is the host side, ~linearly in K.

    (K=1 -> 2 adds the shared weights' gradient sum that autograd holds across steps, under
    every policy; from K=2 on nothing else may grow.)
    """
    reports = {
        (p, k): _policy_step(make_pixart, make_conditioning, p, k)
        for p in ("block", "block_offload")
        for k in (2, 8)
    }
    table = ", ".join(
        f"{p}/K={k}: device {r.peak_bytes / 2**20:.3f} MiB, host {r.host_peak_bytes / 2**20:.3f}"
        for (p, k), r in reports.items()
    )
    offload_2, offload_8 = reports["block_offload", 2], reports["block_offload", 8]
    assert offload_8.peak_bytes <= offload_2.peak_bytes * 1.01, table
    assert offload_8.peak_bytes <= reports["block", 8].peak_bytes, table
    assert reports["block", 8].host_peak_bytes == 0, table
    host_growth = offload_8.host_peak_bytes / offload_2.host_peak_bytes
    assert 3.5 <= host_growth <= 4.2, f"host K=8/K=2 = {host_growth:.2f} ({table})"


def test_block_offload_recomputes_each_block_once(make_pixart, make_conditioning) -> None:
    """Forward once, each block recomputed once in backward: FLOPs 4/3 of plain (within 1%;
    slightly under, since the patch embedding and the final layer are not recomputed)."""
    model = make_pixart(sample_size=16, num_layers=4, heads=4, head_dim=16)
    cond = make_conditioning(2)
    clean = torch.randn(2, 4, 16, 16)

    def flops(policy: str) -> int:
        trajectory = Trajectory(
            TrajectoryConfig(num_steps=4, checkpoint=policy), build_schedule(SamplerConfig(), 4)
        )
        with FlopCounterMode(display=False) as counter:
            sample, _ = trajectory(model, cond, clean=clean)
            (sample - clean).square().mean().backward()
        return counter.get_total_flops()

    ratio = flops("block_offload") / flops("none")
    assert abs(ratio - 4 / 3) <= 0.01 * 4 / 3, f"FLOPs block_offload/none = {ratio:.4f}"
