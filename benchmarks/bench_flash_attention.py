"""Flash attention on PixArt-α shapes: e2ed2's Triton kernel vs torch SDPA (and xformers).

Question answered: at PixArt's head dim 72 (16 heads), is the fused kernel faster than the best
attention torch ships, forward, backward and both, and what does it cost in memory?

Cases (batch 8 by default, bf16):
  self-attention  N = 1024 / 4096 / 16384 (512 / 1024 / 2048 px), no mask;
  cross-attention Nq = 4096, Nk = 120 text tokens, per-sample padding (SDPA gets the explicit mask).

Providers: ``e2ed2`` (this repo's Triton kernels), every SDPA backend torch can run the case
with (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``; unsupported ones are recorded as such),
``sdpa-auto`` (torch's own dispatch) and ``xformers`` when importable. Before timing, each
provider's output and gradients are checked against e2ed2's (and e2ed2's against an fp32
reference on a slice); timings use ``triton.testing.do_bench`` (CUDA events, L2 flushed, median).

FLOPs are the useful ones: forward ``4 B H Nq Nk D`` with the real D = 72 (padding work is not
credited), backward 2.5x forward (five matmuls, recompute included), forward+backward 3.5x.
% of peak is against the GPU's dense bf16 tensor-core peak (table below, or --peak-tflops).

Needs a CUDA GPU: without one it says so and exits with status 2; ``--smoke`` instead runs a small
correctness check (on CPU through the Triton interpreter) and reports no timings.

    python benchmarks/bench_flash_attention.py            # writes benchmarks/results/*.json, *.png
    python benchmarks/bench_flash_attention.py --smoke    # correctness only, any machine
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

RESULTS = Path(__file__).resolve().parent / "results"
# Largest relative error (max |diff| / max |ref|) accepted before timing, per input dtype.
MAX_REL_ERR = {"bf16": 3e-2, "fp16": 1e-2}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets.
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.05,
    "A10G": 70.0,
}


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak for a device name (longest matching key), None if unknown."""
    matches = [key for key in BF16_PEAK_TFLOPS if key in name]
    return BF16_PEAK_TFLOPS[max(matches, key=len)] if matches else None


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int) -> dict[str, float]:
    forward = 4.0 * batch * heads * n_q * n_k * head_dim
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--self-lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--cross-queries", type=int, default=4096)
    parser.add_argument("--cross-keys", type=int, default=120)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak table")
    parser.add_argument("--no-xformers", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG next to it)")
    parser.add_argument(
        "--smoke", action="store_true", help="correctness check only (CPU: Triton interpreter)"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Providers: each maps (q, k, v, key_padding_mask) with q (B, H, N, D) to (B, H, Nq, D).
# ---------------------------------------------------------------------------------------------


def _sdpa(backend_name: str | None) -> Callable:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }

    def run(q, k, v, mask):
        attn_mask = None if mask is None else mask[:, None, None, :]
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        with sdpa_kernel([backends[backend_name]]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    return run


def _xformers() -> Callable | None:
    try:
        import xformers.ops as xops
    except ImportError:
        return None

    def run(q, k, v, mask):
        # xformers wants (B, N, H, D); the transposes are views, as in a diffusers processor.
        bias = None
        if mask is not None:
            batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            padded = (n_k + 7) // 8 * 8  # xformers needs the bias' last dim 8-aligned in memory
            full = torch.zeros(batch, heads, n_q, padded, device=q.device, dtype=q.dtype)
            full[..., :n_k].masked_fill_(~mask[:, None, None, :], float("-inf"))
            bias = full[..., :n_k]
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)

    return run


def providers(use_xformers: bool) -> dict[str, Callable]:
    from e2ed2.kernels import flash_attention

    result: dict[str, Callable] = {
        "e2ed2": lambda q, k, v, mask: flash_attention(q, k, v, mask, backend="triton"),
        "sdpa-auto": _sdpa(None),
        "sdpa-flash": _sdpa("flash"),
        "sdpa-efficient": _sdpa("efficient"),
        "sdpa-cudnn": _sdpa("cudnn"),
    }
    xformers_fn = _xformers() if use_xformers else None
    if xformers_fn is not None:
        result["xformers"] = xformers_fn
    return result


# ---------------------------------------------------------------------------------------------
# Cases, checks and timing
# ---------------------------------------------------------------------------------------------


def make_case(
    batch: int,
    heads: int,
    n_q: int,
    n_k: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    padded: bool,
) -> tuple[torch.Tensor, ...]:
    """q, k, v (leaves requiring grad, (B, H, N, D) views of (B, N, H, D)), mask, dO."""
    g = torch.Generator(device=device).manual_seed(0)

    def bhnd(n: int) -> torch.Tensor:
        x = torch.randn(batch, n, heads, head_dim, generator=g, device=device, dtype=dtype)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = bhnd(n_q), bhnd(n_k), bhnd(n_k)
    mask = None
    if padded:
        # Caption lengths spread over 8..Nk, one sample unpadded (T5 prompts vary a lot).
        lengths = torch.linspace(8, n_k, batch).round().long().to(device)
        mask = torch.arange(n_k, device=device)[None, :] < lengths[:, None]
    do = torch.randn(batch, heads, n_q, head_dim, generator=g, device=device, dtype=dtype)
    return q, k, v, mask, do


