"""The shared weights' gradient sum, and the per-step backward that removes it (issue 15, item 2).

Question: with one network shared by the K sampler steps, how much device memory does the
full-size gradient sum that one backward holds across the steps cost under each checkpoint
policy, how much does ``trajectory.per_step_backward`` (the graph cut at every step, one
backward piece per step: core/step_cuts.py) give back, and at what time?

Both backwards run under ZeRO-3's gradient handling: every full gradient is dropped as soon as
autograd accumulates it (``drop_full_grads``; ZeRO-3's hooks reduce-scatter it into a partition
and free it). One backward accumulates a parameter's K contributions in autograd's input buffer
before the hook fires, so the sum is alive from the last step's backward to the first's; the
per-step backward hands each step's contribution to the hook on its own.

Per cell (policy, K, backward): device peak and host peak (LiveTensorTracker, parameters
excluded), and the fastest wall time of ``--repeats`` (the cells of one policy and K timed in
turn within each repeat, so ``per_step / whole`` is a side-by-side ratio). CPU, fp32, the model of
section 1 (6 PixArt blocks, hidden 384, 256 tokens, batch 2).

Full size (``--estimate``): PixArt-α-XL/2 (0.61B), K = 4, batch 1 per rank, bf16, fake tensors,
at 1024² and 2048²: the activation device peak per rank of each policy with either backward.
The reduce-scatter traffic the per-step backward adds (K per micro-batch instead of 1) is
measured by ``bench_zero3_traffic.py`` (rows ``zero3_per_step``).

    python benchmarks/bench_step_backward.py               # results/step_backward.{json,png}
    python benchmarks/bench_step_backward.py --estimate    # + the full-size estimate (~15 min)
    python benchmarks/bench_step_backward.py --smoke       # toy model, seconds
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

from e2ed2.engine.core.estimate import (  # noqa: E402
    PIXART_ALPHA_XL_2,
    build_pixart,
    count_parameters,
    drop_full_grads,
    make_inputs,
    make_trajectory,
    run_iteration,
    step_memory,
)

POLICIES = ("step", "block", "block_offload")
NUM_STEPS = (1, 4, 8)
BACKWARDS = ("whole", "per_step")
ESTIMATE_RESOLUTIONS = (1024, 2048)


def measure(shape, latent: int, batch: int, cells: list[tuple[str, int, str]], repeats: int):
    """Device/host peak and the fastest seconds of each (policy, K, backward) cell."""
    model = build_pixart(shape, latent)
    clean, cond = make_inputs(shape, latent, batch, torch.float32)
    trajectories = {(p, k): make_trajectory(p, k) for p, k, _ in cells}

    def once(cell: tuple[str, int, str]) -> None:
        policy, k, backward = cell
        with drop_full_grads(model):
            run_iteration(
                model,
                trajectories[policy, k],
                clean,
                cond,
                per_step_backward=backward == "per_step",
            )

    rows = _common.measure_cells(cells, once, repeats)
    for (policy, k, backward), row in rows.items():
        row.update(policy=policy, num_steps=k, backward=backward)
    return list(rows.values()), sum(p.numel() * p.element_size() for p in model.parameters())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, results/smoke/")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--num-steps", nargs="+", type=int, default=list(NUM_STEPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--estimate", action="store_true", help="+ PixArt-α-XL/2 full size")
    parser.add_argument("--estimate-steps", type=int, default=4)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    num_steps, policies = args.num_steps, args.policies
    if args.smoke:
        shape, latent, batch, repeats = _common.SMOKE_MODEL, _common.SMOKE_LATENT, 1, 1
        full, resolutions = replace(_common.SMOKE_MODEL, text_tokens=8), (64,)
        num_steps, policies = [1, 4], ["step", "block_offload"]
    else:
        shape, latent, batch = _common.CPU_MODEL, _common.CPU_LATENT, _common.CPU_BATCH
        repeats = args.repeats
        full, resolutions = PIXART_ALPHA_XL_2, ESTIMATE_RESOLUTIONS
    cells = [(p, k, b) for p in policies for k in num_steps for b in BACKWARDS]
    rows, param_bytes = measure(shape, latent, batch, cells, repeats)
    by = {(r["policy"], r["num_steps"], r["backward"]): r for r in rows}
    for row in rows:
        whole = by[row["policy"], row["num_steps"], "whole"]
        row["time_over_whole"] = row["step_seconds"] / whole["step_seconds"]
        row["device_over_whole"] = row["device_peak_bytes"] / whole["device_peak_bytes"]
        print(
            f"{row['policy']:>13} K={row['num_steps']} {row['backward']:>8}: device "
            f"{_common.mib(row['device_peak_bytes']):7.2f} MiB, host "
            f"{_common.mib(row['host_peak_bytes']):7.2f} MiB, {row['step_seconds']:.3f} s "
            f"({row['time_over_whole']:.2f}x whole)",
            flush=True,
        )
    payload: dict = {
        "model": {
            **shape.__dict__,
            "latent_size": latent,
            "batch": batch,
            "dtype": "float32",
            "param_bytes": param_bytes,
        },
        "gradient_handling": "zero3 (each full gradient dropped once accumulated)",
        "rows": rows,
    }
    if args.estimate or args.smoke:
        with FakeTensorMode():
            num_params = count_parameters(build_pixart(full, 8, dtype=torch.bfloat16))
        full_rows = []
        for res in resolutions:
            for policy in policies:
                for backward in BACKWARDS:
                    started = time.perf_counter()
                    report = step_memory(
                        full,
                        resolution_px=res,
                        policy=policy,
                        num_steps=args.estimate_steps,
                        per_step_backward=backward == "per_step",
                    )
                    full_rows.append(
                        {
                            "policy": policy,
                            "backward": backward,
                            "resolution_px": res,
                            "num_steps": args.estimate_steps,
                            "device_peak_bytes": report.peak_bytes,
                            "host_peak_bytes": report.host_peak_bytes,
                            "seconds_to_estimate": time.perf_counter() - started,
                        }
                    )
                    print(
                        f"{policy:>13} {backward:>8} {res} px K={args.estimate_steps}: device "
                        f"{report.peak_bytes / 2**30:6.2f} GiB, host "
                        f"{report.host_peak_bytes / 2**30:6.2f} GiB",
                        flush=True,
                    )
        payload["full_size"] = {
            "model": {**full.__dict__, "num_params": num_params, "dtype": "bfloat16"},
            "batch_per_rank": 1,
            "gradient_bytes": 2 * num_params,
            "rows": full_rows,
        }

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in policies:
        for backward, style in (("whole", "o--"), ("per_step", "o-")):
            axes[0].plot(
                num_steps,
                [_common.mib(by[policy, k, backward]["device_peak_bytes"]) for k in num_steps],
                style,
                label=f"{policy.replace('_', ' ')}, {backward.replace('_', ' ')} backward",
            )
        axes[1].plot(
            num_steps,
            [by[policy, k, "per_step"]["time_over_whole"] for k in num_steps],
            "o-",
            label=policy.replace("_", " "),
        )
    axes[0].axhline(
        _common.mib(param_bytes), color="gray", ls=":", label="one full gradient (fp32)"
    )
    axes[0].set_title("device peak MiB (ZeRO-3 gradient handling)")
    axes[1].set_title("time, per-step backward / one backward")
    axes[1].axhline(1.0, color="gray", ls=":")
    for ax in axes:
        ax.set_xlabel("K (differentiated sampler steps)")
        ax.set_xticks(num_steps)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"shared weights' gradient sum: {shape.num_layers} blocks, hidden {shape.hidden_size}, "
        f"{(latent // shape.patch_size) ** 2} tokens, batch {batch}, fp32, CPU"
    )
    _common.write_result("step_backward", payload, fig, smoke=args.smoke)
    return payload


if __name__ == "__main__":
    main(parse_args())
