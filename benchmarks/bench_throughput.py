"""End-to-end training throughput (issue 5, question 5).

Question: how many images/s and model TFLOP/s does one E2ED2 training iteration (K = 4 sampler
steps with gradients, `step` checkpointing, L2 on the final sample, backward, AdamW step) reach
for the embedded default and a mid-size config, with and without the fused Triton kernels, and
on a GPU what fraction of the GPU's bf16 peak (MFU) is that?

Model FLOPs are the useful ones (forward + backward of K network calls, FlopCounterMode on plain
autograd, i.e. recompute not credited); hardware FLOPs include `step`'s recompute. The fused
kernels are not dispatcher ops, so FLOPs are always counted on the unfused model (same math).

Triton kernels run only on CUDA (the CPU interpreter is a correctness tool, not a speed): on a
CPU-only machine the "with kernels" rows are recorded as not measured.

    python benchmarks/bench_throughput.py                 # results/throughput.{json,png}
    python benchmarks/bench_throughput.py --smoke
    python benchmarks/bench_throughput.py --mid-latent 64 --mid-batch 8   # a GPU: 512 px, batch 8
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from e2ed2.engine.config.model import ModelConfig  # noqa: E402
from e2ed2.engine.core.estimate import make_trajectory, run_iteration  # noqa: E402
from e2ed2.engine.core.models import build_denoiser  # noqa: E402
from e2ed2.engine.core.network import Conditioning  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    model: ModelConfig
    latent_channels: int
    latent_size: int
    text_tokens: int
    text_dim: int
    batch: int


def cases(args: argparse.Namespace) -> list[Case]:
    # configs/embedded.toml: 4 blocks, 4 heads x 16, 16x16 one-channel digits, 32 ByT5 tokens of
    # a 64-dim tiny T5, batch 8.
    embedded = Case("embedded default", ModelConfig(), 1, 16, 32, 64, 8)
    if args.smoke:
        return [embedded]
    mid = Case(
        f"mid ({args.mid_layers} blocks, hidden {args.mid_heads * 64}, {args.mid_latent}^2 latent)",
        ModelConfig(
            num_layers=args.mid_layers, num_attention_heads=args.mid_heads, attention_head_dim=64
        ),
        4,
        args.mid_latent,
        120,
        4096,
        args.mid_batch,
    )
    return [embedded, mid]


def inputs(case: Case, device: torch.device, dtype: torch.dtype):
    clean = torch.randn(
        case.batch,
        case.latent_channels,
        case.latent_size,
        case.latent_size,
        device=device,
        dtype=dtype,
    )
    states = torch.randn(case.batch, case.text_tokens, case.text_dim, device=device, dtype=dtype)
    mask = torch.ones(case.batch, case.text_tokens, dtype=torch.long, device=device)
    return clean, Conditioning(states, mask)


def build(case: Case, fused: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = ModelConfig(**{**case.model.__dict__, "fused_kernels": fused})
    model = build_denoiser(
        config,
        latent_channels=case.latent_channels,
        latent_size=case.latent_size,
        text_dim=case.text_dim,
    )
    if device.type == "cpu" and dtype == torch.float32:
        return model  # (and under FakeTensorMode, Module.to cannot swap fake parameters)
    return model.to(device=device, dtype=dtype)


def count_flops(case: Case, policy: str, num_steps: int) -> int:
    trajectory = make_trajectory(policy, num_steps)  # outside: the schedule reads real values
    with FakeTensorMode():
        model = build(case, False, torch.device("cpu"), torch.float32)
        clean, cond = inputs(case, torch.device("cpu"), torch.float32)
        with FlopCounterMode(display=False) as counter:
            run_iteration(model, trajectory, clean, cond)
    return counter.get_total_flops()


def time_iteration(
    case: Case,
    fused: bool,
    policy: str,
    num_steps: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    model = build(case, fused, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean, cond = inputs(case, device, dtype)
    trajectory = make_trajectory(policy, num_steps)

    def iteration() -> None:
        run_iteration(model, trajectory, clean, cond)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    iteration()  # warm-up (Triton autotuning / compilation, allocator)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        iteration()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak_tflops = None
    if on_gpu:
        from bench_flash_attention import gpu_peak_tflops

        peak_tflops = args.peak_tflops or gpu_peak_tflops(torch.cuda.get_device_name())
    rows = []
    for case in cases(args):
        model_flops = count_flops(case, "none", args.num_steps)
        hardware_flops = count_flops(case, args.policy, args.num_steps)
        for fused in (False, True):
            row = {
                "case": case.name,
                "fused_kernels": fused,
                "batch": case.batch,
                "num_steps": args.num_steps,
                "policy": args.policy,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "model_flops_per_iteration": model_flops,
                "hardware_flops_per_iteration": hardware_flops,
            }
            if fused and not on_gpu:
                row["not_measured"] = "Triton kernels need a CUDA GPU (none here)"
                rows.append(row)
                continue
            seconds = time_iteration(
                case,
                fused,
                args.policy,
                args.num_steps,
                1 if args.smoke else args.repeats,
                device,
                dtype,
            )
            row.update(
                iteration_seconds=seconds,
                images_per_s=case.batch / seconds,
                model_tflops_per_s=model_flops / seconds / 1e12,
                hardware_tflops_per_s=hardware_flops / seconds / 1e12,
            )
            if peak_tflops:
                row["mfu"] = row["model_tflops_per_s"] / peak_tflops
            rows.append(row)
            print(
                f"{case.name} fused={fused}: {row['images_per_s']:.2f} img/s, "
                f"{row['model_tflops_per_s'] * 1e3:.2f} model GFLOP/s",
                flush=True,
            )
    payload = {"gpu_peak_bf16_tflops": peak_tflops, "rows": rows}
    measured = [r for r in rows if "images_per_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['case']}\n{'fused' if r['fused_kernels'] else 'torch'}" for r in measured]
    axes[0].bar(labels, [r["images_per_s"] for r in measured])
    axes[0].set_title("images / s")
    axes[1].bar(labels, [r["model_tflops_per_s"] * 1e3 for r in measured])
    axes[1].set_title("model GFLOP/s (recompute not credited)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"E2ED2 iteration (K={args.num_steps}, {args.policy}, AdamW) on {device.type}"
        + ("" if on_gpu else f" ({torch.get_num_threads()} thread; not GPU performance)")
    )
    _common.write_result("throughput", payload, fig, smoke=args.smoke)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--policy", default="step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mid-layers", type=int, default=12)
    parser.add_argument("--mid-heads", type=int, default=12)
    parser.add_argument("--mid-latent", type=int, default=32)
    parser.add_argument("--mid-batch", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak override")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
