"""Per-step LoRA vs per-step copies vs one shared network (issue 13, item 5).

Question: what do K per-step networks (paper App. D.1) cost as K LoRA adapters on one frozen base
(``model.lora_rank``, ``share_across_steps=false``), next to K full copies and to the shared
full fine-tune (the paper's default)? For K = 4 under checkpoint policy ``step``, per variant:

* parameters: all of them (a base shared by the adapters counted once) and the trained ones;
* the measured bytes of one training step (``track_memory``: live tensor bytes, device-agnostic,
  so this runs on CPU): parameter bytes (they exist before the step), the step's peak (the
  activations of the unroll, the gradients, and AdamW's two moments, allocated by the first
  ``optimizer.step()`` inside the region) and what the step leaves alive (gradients + moments);
* the fastest of ``--repeats`` interleaved step times (CPU, for the ratios only).

The full-size part counts PixArt-α-XL/2's parameters (28 blocks, 16 heads x 72, 512 px) for the
same variants, built on the meta device (nothing allocated), with the adapters peft puts on
the default targets.

    python benchmarks/bench_lora.py            # writes results/lora.json + .md + .png
    python benchmarks/bench_lora.py --smoke    # toy model, seconds
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from e2ed2.engine.config import ModelConfig  # noqa: E402
from e2ed2.engine.core.estimate import (  # noqa: E402
    DenoiserShape,
    build_pixart,
    make_inputs,
    make_trajectory,
)
from e2ed2.engine.core.lora import add_lora  # noqa: E402
from e2ed2.engine.core.memory import track_memory  # noqa: E402
from e2ed2.engine.core.network import per_step_networks  # noqa: E402

VARIANTS = ("shared_full", "per_step_copies", "shared_lora", "per_step_lora")
LABELS = {
    "shared_full": "shared, full fine-tune",
    "per_step_copies": "per-step copies (K full networks)",
    "shared_lora": "shared LoRA",
    "per_step_lora": "per-step LoRA (1 base, K adapters)",
}
# PixArt-α-XL/2 at 512 px (64x64 latent): 28 blocks, hidden 1152, T5-XXL captions (4096).
FULL_SIZE = DenoiserShape(
    num_layers=28, num_attention_heads=16, attention_head_dim=72, caption_channels=4096
)
FULL_SIZE_LATENT = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, results/smoke/")
    parser.add_argument("--num-steps", type=int, default=4, help="K")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = r)")
    parser.add_argument("--batch", type=int, default=_common.CPU_BATCH)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def build(variant: str, model: torch.nn.Module, num_steps: int, rank: int) -> torch.nn.Module:
    """The trained module of ``variant`` (what the trainer hands DeepSpeed), made of ``model``."""
    if variant == "shared_full":
        return model
    if variant == "per_step_copies":
        return per_step_networks(model, num_steps)
    shared = variant == "shared_lora"
    return add_lora(model, ModelConfig(lora_rank=rank, share_across_steps=shared), num_steps)


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trained ones); ``parameters()`` yields a shared tensor once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Step:
    """One optimizer step of ``module``: the K-step unroll, L2 on the final sample, backward,
    AdamW (its moments are created by the first step, as in a run's first iteration)."""

    def __init__(self, module: torch.nn.Module, clean: torch.Tensor, cond, num_steps: int):
        self.module = module
        self.clean, self.cond = clean, cond
        self.trajectory = make_trajectory("step", num_steps)

    def __call__(self) -> torch.optim.Optimizer:
        trained = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-5)
        self.module.zero_grad(set_to_none=True)
        sample, _ = self.trajectory(
            self.module, self.cond, clean=self.clean, generator=torch.Generator().manual_seed(0)
        )
        (sample - self.clean).square().mean().backward()
        optimizer.step()
        return optimizer  # kept alive: its moments and the gradients are the step's end bytes


def full_size_counts(
    num_steps: int, rank: int, shape: DenoiserShape = FULL_SIZE, latent: int = FULL_SIZE_LATENT
) -> dict[str, dict[str, int]]:
    """Parameter counts of every variant at PixArt-α-XL/2 size (meta tensors, no memory)."""
    out = {}
    # On the meta device: shapes only (peft cannot move fake tensors between devices).
    with torch.device("meta"):
        for variant in VARIANTS:
            if variant == "per_step_copies":
                continue  # K identical copies: counted below, without building them
            model = build(variant, build_pixart(shape, latent), num_steps, rank)
            total, trained = parameter_counts(model)
            out[variant] = {"parameters": total, "trained_parameters": trained}
    out["per_step_copies"] = {k: num_steps * v for k, v in out["shared_full"].items()}
    return out


