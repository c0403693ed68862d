"""Timestep embedding (PixArt-α's adaln_single.emb): fused Triton op vs eager diffusers modules.

Question answered: how much of the K-times-per-iteration timestep embedding is launch overhead,
and how much does fusing it save, forward, backward and both, at batch 8..64?

Providers: ``diffusers`` = ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`` then
``TimestepEmbedding(256, 1152)`` exactly as PixArt calls them (sinusoid cast to the hidden dtype),
eager; ``e2ed2`` = :class:`~e2ed2.kernels.FusedTimestepEmbedding` over the same ``nn.Linear``
weights; ``diffusers-compiled`` (``--compile``) = the diffusers pair under ``torch.compile``.
Outputs and weight gradients are checked against diffusers before anything is timed; timings use
``triton.testing.do_bench`` (CUDA events, median). The op is launch-bound (a few MFLOP), so the
report is microseconds and speedups, not TFLOP/s.

Needs a CUDA GPU: without one it says so and exits with status 2; ``--smoke`` instead runs a small
correctness check (on CPU through the Triton interpreter) and reports no timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
MAX_REL_ERR = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--dim", type=int, default=1152, help="PixArt-α hidden size")
    parser.add_argument("--channels", type=int, default=256, help="sinusoid channels")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(diffusers)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG next to it)")
    parser.add_argument(
        "--smoke", action="store_true", help="correctness check only (CPU: Triton interpreter)"
    )
    return parser.parse_args(argv)


class DiffusersTimestepEmbedding(nn.Module):
    """PixArt's eager path: ``timestep_embedder(time_proj(t).to(hidden_dtype))``."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(channels, dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype
        return self.timestep_embedder(self.time_proj(timesteps).to(dtype))


def build(channels: int, dim: int, dtype: torch.dtype, device: str, compile_: bool):
    """The diffusers module and the providers sharing its parameters."""
    from e2ed2.kernels import FusedTimestepEmbedding

    torch.manual_seed(0)
    eager = DiffusersTimestepEmbedding(channels, dim).to(device, dtype)
    fused = FusedTimestepEmbedding.from_diffusers(
        eager.time_proj, eager.timestep_embedder, backend="triton"
    )
    fns: dict[str, Callable] = {"diffusers": eager, "e2ed2": fused}
    if compile_:
        fns["diffusers-compiled"] = torch.compile(eager)
    return eager, fns


def outputs_and_grads(fn: Callable, params: list[nn.Parameter], timesteps, grad_out):
    for p in params:
        p.grad = None
    out = fn(timesteps)
    out.backward(grad_out)
    result = [out.detach()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return result


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-12)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def time_modes(fn: Callable, params, timesteps, grad_out, rep_ms: int) -> dict[str, float]:
    import triton.testing

    graph = [fn(timesteps)]  # one forward whose graph the backward timing replays

    def forward():  # with autograd on: training builds the graph, and that is part of the cost
        fn(timesteps)

    def backward():
        graph[0].backward(grad_out, retain_graph=True)

    def forward_backward():
        fn(timesteps).backward(grad_out)

    result = {}
    for mode, run in zip(MODES, (forward, backward, forward_backward), strict=True):
        median, low, high = triton.testing.do_bench(
            run, rep=rep_ms, grad_to_none=params, quantiles=[0.5, 0.2, 0.8]
        )
        result[f"{mode}_us"] = 1e3 * median
        result[f"{mode}_us_p20"], result[f"{mode}_us_p80"] = 1e3 * low, 1e3 * high
    graph.clear()  # frees the retained graph before measuring memory
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    result["fwd+bwd_peak_kib"] = (torch.cuda.max_memory_allocated() - base) / 2**10
    for p in params:
        p.grad = None
    return result


def run_batch(batch: int, args: argparse.Namespace, eager, fns) -> dict:
    dtype = eager.timestep_embedder.linear_1.weight.dtype
    params = list(eager.parameters())
    g = torch.Generator(device="cuda").manual_seed(batch)
    timesteps = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
    grad_out = torch.randn(batch, args.dim, device="cuda", dtype=dtype, generator=g)
    expected = outputs_and_grads(eager, params, timesteps, grad_out)
    entry: dict = {"batch": batch, "providers": {}}
    for name, fn in fns.items():
        got = outputs_and_grads(fn, params, timesteps, grad_out)
        err = max(max_rel_error(a, b) for a, b in zip(got, expected, strict=True))
        if err > MAX_REL_ERR[args.dtype]:
            raise SystemExit(f"{name} disagrees with diffusers at batch {batch} ({err:.2e})")
        timing = time_modes(fn, params, timesteps, grad_out, args.rep_ms)
        entry["providers"][name] = {"max_rel_err_vs_diffusers": err, **timing}
    base = entry["providers"]["diffusers"]
    ours = entry["providers"]["e2ed2"]
    for mode in MODES:
        entry[f"{mode}_speedup"] = base[f"{mode}_us"] / ours[f"{mode}_us"]
    print(
        f"batch {batch:3d}: "
        + " | ".join(
            f"{mode} diffusers {base[f'{mode}_us']:7.1f} us, e2ed2 {ours[f'{mode}_us']:7.1f} us "
            f"({entry[f'{mode}_speedup']:.2f}x)"
            for mode in MODES
        )
    )
    return entry


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["batches"]
    batches = [r["batch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, mode in zip(axes, MODES, strict=True):
        for provider in rows[0]["providers"]:
            ax.plot(
                batches,
                [r["providers"][provider][f"{mode}_us"] for r in rows],
                "o-",
                label=provider,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_ylabel("median time (us)")
        ax.set_title(mode)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle(
        f"timestep embedding ({results['channels']} -> {results['dim']}, {results['dtype']}) "
        f"on {results['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smoke_check(args: argparse.Namespace) -> int:
    """Outputs and weight gradients vs diffusers at small sizes; no timings."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    eager, fns = build(args.channels, 64, dtype, device, compile_=False)
    params = list(eager.parameters())
    worst = 0.0
    for batch in (1, 8, 37):
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        grad_out = torch.randn(batch, 64, device=device, dtype=dtype)
        expected = outputs_and_grads(eager, params, timesteps, grad_out)
        got = outputs_and_grads(fns["e2ed2"], params, timesteps, grad_out)
        err = max(max_rel_error(a, b) for a, b in zip(got, expected, strict=True))
        worst = max(worst, err)
        print(f"smoke: batch {batch}, fp16: max rel err vs diffusers {err:.2e}")
    ok = worst < MAX_REL_ERR["fp16"]
    print(
        f"smoke check {'passed' if ok else 'FAILED'} on {device}; no timings taken "
        "(performance numbers need a CUDA GPU)"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if not args.smoke:
            print(
                "bench_timestep_embedding: no CUDA GPU found. Timings need a GPU (the Triton CPU "
                "interpreter says nothing about performance). Run with --smoke for a correctness "
                "check only.",
                file=sys.stderr,
            )
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`
    if args.smoke:
        return smoke_check(args)

    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    eager, fns = build(args.channels, args.dim, dtype, "cuda", args.compile)
    name = torch.cuda.get_device_name()
    results = {
        "benchmark": "timestep_embedding",
        "device": name,
        "channels": args.channels,
        "dim": args.dim,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "batches": [run_batch(b, args, eager, fns) for b in args.batches],
    }
    tag = name.replace(" ", "_").replace("/", "_")
    out = args.out or RESULTS / f"timestep_embedding_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