def _grads(fn: Callable, q, k, v, mask, do) -> tuple[torch.Tensor, ...]:
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, mask)
    out.backward(do)
    grads = (out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    for x in (q, k, v):
        x.grad = None
    return grads


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def check_against_reference(q, k, v, mask, do, rows: int = 128) -> float:
    """e2ed2 vs the exact fp32 reference on the first ``rows`` queries (cheap at any N)."""
    from e2ed2.kernels import attention_reference, flash_attention

    def sliced(x):
        return x.detach()[:, :, :rows].clone().requires_grad_()

    q_s = sliced(q)
    k_s, v_s = (x.detach().clone().requires_grad_() for x in (k, v))
    ours = _grads(
        lambda a, b, c, m: flash_attention(a, b, c, m, backend="triton"),
        q_s,
        k_s,
        v_s,
        mask,
        do[:, :, :rows],
    )
    ref_in = [x.detach().float().requires_grad_() for x in (q_s, k_s, v_s)]
    ref = _grads(attention_reference, *ref_in, mask, do[:, :, :rows].float())
    return max(max_rel_error(a, b) for a, b in zip(ours, ref, strict=True))


def time_provider(fn: Callable, q, k, v, mask, do, rep_ms: int) -> dict[str, float]:
    """Median ms of forward, backward and forward+backward, and the fwd+bwd peak memory."""
    import triton.testing

    leaves = [q, k, v]

    def forward():
        with torch.no_grad():
            fn(q, k, v, mask)

    graph = [fn(q, k, v, mask)]  # one forward whose graph the backward timing replays

    def backward():
        graph[0].backward(do, retain_graph=True)

    def forward_backward():
        fn(q, k, v, mask).backward(do)

    result = {}
    for mode, run in (("fwd", forward), ("bwd", backward), ("fwd+bwd", forward_backward)):
        median, low, high = triton.testing.do_bench(
            run, rep=rep_ms, grad_to_none=leaves, quantiles=[0.5, 0.2, 0.8]
        )
        result[f"{mode}_ms"], result[f"{mode}_ms_p20"], result[f"{mode}_ms_p80"] = median, low, high
    graph.clear()  # frees the retained graph before measuring memory
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    result["fwd+bwd_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for x in leaves:
        x.grad = None
    return result


def run_case(
    name: str, args: argparse.Namespace, n_q: int, n_k: int, padded: bool, peak: float | None
) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    q, k, v, mask, do = make_case(
        args.batch, args.heads, n_q, n_k, args.head_dim, dtype, "cuda", padded
    )
    flops = attention_flops(args.batch, args.heads, n_q, n_k, args.head_dim)
    case = {
        "case": name,
        "batch": args.batch,
        "heads": args.heads,
        "n_q": n_q,
        "n_k": n_k,
        "head_dim": args.head_dim,
        "padded": padded,
        "dtype": args.dtype,
        "flops": flops,
        "e2ed2_vs_fp32_reference_max_rel_err": check_against_reference(q, k, v, mask, do),
        "providers": {},
    }
    err = case["e2ed2_vs_fp32_reference_max_rel_err"]
    print(
        f"\n== {name}: B={args.batch} H={args.heads} Nq={n_q} Nk={n_k} D={args.head_dim} "
        f"mask={padded} (e2ed2 vs fp32 reference: max rel err {err:.2e})"
    )
    if err > MAX_REL_ERR[args.dtype]:
        raise SystemExit(f"e2ed2 disagrees with the fp32 reference ({err:.2e}): not timing it")
    fns = providers(not args.no_xformers)
    ours = _grads(fns["e2ed2"], q, k, v, mask, do)
    for provider, fn in fns.items():
        entry: dict = {}
        try:
            theirs = _grads(fn, q, k, v, mask, do)
        except RuntimeError as err:  # e.g. an SDPA backend that does not take this case
            entry = {"supported": False, "error": str(err).splitlines()[0][:300]}
            print(f"  {provider:15s} unsupported: {entry['error'][:100]}")
            torch.cuda.empty_cache()
            case["providers"][provider] = entry
            continue
        entry["supported"] = True
        entry["max_rel_diff_vs_e2ed2"] = max(
            max_rel_error(a, b) for a, b in zip(theirs, ours, strict=True)
        )
        del theirs
        entry.update(time_provider(fn, q, k, v, mask, do, args.rep_ms))
        for mode in ("fwd", "bwd", "fwd+bwd"):
            tflops = flops[mode] / (entry[f"{mode}_ms"] * 1e-3) / 1e12
            entry[f"{mode}_tflops"] = tflops
            entry[f"{mode}_pct_of_peak"] = None if peak is None else 100.0 * tflops / peak
        case["providers"][provider] = entry
        print(
            f"  {provider:15s} fwd {entry['fwd_ms']:8.3f} ms {entry['fwd_tflops']:6.1f} TF/s | "
            f"bwd {entry['bwd_ms']:8.3f} ms {entry['bwd_tflops']:6.1f} TF/s | fwd+bwd "
            f"{entry['fwd+bwd_ms']:8.3f} ms {entry['fwd+bwd_tflops']:6.1f} TF/s | peak "
            f"{entry['fwd+bwd_peak_mib']:8.1f} MiB | diff {entry['max_rel_diff_vs_e2ed2']:.1e}"
        )
    sdpa = {p: e for p, e in case["providers"].items() if p.startswith("sdpa") and e["supported"]}
    ours_entry = case["providers"]["e2ed2"]
    if sdpa:
        for mode in ("fwd", "bwd", "fwd+bwd"):
            best = min(sdpa, key=lambda p, m=mode: sdpa[p][f"{m}_ms"])
            case[f"{mode}_best_sdpa"] = best
            case[f"{mode}_speedup_vs_best_sdpa"] = (
                sdpa[best][f"{mode}_ms"] / ours_entry[f"{mode}_ms"]
            )
        print(
            "  speedup vs best SDPA: "
            + ", ".join(
                f"{m} {case[f'{m}_speedup_vs_best_sdpa']:.2f}x ({case[f'{m}_best_sdpa']})"
                for m in ("fwd", "bwd", "fwd+bwd")
            )
        )
    del q, k, v, do
    torch.cuda.empty_cache()
    return case


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    names = [c["case"] for c in cases]
    provider_names = sorted(
        {p for c in cases for p in c["providers"]}, key=lambda p: (p != "e2ed2", p)
    )
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=False)
    width = 0.8 / max(1, len(provider_names))
    for ax, mode in zip(axes, ("fwd", "bwd", "fwd+bwd"), strict=True):
        for i, provider in enumerate(provider_names):
            values = [
                c["providers"].get(provider, {}).get(f"{mode}_tflops", 0.0) or 0.0 for c in cases
            ]
            xs = [j + (i - (len(provider_names) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, values, width=width, label=provider)
        if results.get("peak_tflops"):
            ax.axhline(results["peak_tflops"], color="k", ls="--", lw=0.8, label="bf16 dense peak")
        ax.set_xticks(range(len(cases)), names, rotation=20)
        ax.set_title(f"{mode} (useful TFLOP/s, D={cases[0]['head_dim']})")
        ax.set_ylabel("TFLOP/s")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"flash attention on {results['device']}  ({results['dtype']}, B={cases[0]['batch']}, H={cases[0]['heads']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smoke_check() -> int:
    """Small correctness check of the Triton backend vs the fp32 reference; no timings."""
    from e2ed2.kernels import attention_reference, flash_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    worst = 0.0
    for n_q, n_k, padded in ((70, 70, False), (64, 23, True)):
        q, k, v, mask, do = make_case(2, 2, n_q, n_k, 72, dtype, device, padded)
        ours = _grads(
            lambda a, b, c, m: flash_attention(a, b, c, m, backend="triton"), q, k, v, mask, do
        )
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = _grads(attention_reference, *ref_in, mask, do.float())
        err = max(max_rel_error(a, b) for a, b in zip(ours, ref, strict=True))
        worst = max(worst, err)
        print(f"smoke: Nq={n_q} Nk={n_k} D=72 mask={padded} fp16: max rel err vs fp32 {err:.2e}")
    ok = worst < 2e-2
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
                "bench_flash_attention: no CUDA GPU found. Timings need a GPU (the Triton CPU "
                "interpreter is orders of magnitude slower and says nothing about performance). "
                "Run with --smoke for a correctness check only.",
                file=sys.stderr,
            )
            return 2
        # Must precede the first `import triton` (inside e2ed2.kernels).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.smoke:
        return smoke_check()

    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops if args.peak_tflops is not None else gpu_peak_tflops(name)
    results = {
        "benchmark": "flash_attention",
        "device": name,
        "capability": list(torch.cuda.get_device_capability()),
        "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops is not None else "datasheet table",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "flop_convention": "fwd 4*B*H*Nq*Nk*D (real D), bwd 2.5x, fwd+bwd 3.5x",
        "cases": [],
    }
    if peak is None:
        print(f"unknown peak for {name!r}: % of peak not reported (pass --peak-tflops)")
    for n in args.self_lengths:
        results["cases"].append(run_case(f"self N={n}", args, n, n, False, peak))
    results["cases"].append(
        run_case(
            f"cross {args.cross_queries}x{args.cross_keys} padded",
            args,
            args.cross_queries,
            args.cross_keys,
            True,
            peak,
        )
    )
    tag = name.replace(" ", "_").replace("/", "_")
    out = args.out or RESULTS / f"flash_attention_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
