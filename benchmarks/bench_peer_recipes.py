"""e2ed2's checkpoint policies vs the recipes users would pick instead, side by side (issue 15).

Question: what device memory, host memory and time does one forward + backward through K sampler
steps cost under each recipe, and does ``block_offload`` give ``block``'s flat device memory at
``step``'s compute? Recipes (same model, batch, noise and loss; only the memory recipe differs):

``plain``          plain autograd through the K steps (e2ed2 ``none``).
``draft``          diffusers' per-block checkpointing (``enable_gradient_checkpointing``) around a
                   plain unroll, as a DRaFT-style script writes it: forward once, each block
                   recomputed once, but every step's block inputs stay on the device.
``alignprop``      one checkpoint around each denoiser call (AlignProp) = e2ed2 ``step``.
``block``          e2ed2 ``block`` (step checkpoint + per-block checkpoints: forward 3 times).
``block_offload``  e2ed2 ``block_offload`` (per-block checkpoints in one pass, saved tensors on the
                   host, fetched back before each block's recompute).
``selective``      e2ed2 ``selective`` (keeps matmul/attention outputs, recomputes the rest).

Then ``block_offload`` with m = 1, 2, 4 trajectories per prompt (a batch of B·m) at the largest K.

Per cell: device peak (LiveTensorTracker, parameters excluded, full gradients kept as ``.grad``),
host peak (the offloaded copies: on CPU they are real copies, counted apart), fastest wall time
of ``--repeats`` (recipes interleaved within each repeat so load from other jobs falls on all of
them alike; read the ratios to ``plain``), FLOPs (FlopCounterMode under fake tensors,
recomputes included).

Full size (``--estimate``): PixArt-α-XL/2 (0.61B), K=4, batch 1 per rank, bf16, under fake
tensors with ZeRO-3's gradient handling (full gradients dropped once accumulated), at 1024² and
2048²: activation device peak and host bytes per rank for every recipe, and the shared weights'
gradient sum autograd holds across the K steps (measured as the K=2 minus K=1 device peak of
``block_offload``, whose activations are flat in K).

    python benchmarks/bench_peer_recipes.py                # results/peer_recipes.{json,png}
    python benchmarks/bench_peer_recipes.py --estimate     # + the full-size estimate (~30 min)
    python benchmarks/bench_peer_recipes.py --smoke        # toy model, K = 2 and 4, ~1 min
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from e2ed2.engine import LiveTensorTracker  # noqa: E402
from e2ed2.engine.core.estimate import (  # noqa: E402
    PIXART_ALPHA_XL_2,
    VAE_DOWNSAMPLE,
    DenoiserShape,
    build_pixart,
    count_parameters,
    drop_full_grads,
    make_inputs,
    make_trajectory,
)
from e2ed2.engine.core.network import Conditioning, denoise, repeat_conditioning  # noqa: E402
from e2ed2.engine.core.trajectory import Trajectory  # noqa: E402

RECIPES = ("plain", "draft", "alignprop", "block", "block_offload", "selective")
#: The e2ed2 policy each recipe runs (``draft`` is written out below: no e2ed2 policy is it).
POLICY_OF = {
    "plain": "none",
    "alignprop": "step",
    "block": "block",
    "block_offload": "block_offload",
    "selective": "selective",
}
NUM_STEPS = (1, 4, 8)
SAMPLES_PER_PROMPT = (1, 2, 4)
ESTIMATE_RESOLUTIONS = (1024, 2048)

Recipe = Callable[[torch.nn.Module, torch.Tensor, Conditioning], torch.Tensor]


def _draft_unroll(trajectory: Trajectory) -> Recipe:
    """The DRaFT-style script: diffusers' block checkpointing on, a plain loop over the steps."""

    def run(model: torch.nn.Module, clean: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        schedule = trajectory.schedule
        plan = trajectory.plan()
        x, noises = trajectory.draw_noise(plan, clean.shape, clean=clean)
        model.enable_gradient_checkpointing()
        try:
            for i in range(schedule.num_steps):
                out = denoise(model, x, schedule.timestep(i), cond)
                x = schedule.step(i, out, x, noises[i])
            loss = (x.float() - clean.float()).square().mean()
            loss.backward()
        finally:
            model.disable_gradient_checkpointing()
        return loss.detach()

    return run


def _policy_unroll(trajectory: Trajectory) -> Recipe:
    def run(model: torch.nn.Module, clean: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sample, _ = trajectory(model, cond, clean=clean)
        loss = (sample.float() - clean.float()).square().mean()
        loss.backward()
        return loss.detach()

    return run


def recipe(name: str, num_steps: int) -> Recipe:
    """One forward + backward through ``num_steps`` LCM steps from noise, L2 on the sample."""
    if name == "draft":
        return _draft_unroll(make_trajectory("none", num_steps))
    return _policy_unroll(make_trajectory(POLICY_OF[name], num_steps))


def measure(
    shape: DenoiserShape,
    latent: int,
    batch: int,
    cells: list[tuple[str, int, int]],
    repeats: int,
) -> list[dict]:
    """Device/host peak, FLOPs and fastest seconds of each (recipe, K, m) cell."""
    model = build_pixart(shape, latent)
    inputs = {}
    for _, _, m in cells:
        if m not in inputs:
            clean, cond = make_inputs(shape, latent, batch, torch.float32)
            inputs[m] = (clean.repeat_interleave(m, dim=0), repeat_conditioning(cond, m))
    runs = {cell: recipe(cell[0], cell[1]) for cell in cells}

    def once(cell: tuple[str, int, int]) -> None:
        model.zero_grad(set_to_none=True)
        runs[cell](model, *inputs[cell[2]])

    rows = _common.measure_cells(cells, once, repeats)
    for cell, row in rows.items():
        with FakeTensorMode():
            fake_model = build_pixart(shape, latent)
            clean, cond = make_inputs(shape, latent, batch * cell[2], torch.float32)
            with FlopCounterMode(display=False) as counter:
                runs[cell](fake_model, clean, cond)
        row.update(
            recipe=cell[0],
            num_steps=cell[1],
            samples_per_prompt=cell[2],
            flops=counter.get_total_flops(),
        )
    return list(rows.values())


def estimate(shape: DenoiserShape, resolution: int, name: str, num_steps: int) -> dict:
    """Full-size activation device peak and host bytes per rank, fake tensors, bf16, ZeRO-3's
    gradient handling (each full gradient dropped once accumulated)."""
    latent = resolution // VAE_DOWNSAMPLE
    mode = FakeTensorMode()
    with mode:
        model = build_pixart(shape, latent, dtype=torch.bfloat16)
        clean, cond = make_inputs(shape, latent, 1, torch.bfloat16)
    run = recipe(name, num_steps)
    started = time.perf_counter()
    with mode, drop_full_grads(model), LiveTensorTracker(track_cuda=False) as tracker:
        run(model, clean, cond)
    report = tracker.report()
    return {
        "recipe": name,
        "resolution_px": resolution,
        "num_steps": num_steps,
        "device_peak_bytes": report.peak_bytes,
        "host_peak_bytes": report.host_peak_bytes,
        "seconds_to_estimate": time.perf_counter() - started,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, results/smoke/")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--num-steps", nargs="+", type=int, default=list(NUM_STEPS))
    parser.add_argument("--m", nargs="+", type=int, default=list(SAMPLES_PER_PROMPT))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--estimate", action="store_true", help="+ PixArt-α-XL/2 full size")
    parser.add_argument("--estimate-steps", type=int, default=4)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    num_steps, full_recipes = args.num_steps, args.recipes
    if args.smoke:
        shape, latent, batch, repeats = _common.SMOKE_MODEL, _common.SMOKE_LATENT, 1, 1
        full, resolutions = replace(_common.SMOKE_MODEL, text_tokens=8), (64,)
        num_steps, full_recipes = [2, 4], ["plain", "block_offload"]
    else:
        shape, latent, batch, repeats = (
            _common.CPU_MODEL,
            _common.CPU_LATENT,
            _common.CPU_BATCH,
            args.repeats,
        )
        full, resolutions = PIXART_ALPHA_XL_2, ESTIMATE_RESOLUTIONS
    k_max = max(num_steps)
    cells = [(r, k, 1) for k in num_steps for r in args.recipes]
    cells += [("block_offload", k_max, m) for m in args.m if m != 1]
    rows = measure(shape, latent, batch, cells, repeats)
    by = {(r["recipe"], r["num_steps"], r["samples_per_prompt"]): r for r in rows}
    for row in rows:
        plain = by.get(("plain", row["num_steps"], 1))
        row["time_over_plain"] = row["step_seconds"] / plain["step_seconds"] if plain else None
        # Per trajectory: an m-row is m times the batch of its plain reference.
        m = row["samples_per_prompt"]
        row["flops_over_plain"] = row["flops"] / (m * plain["flops"]) if plain else None
        print(
            f"{row['recipe']:>13} K={row['num_steps']} m={row['samples_per_prompt']}: device "
            f"{_common.mib(row['device_peak_bytes']):8.2f} MiB, host "
            f"{_common.mib(row['host_peak_bytes']):8.2f} MiB, {row['step_seconds']:7.3f} s "
            f"({row['time_over_plain'] or float('nan'):.2f}x plain), FLOPs "
            f"{row['flops_over_plain'] or float('nan'):.4f}x plain",
            flush=True,
        )
    payload: dict = {
        "model": {**shape.__dict__, "latent_size": latent, "batch": batch, "dtype": "float32"},
        "rows": rows,
    }
    if args.estimate or args.smoke:
        with FakeTensorMode():
            num_params = count_parameters(build_pixart(full, 8, dtype=torch.bfloat16))
        full_rows = []
        for res in resolutions:
            for name in full_recipes:
                full_rows.append(estimate(full, res, name, args.estimate_steps))
                print(
                    f"{name:>13} {res} px K={args.estimate_steps}: device "
                    f"{full_rows[-1]['device_peak_bytes'] / 2**30:7.2f} GiB, host "
                    f"{full_rows[-1]['host_peak_bytes'] / 2**30:7.2f} GiB",
                    flush=True,
                )
        # The gradient sum of the shared weights, held from the last step's backward to the
        # first step's: the K=1 -> K=2 growth of block_offload's device peak.
        one, two = (
            estimate(full, resolutions[0], "block_offload", k)["device_peak_bytes"] for k in (1, 2)
        )
        payload["full_size"] = {
            "model": {**full.__dict__, "num_params": num_params, "dtype": "bfloat16"},
            "batch_per_rank": 1,
            "rows": full_rows,
            "shared_weight_grad_sum": {
                "resolution_px": resolutions[0],
                "measured_bytes": two - one,
                "num_params_times_2_bytes": 2 * num_params,
            },
        }
        print(f"shared-weight gradient sum: {(two - one) / 2**30:.2f} GiB measured", flush=True)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    ks = list(num_steps)
    for name in args.recipes:
        axes[0].plot(ks, [_common.mib(by[name, k, 1]["device_peak_bytes"]) for k in ks], "o-")
        axes[1].plot(ks, [_common.mib(by[name, k, 1]["host_peak_bytes"]) for k in ks], "o-")
        axes[2].plot(
            ks, [by[name, k, 1]["time_over_plain"] for k in ks], "o-", label=name.replace("_", " ")
        )
    titles = ("device peak MiB", "host MiB (offloaded)", "time / plain autograd")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("K (differentiated sampler steps)")
        ax.set_title(title)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(
        f"memory recipes: {shape.num_layers} blocks, hidden {shape.hidden_size}, "
        f"{(latent // shape.patch_size) ** 2} tokens, batch {batch}, fp32, CPU"
    )
    _common.write_result("peer_recipes", payload, fig, smoke=args.smoke)
    return payload


if __name__ == "__main__":
    main(parse_args())
