"""Memory and time vs K for each checkpoint policy (issue 5, question 1).

Question: what do ``none``, ``step``, ``block``, ``offload`` cost per training step as the number
of differentiated sampler steps K grows? For K = 1, 2, 4, 8: peak live bytes of one forward +
backward (LiveTensorTracker; activations + gradients, parameters excluded), step wall time
(fastest of 5 after a warm-up, the policies interleaved within each repeat so that load from
other jobs falls on all of them alike) and FLOPs (FlopCounterMode; recomputes included).

Default model (``_common.CPU_MODEL``): 6 PixArt blocks, hidden 384, 256 image tokens, batch 2,
fp32 on CPU. Times are CPU times on this machine, not GPU performance.

    python benchmarks/bench_checkpoint_policies.py           # writes results/checkpoint_policies.*
    python benchmarks/bench_checkpoint_policies.py --smoke   # toy model, seconds
    python benchmarks/bench_checkpoint_policies.py --layers 28 --heads 16 --head-dim 72 --latent 64
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

POLICIES = ("none", "step", "block", "offload")
NUM_STEPS = (1, 2, 4, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, results/smoke/")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--num-steps", nargs="+", type=int, default=list(NUM_STEPS))
    parser.add_argument("--layers", type=int, default=_common.CPU_MODEL.num_layers)
    parser.add_argument("--heads", type=int, default=_common.CPU_MODEL.num_attention_heads)
    parser.add_argument("--head-dim", type=int, default=_common.CPU_MODEL.attention_head_dim)
    parser.add_argument("--latent", type=int, default=_common.CPU_LATENT)
    parser.add_argument("--batch", type=int, default=_common.CPU_BATCH)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, name: str = "checkpoint_policies") -> dict:
    torch.set_num_threads(args.threads)
    if args.smoke:
        shape, latent, batch, repeats = _common.SMOKE_MODEL, _common.SMOKE_LATENT, 1, 1
    else:
        shape = replace(
            _common.CPU_MODEL,
            num_layers=args.layers,
            num_attention_heads=args.heads,
            attention_head_dim=args.head_dim,
            caption_channels=args.heads * args.head_dim,
        )
        latent, batch, repeats = args.latent, args.batch, args.repeats
    rows = []
    for k in args.num_steps:
        for m in _common.measure_policies(shape, latent, batch, args.policies, k, repeats=repeats):
            rows.append(m.as_dict())
            print(
                f"{m.policy:>9} K={k}: peak {_common.mib(m.peak_bytes):8.2f} MiB, "
                f"{m.step_seconds:7.3f} s, {m.flops / 1e9:8.2f} GFLOP",
                flush=True,
            )
    by = {(r["policy"], r["num_steps"]): r for r in rows}
    k_lo, k_hi = min(args.num_steps), max(args.num_steps)
    summary = {}
    for policy in args.policies:
        entry = {
            f"peak_ratio_K{k_hi}_over_K{k_lo}": by[policy, k_hi]["peak_bytes"]
            / by[policy, k_lo]["peak_bytes"]
        }
        if "none" in args.policies:
            for k in args.num_steps:
                entry[f"time_over_none_K{k}"] = (
                    by[policy, k]["step_seconds"] / by["none", k]["step_seconds"]
                )
                entry[f"flops_over_none_K{k}"] = by[policy, k]["flops"] / by["none", k]["flops"]
        summary[policy] = entry
    payload = {
        "model": {**shape.__dict__, "latent_size": latent, "batch": batch, "dtype": "float32"},
        "rows": rows,
        "summary": summary,
    }

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for policy in args.policies:
        ks = list(args.num_steps)
        axes[0].plot(ks, [_common.mib(by[policy, k]["peak_bytes"]) for k in ks], "o-", label=policy)
        axes[1].plot(ks, [by[policy, k]["step_seconds"] for k in ks], "o-", label=policy)
        axes[2].plot(ks, [by[policy, k]["flops"] / 1e9 for k in ks], "o-", label=policy)
    for ax, title in zip(
        axes,
        ("peak live MiB of one step", "step seconds (CPU, 1 thread)", "GFLOP per step"),
        strict=True,
    ):
        ax.set_xlabel("K (differentiated sampler steps)")
        ax.set_title(title)
        ax.set_xticks(list(args.num_steps))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"checkpoint policies: {shape.num_layers} blocks, hidden {shape.hidden_size}, "
        f"{(latent // shape.patch_size) ** 2} tokens, batch {batch}, fp32, CPU"
    )
    _common.write_result(name, payload, fig, smoke=args.smoke)
    return payload


if __name__ == "__main__":
    run(parse_args())
