"""m trajectories per prompt: one batch of B x m rows, or sequential passes (issue 15, item 3).

Question: what device memory and time do m = 1, 2, 4 trajectories per prompt cost when the
B x m rows are unrolled as one batch, and when they run in sequential passes of B rows
(``trajectory.rows_per_pass``: each pass unrolled and backpropagated on its own, the loss on all
rows at once)? Which one to pick is then a memory question: passes when one batch does not fit.

Per cell (policy, m, passes): one forward + backward of K LCM steps from noise for B prompts x m,
the energy score over each prompt's m samples (L2 at m = 1), the per-step backward on
(``trajectory.per_step_backward``) and ZeRO-3's gradient handling (each full gradient dropped
once accumulated), as a preset would run it. Device and host peak (LiveTensorTracker,
parameters excluded) and the fastest wall time of ``--repeats`` (cells timed in turn within each
repeat: the ratios are side by side). CPU, fp32, the model of section 1 (6 PixArt blocks,
hidden 384, 256 tokens), B = 2, K = 4.

Full size (``--estimate``): PixArt-α-XL/2, 1024², bf16, K = 4, one prompt per rank, m = 1, 2, 4,
fake tensors (L2 on the samples instead of the energy score, whose boolean mask fake tensors
cannot run): the activation device peak per rank with one batch of m rows and with passes of
one row.

    python benchmarks/bench_row_passes.py               # results/row_passes.{json,png}
    python benchmarks/bench_row_passes.py --estimate    # + the full-size estimate (~5 min)
    python benchmarks/bench_row_passes.py --smoke       # toy model, seconds
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from e2ed2.engine import LiveTensorTracker  # noqa: E402
from e2ed2.engine.core.estimate import (  # noqa: E402
    PIXART_ALPHA_XL_2,
    VAE_DOWNSAMPLE,
    build_pixart,
    drop_full_grads,
    make_inputs,
    make_trajectory,
)
from e2ed2.engine.core.network import repeat_conditioning  # noqa: E402
from e2ed2.engine.core.step_cuts import CutUnroll  # noqa: E402
from e2ed2.engine.objectives.energy import energy_score  # noqa: E402

POLICIES = ("step", "block_offload")
SAMPLES_PER_PROMPT = (1, 2, 4)
NUM_STEPS = 4


def iteration(
    model, trajectory, clean, cond, m: int, rows_per_pass: int, *, energy: bool = True
) -> None:
    """One forward + backward of B prompts x m rows (rows i*m .. i*m+m-1 share prompt i);
    ``energy=False``: L2 at every m (fake tensors cannot run the energy score's boolean mask;
    the loss on latents is a negligible part of the memory either way)."""
    rows_clean = clean.repeat_interleave(m, dim=0)
    rows_cond = repeat_conditioning(cond, m)
    plan = trajectory.plan()
    start, noises = trajectory.draw_noise(plan, rows_clean.shape, clean=rows_clean)
    unroll = CutUnroll(per_step=True, rows_per_pass=rows_per_pass)
    with drop_full_grads(model):
        sample = unroll.run(trajectory, model, rows_cond, start, noises, plan)
        if m == 1 or not energy:
            loss = (sample.float() - rows_clean.float()).square().mean()
        else:
            loss = energy_score(sample.unflatten(0, (clean.shape[0], m)), clean)
        for piece in unroll.pieces(loss):
            piece.backward()


def measure(shape, latent: int, batch: int, cells: list[tuple[str, int, int]], repeats: int):
    """Device/host peak and fastest seconds of each (policy, m, rows_per_pass) cell."""
    model = build_pixart(shape, latent)
    clean, cond = make_inputs(shape, latent, batch, torch.float32)
    trajectories = {policy: make_trajectory(policy, NUM_STEPS) for policy, _, _ in cells}

    def once(cell: tuple[str, int, int]) -> None:
        iteration(model, trajectories[cell[0]], clean, cond, cell[1], cell[2])

    rows = _common.measure_cells(cells, once, repeats)
    for (policy, m, rows_per_pass), row in rows.items():
        row.update(
            policy=policy,
            samples_per_prompt=m,
            rows=batch * m,
            rows_per_pass=rows_per_pass or batch * m,
        )
    return list(rows.values())


def estimate(full, resolution: int, policy: str, m: int, rows_per_pass: int) -> dict:
    """Full-size activation device / host peak per rank (fake tensors, bf16, one prompt)."""
    latent = resolution // VAE_DOWNSAMPLE
    mode = FakeTensorMode()
    with mode:
        model = build_pixart(full, latent, dtype=torch.bfloat16)
        clean, cond = make_inputs(full, latent, 1, torch.bfloat16)
    trajectory = make_trajectory(policy, NUM_STEPS)
    started = time.perf_counter()
    with mode, LiveTensorTracker(track_cuda=False) as tracker:
        iteration(model, trajectory, clean, cond, m, rows_per_pass, energy=False)
    report = tracker.report()
    return {
        "policy": policy,
        "resolution_px": resolution,
        "samples_per_prompt": m,
        "rows_per_pass": rows_per_pass or m,
        "device_peak_bytes": report.peak_bytes,
        "host_peak_bytes": report.host_peak_bytes,
        "seconds_to_estimate": time.perf_counter() - started,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, results/smoke/")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--m", nargs="+", type=int, default=list(SAMPLES_PER_PROMPT))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--estimate", action="store_true", help="+ PixArt-α-XL/2 at 1024²")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    policies, ms = args.policies, args.m
    if args.smoke:
        shape, latent, batch, repeats = _common.SMOKE_MODEL, _common.SMOKE_LATENT, 2, 1
        full, resolution = replace(_common.SMOKE_MODEL, text_tokens=8), 64
        ms = [1, 2]
    else:
        shape, latent, batch = _common.CPU_MODEL, _common.CPU_LATENT, _common.CPU_BATCH
        repeats, full, resolution = args.repeats, PIXART_ALPHA_XL_2, 1024
    # One batch of B*m rows (rows_per_pass 0), and passes of B rows (m passes).
    cells = [(p, m, r) for p in policies for m in ms for r in ((0,) if m == 1 else (0, batch))]
    rows = measure(shape, latent, batch, cells, repeats)
    by = {(r["policy"], r["samples_per_prompt"], r["rows_per_pass"]): r for r in rows}
    for row in rows:
        base = by[row["policy"], 1, batch]
        row["device_over_m1"] = row["device_peak_bytes"] / base["device_peak_bytes"]
        row["time_over_m1"] = row["step_seconds"] / base["step_seconds"]
        print(
            f"{row['policy']:>13} m={row['samples_per_prompt']} rows {row['rows']} in passes of "
            f"{row['rows_per_pass']}: device {_common.mib(row['device_peak_bytes']):7.2f} MiB "
            f"({row['device_over_m1']:.2f}x m=1), host {_common.mib(row['host_peak_bytes']):7.2f}"
            f" MiB, {row['step_seconds']:.3f} s ({row['time_over_m1']:.2f}x m=1)",
            flush=True,
        )
    payload: dict = {
        "model": {**shape.__dict__, "latent_size": latent, "batch": batch, "dtype": "float32"},
        "num_steps": NUM_STEPS,
        "backward": "per_step, zero3 gradient handling",
        "rows": rows,
    }
    if args.estimate or args.smoke:
        full_rows = []
        for policy in policies:
            for m in ms:
                for rows_per_pass in (0,) if m == 1 else (0, 1):
                    full_rows.append(estimate(full, resolution, policy, m, rows_per_pass))
                    row = full_rows[-1]
                    print(
                        f"{policy:>13} {resolution} px m={m} passes of {row['rows_per_pass']}: "
                        f"device {row['device_peak_bytes'] / 2**30:6.2f} GiB, host "
                        f"{row['host_peak_bytes'] / 2**30:6.2f} GiB",
                        flush=True,
                    )
        payload["full_size"] = {
            "model": {**full.__dict__, "dtype": "bfloat16"},
            "prompts_per_rank": 1,
            "rows": full_rows,
        }

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in policies:
        for label, per_pass in (("one batch", 0), ("passes of B rows", batch)):
            cells_m = [m for m in ms if (policy, m, per_pass or batch * m) in by]
            keys = [(policy, m, per_pass or batch * m) for m in cells_m]
            name = f"{policy.replace('_', ' ')}, {label}"
            axes[0].plot(
                cells_m, [_common.mib(by[k]["device_peak_bytes"]) for k in keys], "o-", label=name
            )
            axes[1].plot(cells_m, [by[k]["time_over_m1"] for k in keys], "o-", label=name)
    axes[0].set_title("device peak MiB")
    axes[1].set_title("time / (m = 1)")
    for ax in axes:
        ax.set_xlabel("m (trajectories per prompt)")
        ax.set_xticks(ms)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"m trajectories per prompt: {shape.num_layers} blocks, hidden {shape.hidden_size}, "
        f"B = {batch} prompts, K = {NUM_STEPS}, per-step backward, fp32, CPU"
    )
    _common.write_result("row_passes", payload, fig, smoke=args.smoke)
    return payload


if __name__ == "__main__":
    main(parse_args())
