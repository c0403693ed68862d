"""``block_offload`` and the per-step backward on CUDA: copies, gradients and device memory.

The CPU suite checks the policy's semantics (the host copies are real copies there); only a GPU
runs the CUDA path: pinned buffers, the device-to-host copy on a side stream with its events,
the host-to-device fetch in backward. Skipped without CUDA; `benchmarks/gpu_check.py` runs it.
"""

from __future__ import annotations

import functools

import pytest
import torch

from e2ed2.engine import SamplerConfig, Trajectory, TrajectoryConfig, build_schedule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(make_pixart, make_conditioning, policy: str, num_steps: int = 6):
    device = torch.device("cuda")
    model = make_pixart(sample_size=32, num_layers=4, heads=4, head_dim=32, caption_channels=24)
    model.to(device)
    cond = make_conditioning(4).to(device)
    clean = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=num_steps, checkpoint=policy),
        build_schedule(SamplerConfig(), num_steps),
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sample, _ = trajectory(
        model, cond, clean=clean, generator=torch.Generator(device).manual_seed(0)
    )
    (sample - clean).square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return grads, peak


def test_block_offload_on_cuda_matches_plain_and_uses_less_device_memory(
    make_pixart, make_conditioning
) -> None:
    ref, none_peak = _run(make_pixart, make_conditioning, "none")
    got, offload_peak = _run(make_pixart, make_conditioning, "block_offload")
    _, block_peak = _run(make_pixart, make_conditioning, "block")
    worst = max(
        ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for g, r in zip(got, ref, strict=True)
    )
    assert worst <= 1e-5, f"block_offload vs none on CUDA: relative gradient error {worst:.2e}"
    print(f"CUDA peaks: none {none_peak}, block {block_peak}, block_offload {offload_peak} B")
    assert offload_peak < none_peak
    assert offload_peak <= block_peak * 1.05


def _add_grad_to(total: torch.Tensor, param: torch.Tensor) -> None:
    total.add_(param.grad)


def test_per_step_backward_on_cuda_frees_the_gradient_sum(make_pixart, make_conditioning) -> None:
    """`block_offload` at K = 6 with every full gradient dropped once accumulated (ZeRO-3's
    handling): the per-step backward's CUDA peak is below one backward's by about one full
    gradient of the model (the shared weights' sum), with the same gradients."""
    from e2ed2.engine.core.estimate import drop_full_grads
    from e2ed2.engine.core.step_cuts import CutUnroll

    device = torch.device("cuda")
    model = make_pixart(sample_size=32, num_layers=4, heads=4, head_dim=32, caption_channels=24)
    model.to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cond = make_conditioning(4).to(device)
    clean = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
    trajectory = Trajectory(
        TrajectoryConfig(num_steps=6, checkpoint="block_offload"),
        build_schedule(SamplerConfig(), 6),
    )
    plan = trajectory.plan()
    start, noises = trajectory.draw_noise(
        plan, clean.shape, clean=clean, generator=torch.Generator(device).manual_seed(0)
    )
    peaks, grads = {}, {}
    for per_step in (False, True):
        unroll = CutUnroll(per_step=per_step)
        summed = [torch.zeros_like(p) for p in model.parameters()]
        hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(_add_grad_to, s))
            for p, s in zip(model.parameters(), summed, strict=True)
        ]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with drop_full_grads(model):
            sample = unroll.run(trajectory, model, cond, start, noises, plan)
            for piece in unroll.pieces((sample - clean).square().mean()):
                piece.backward()
        torch.cuda.synchronize()
        peaks[per_step] = torch.cuda.max_memory_allocated() - base
        grads[per_step] = summed
        for hook in hooks:
            hook.remove()
    scale = max(g.abs().max() for g in grads[False])
    worst = max(((a - b).abs().max() / scale).item() for a, b in zip(*grads.values(), strict=True))
    print(
        f"CUDA peaks: one backward {peaks[False]} B, per step {peaks[True]} B, params {param_bytes}"
    )
    assert worst <= 1e-5, f"per-step vs one backward on CUDA: gradient error {worst:.2e}"
    assert peaks[False] - peaks[True] >= 0.8 * param_bytes
