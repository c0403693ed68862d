"""Full-size memory estimate without a GPU: PixArt-α-XL/2 under fake tensors (issue 5, question 2).

Question: what does one E2ED2 iteration of PixArt-α-XL/2 (28 blocks, hidden 1152, 16 heads,
0.61B parameters), K = 4, batch 1 per GPU, bf16, need per GPU at 512, 1024 and 2048 px under each
checkpoint policy with ZeRO-3 on 8 and 64 ranks, and which is the largest resolution that fits
40 GB and 80 GB?

Method (``e2ed2.engine.core.estimate``): the activation peak is measured by running the real diffusers
model through the real trajectory under ``FakeTensorMode`` (nothing allocated) with the
live-tensor tracker, full gradients dropped as ZeRO-3's hooks do; the ZeRO-3 terms (gathered
bf16 weights, partitioned params / grads / AdamW state, buckets) come from the ds_config
(``ds_configs/zero3.json``). The largest resolution is interpolated linearly in the token count
between measured points (fused attention keeps O(N) bytes), then checked by one more fake run.
"Fits" means estimate <= 95% of the capacity (a margin for the CUDA context and allocator
fragmentation, which the estimate does not model and only a GPU can measure).

Validation: a small config is run for real (fp32, plain AdamW, one process) and its tracker peak,
parameters and optimizer state included, is compared with the estimator's sum.

    python benchmarks/bench_memory_estimate.py            # results/memory_estimate.{json,png}
    python benchmarks/bench_memory_estimate.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import time

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from e2ed2.engine import LiveTensorTracker  # noqa: E402
from e2ed2.engine.core.estimate import (
    PIXART_ALPHA_XL_2,
    VAE_DOWNSAMPLE,
    DenoiserShape,
    build_pixart,
    count_parameters,
    estimate_rank_memory,
    make_inputs,
    make_trajectory,
    run_iteration,
    step_peak_bytes,
)
from e2ed2.engine.train.distributed import resolve_ds_config  # noqa: E402

POLICIES = ("none", "step", "block", "selective")
RESOLUTIONS = (512, 1024, 2048)
WORLD_SIZES = (8, 64)
CAPACITIES_GB = (40, 80)
HEADROOM = 0.95
RESOLUTION_GRANULE = 128  # px; latent multiple of 16 = patch 2 x 8


def validate(shape: DenoiserShape, latent_size: int, batch: int, num_steps: int) -> dict:
    """Real fp32 training (AdamW) of a small config vs the estimator's sum, one process."""
    policy = "step"
    activation = step_peak_bytes(
        shape,
        resolution_px=latent_size * VAE_DOWNSAMPLE,
        policy=policy,
        num_steps=num_steps,
        batch=batch,
        dtype=torch.float32,
        zero3_grads=False,  # one process, no ZeRO: gradients stay (and are counted)
        fake=True,
    )
    clean, cond = make_inputs(shape, latent_size, batch, torch.float32)
    trajectory = make_trajectory(policy, num_steps)
    with LiveTensorTracker(track_cuda=False) as tracker:
        model = build_pixart(shape, latent_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        for _ in range(2):  # the second iteration runs with the optimizer state allocated
            run_iteration(model, trajectory, clean, cond)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    measured = tracker.report().peak_bytes
    num_params = count_parameters(model)
    num_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    # fp32 weights (4) + Adam m, v (8) per parameter, Adam's step counter per tensor (4 B scalar).
    estimated = 12 * num_params + 4 * num_tensors + activation
    return {
        "config": {**shape.__dict__, "latent_size": latent_size, "batch": batch},
        "num_steps": num_steps,
        "policy": policy,
        "dtype": "float32",
        "measured_peak_bytes": measured,
        "estimated_peak_bytes": estimated,
        "relative_error": (estimated - measured) / measured,
    }


def largest_fitting(
    points: dict[int, int], fixed_bytes: int, capacity_bytes: float, patch_px: int
) -> int:
    """Largest resolution (multiple of RESOLUTION_GRANULE) whose estimate fits, interpolating
    the activation peak linearly in the token count through the two largest measured points."""
    (r1, a1), (r2, a2) = sorted(points.items())[-2:]
    n1, n2 = (r1 // patch_px) ** 2, (r2 // patch_px) ** 2
    slope = (a2 - a1) / (n2 - n1)
    budget = capacity_bytes - fixed_bytes
    if budget <= a1 - slope * (n1 - 1):
        return 0
    tokens = n1 + (budget - a1) / slope
    return int(math.sqrt(tokens) * patch_px) // RESOLUTION_GRANULE * RESOLUTION_GRANULE


def main(args: argparse.Namespace) -> None:
    if args.smoke:
        shape = DenoiserShape(
            num_layers=2, num_attention_heads=2, attention_head_dim=16, caption_channels=32
        )
        resolutions, policies = (64, 128, 256), ("none", "step")
        capacities = (0.005, 0.01)  # GB: a toy's "GPU"
        valid = (_common.SMOKE_MODEL, 8, 1, 2)
    else:
        shape, resolutions, policies, capacities = (
            PIXART_ALPHA_XL_2,
            tuple(args.resolutions),
            tuple(args.policies),
            CAPACITIES_GB,
        )
        valid = (_common.CPU_MODEL, 16, 2, 4)
    zero = json.loads(resolve_ds_config("zero3").read_text())["zero_optimization"]
    with FakeTensorMode():
        num_params = count_parameters(build_pixart(shape, 8, dtype=torch.bfloat16))
    patch_px = shape.patch_size * VAE_DOWNSAMPLE

    activation: dict[str, dict[int, int]] = {p: {} for p in policies}
    for policy in policies:
        for res in resolutions:
            start = time.perf_counter()
            activation[policy][res] = step_peak_bytes(
                shape, resolution_px=res, policy=policy, num_steps=args.num_steps
            )
            print(
                f"{policy:>9} {res:>5} px: activation peak "
                f"{activation[policy][res] / 2**30:7.2f} GiB ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    def per_rank(policy: str, res: int, world: int) -> dict:
        return estimate_rank_memory(
            num_params=num_params,
            world_size=world,
            activation_peak_bytes=activation[policy][res],
            ds_zero_config=zero,
        ).as_dict()

    estimates = {
        f"{policy}/{res}px/{world}ranks": per_rank(policy, res, world)
        for policy in policies
        for res in resolutions
        for world in WORLD_SIZES
    }
    largest: dict[str, dict] = {}
    for policy in policies:
        for world in WORLD_SIZES:
            fixed = per_rank(policy, resolutions[0], world)
            fixed_bytes = fixed["peak_bytes"] - fixed["activation_peak_bytes"]
            for gb in capacities:
                capacity = gb * 1e9 * HEADROOM
                res = largest_fitting(activation[policy], fixed_bytes, capacity, patch_px)
                check = None
                if res and not args.no_check and world == WORLD_SIZES[0]:
                    # One real (fake-tensor) measurement at the interpolated answer.
                    measured = step_peak_bytes(
                        shape, resolution_px=res, policy=policy, num_steps=args.num_steps
                    )
                    check = {
                        "activation_peak_bytes": measured,
                        "peak_bytes": fixed_bytes + measured,
                        "fits": fixed_bytes + measured <= capacity,
                    }
                largest[f"{policy}/{world}ranks/{gb}GB"] = {"resolution_px": res, "check": check}
                print(f"{policy:>9} {world} ranks {gb} GB: largest {res} px, check {check}")

    validation = validate(*valid)
    print(f"validation: relative error {validation['relative_error']:+.4%}")
    payload = {
        "model": {**shape.__dict__, "num_params": num_params, "dtype": "bfloat16"},
        "num_steps": args.num_steps,
        "batch_per_gpu": 1,
        "ds_config": "zero3",
        "fits_if_estimate_below_fraction_of_capacity": HEADROOM,
        "activation_peak_bytes": {
            p: {str(r): b for r, b in v.items()} for p, v in activation.items()
        },
        "per_rank_estimates": estimates,
        "largest_resolution": largest,
        "validation": validation,
        "gpu_measurement": None,  # filled only where a GPU ran it; none did for this file
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for policy in policies:
        xs = list(resolutions)
        for ax, world in zip(axes, WORLD_SIZES, strict=True):
            ys = [per_rank(policy, r, world)["peak_bytes"] / 1e9 for r in xs]
            ax.plot(xs, ys, "o-", label=policy)
    for ax, world in zip(axes, WORLD_SIZES, strict=True):
        for gb in capacities:
            ax.axhline(gb * HEADROOM, color="gray", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(resolutions), [str(r) for r in resolutions])
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel("estimated peak GB per GPU")
        ax.set_title(f"ZeRO-3, {world} ranks")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"PixArt-α-XL/2 ({num_params / 1e9:.2f}B), K={args.num_steps}, batch 1/GPU, bf16 "
        f"(fake tensors; dashed: {HEADROOM:.0%} of {capacities} GB)"
    )
    _common.write_result("memory_estimate", payload, fig, smoke=args.smoke)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS))
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--no-check", action="store_true", help="skip the check runs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