def run(args: argparse.Namespace, name: str = "lora") -> dict:
    torch.set_num_threads(args.threads)
    if args.smoke:
        shape, latent, repeats = _common.SMOKE_MODEL, _common.SMOKE_LATENT, 1
    else:
        shape, latent, repeats = _common.CPU_MODEL, _common.CPU_LATENT, args.repeats
    base = build_pixart(shape, latent)
    clean, cond = make_inputs(shape, latent, args.batch, torch.float32)
    modules = {v: build(v, copy.deepcopy(base), args.num_steps, args.rank) for v in VARIANTS}
    steps = {v: Step(modules[v], clean, cond, args.num_steps) for v in VARIANTS}

    reports = {}
    for variant, step in steps.items():
        step()  # warm-up (allocator, lazy init); its optimizer and gradients are dropped
        modules[variant].zero_grad(set_to_none=True)
        _, reports[variant] = track_memory(step)
        modules[variant].zero_grad(set_to_none=True)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # interleaved: load from other jobs falls on every variant alike
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[variant].append(time.perf_counter() - start)
            modules[variant].zero_grad(set_to_none=True)
    # --smoke: the same counting on the toy (the full-size build alone takes ~20 s on CPU).
    full = full_size_counts(args.num_steps, args.rank, *((shape, latent) if args.smoke else ()))

    rows = []
    for variant in VARIANTS:
        total, trained = parameter_counts(modules[variant])
        report = reports[variant]
        row = {
            "variant": variant,
            "parameters": total,
            "trained_parameters": trained,
            "parameter_bytes": parameter_bytes(modules[variant]),
            "step_peak_bytes": report.peak_bytes,
            "step_end_bytes": report.end_bytes,
            "step_seconds": min(seconds[variant]),
            "full_size_parameters": full[variant]["parameters"],
            "full_size_trained_parameters": full[variant]["trained_parameters"],
        }
        row["total_peak_bytes"] = row["parameter_bytes"] + row["step_peak_bytes"]
        rows.append(row)
    reference = rows[0]
    for row in rows:
        row["total_peak_over_shared_full"] = row["total_peak_bytes"] / reference["total_peak_bytes"]
        print(
            f"{LABELS[row['variant']]:36s} params {row['parameters'] / 1e6:7.2f} M "
            f"(trained {row['trained_parameters'] / 1e6:7.3f} M), params "
            f"{_common.mib(row['parameter_bytes']):7.1f} MiB + step peak "
            f"{_common.mib(row['step_peak_bytes']):7.1f} MiB = "
            f"{_common.mib(row['total_peak_bytes']):7.1f} MiB "
            f"({row['total_peak_over_shared_full']:.2f}x shared full), "
            f"{row['step_seconds']:.3f} s",
            flush=True,
        )
    payload = {
        "model": {**shape.__dict__, "latent_size": latent, "batch": args.batch, "dtype": "float32"},
        "full_size_model": (
            {**shape.__dict__, "latent_size": latent}
            if args.smoke
            else {**FULL_SIZE.__dict__, "latent_size": FULL_SIZE_LATENT}
        ),
        "num_steps": args.num_steps,
        "lora_rank": args.rank,
        "lora_target_modules": list(ModelConfig().lora_target_modules),
        "checkpoint_policy": "step",
        "optimizer": "AdamW (fp32 moments)",
        "repeats": repeats,
        "rows": rows,
    }

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = range(len(rows))
    axes[0].bar(xs, [_common.mib(r["parameter_bytes"]) for r in rows], label="parameters")
    axes[0].bar(
        xs,
        [_common.mib(r["step_peak_bytes"]) for r in rows],
        bottom=[_common.mib(r["parameter_bytes"]) for r in rows],
        label="step peak (activations, gradients, AdamW moments)",
    )
    axes[0].set_title("measured live MiB, one training step")
    axes[1].bar(xs, [r["full_size_trained_parameters"] / 1e6 for r in rows], label="trained")
    axes[1].bar(
        xs,
        [(r["full_size_parameters"] - r["full_size_trained_parameters"]) / 1e6 for r in rows],
        bottom=[r["full_size_trained_parameters"] / 1e6 for r in rows],
        label="frozen",
    )
    axes[1].set_title("PixArt-α-XL/2 parameters (millions)")
    for ax in axes:
        ax.set_xticks(list(xs), [LABELS[r["variant"]].replace(" (", "\n(") for r in rows])
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"K={args.num_steps}, LoRA rank {args.rank}, policy step: {shape.num_layers} blocks, "
        f"hidden {shape.hidden_size}, {(latent // shape.patch_size) ** 2} tokens, "
        f"B={args.batch}, fp32, CPU"
    )
    path = _common.write_result(name, payload, fig, smoke=args.smoke)
    write_markdown(path.with_suffix(".md"), payload)
    return payload


def write_markdown(path: Path, payload: dict) -> None:
    """The table of the JSON, for benchmarks/README.md."""
    lines = [
        f"K = {payload['num_steps']}, LoRA rank {payload['lora_rank']}, policy "
        f"{payload['checkpoint_policy']}, {payload['optimizer']}; measured with track_memory.",
        "",
        "| variant | parameters (M) | trained (M) | params MiB | step peak MiB | total MiB "
        "| vs shared full | step s | PixArt-α-XL/2 params (M) | trained (M) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {LABELS[r['variant']]} | {r['parameters'] / 1e6:.2f} | "
            f"{r['trained_parameters'] / 1e6:.3f} | {_common.mib(r['parameter_bytes']):.1f} | "
            f"{_common.mib(r['step_peak_bytes']):.1f} | {_common.mib(r['total_peak_bytes']):.1f} | "
            f"{r['total_peak_over_shared_full']:.2f}x | {r['step_seconds']:.3f} | "
            f"{r['full_size_parameters'] / 1e6:.1f} | {r['full_size_trained_parameters'] / 1e6:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run(parse_args())
