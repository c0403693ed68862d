"""The fake-tensor memory estimator: equals a real run, and its ZeRO-3 accounting."""

from __future__ import annotations

import torch

from e2ed2.engine.core.estimate import (
    DenoiserShape,
    estimate_rank_memory,
    step_memory,
    step_peak_bytes,
    zero3_state_bytes,
)

TOY = DenoiserShape(
    num_layers=2, num_attention_heads=2, attention_head_dim=16, caption_channels=32, text_tokens=8
)


def test_fake_estimate_equals_real_run() -> None:
    for zero3_grads in (True, False):
        kwargs = dict(
            resolution_px=128,
            policy="step",
            num_steps=2,
            dtype=torch.float32,
            zero3_grads=zero3_grads,
        )
        fake = step_peak_bytes(TOY, fake=True, **kwargs)
        real = step_peak_bytes(TOY, fake=False, **kwargs)
        assert fake == real, (zero3_grads, fake, real)


def test_fake_estimate_of_host_bytes_equals_real_run() -> None:
    """block_offload's host bytes per rank, under fake tensors as for real; K=4 keeps twice the
    host bytes of K=2 (every block input of every step); on the device only the caller's K
    injected noises (latent-sized, 4 KiB each here) grow."""
    kwargs = dict(resolution_px=128, policy="block_offload", dtype=torch.float32)
    fake = step_memory(TOY, fake=True, num_steps=2, **kwargs)
    real = step_memory(TOY, fake=False, num_steps=2, **kwargs)
    assert (fake.peak_bytes, fake.host_peak_bytes) == (real.peak_bytes, real.host_peak_bytes)
    assert fake.host_peak_bytes > 0
    four = step_memory(TOY, fake=True, num_steps=4, **kwargs)
    latent_bytes = 4 * 16 * 16 * 4
    assert four.peak_bytes <= fake.peak_bytes + 3 * latent_bytes, (four, fake)
    assert 1.9 <= four.host_peak_bytes / fake.host_peak_bytes <= 2.1, (four, fake)


def test_fake_estimate_of_per_step_backward_equals_real_run() -> None:
    """The backward one sampler step at a time, under fake tensors as for real; at K = 4 its
    device peak is one backward's less one full gradient of every parameter (the shared
    weights' gradient sum, fp32 here)."""
    from e2ed2.engine.core.estimate import build_pixart, count_parameters

    kwargs = dict(resolution_px=128, policy="block_offload", dtype=torch.float32, num_steps=4)
    fake = step_memory(TOY, fake=True, per_step_backward=True, **kwargs)
    real = step_memory(TOY, fake=False, per_step_backward=True, **kwargs)
    assert (fake.peak_bytes, fake.host_peak_bytes) == (real.peak_bytes, real.host_peak_bytes)
    whole = step_memory(TOY, fake=True, **kwargs)
    param_bytes = 4 * count_parameters(build_pixart(TOY, 16))
    assert 0.9 * param_bytes <= whole.peak_bytes - fake.peak_bytes <= 1.1 * param_bytes


def test_dropping_full_grads_frees_them() -> None:
    """ZeRO-3 mode: no full-size gradient outlives the backward (they are partitioned)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from e2ed2.engine import LiveTensorTracker
    from e2ed2.engine.core.estimate import (
        build_pixart,
        drop_full_grads,
        make_inputs,
        make_trajectory,
        run_iteration,
    )

    trajectory = make_trajectory("step", 2)
    with FakeTensorMode():
        model = build_pixart(TOY, 16)
        clean, cond = make_inputs(TOY, 16, 1, torch.float32)
        with drop_full_grads(model), LiveTensorTracker() as tracker:
            run_iteration(model, trajectory, clean, cond)
        assert all(p.grad is None for p in model.parameters())
        grad_bytes = sum(4 * p.numel() for p in model.parameters())
    assert tracker.report().end_bytes < grad_bytes


def test_zero3_state_is_16_bytes_per_param_divided_by_ranks() -> None:
    state = zero3_state_bytes(1000, 8)
    assert (state.params_bytes, state.grads_bytes, state.optimizer_bytes) == (250, 250, 1500)
    assert zero3_state_bytes(1001, 8).params_bytes == 2 * 126  # partitions are padded
    assert zero3_state_bytes(1000, 1, precision="fp32").total_bytes == 16000


def test_rank_estimate_sums_its_terms() -> None:
    zero = {
        "stage3_max_live_parameters": 500,
        "reduce_bucket_size": 10,
        "stage3_prefetch_bucket_size": 20,
    }
    est = estimate_rank_memory(
        num_params=1000, world_size=4, activation_peak_bytes=7, ds_zero_config=zero
    )
    assert est.gathered_params_bytes == 2 * 500
    assert est.bucket_bytes == 2 * 30
    assert est.zero_state_bytes == 16 * 250
    assert est.peak_bytes == 1000 + 60 + 4000 + 7
