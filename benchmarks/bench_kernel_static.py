"""Static performance check of the Triton kernels for sm_80 / sm_90, without a GPU.

Question answered: compiled exactly as the launchers would launch them at PixArt-α XL/2 shapes
(16 heads, D = 72, and D = 64 / 128 for comparison; fp16 and bf16; self-attention over 1024 and
4096 tokens, cross-attention to 120 padded text tokens; forward, delta, dK/dV and dQ; the fused
timestep embedding), does every autotune config fit the GPU without spilling registers, read its
tiles with 128-bit loads and pipeline its main loop with ``cp.async``?

Everything comes from ``e2ed2.kernels.static_check`` (the compile, the disk cache and the checks);
this script runs the sweep and writes ``results/kernel_static_<tag>.json`` (one row per compiled
config and GPU) and ``results/kernel_static_<tag>.md`` (the tables shown in
``benchmarks/README.md``). The first run compiles a few hundred kernels (minutes per core); later
runs read the cache.

    python benchmarks/bench_kernel_static.py --tag after --workers 2
    python benchmarks/bench_kernel_static.py --smoke     # one config per kernel, D = 72 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

_SHORT = {
    "_attn_fwd_kernel": "attn fwd",
    "_attn_bwd_delta_kernel": "attn bwd delta",
    "_attn_bwd_dkdv_kernel": "attn bwd dK/dV",
    "_attn_bwd_dq_kernel": "attn bwd dQ",
    "_temb_fwd_kernel": "temb fwd",
    "_temb_bwd_kernel": "temb bwd",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="after", help="results/kernel_static_<tag>.{json,md}")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[72, 64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-configs", type=int, default=None, help="first N configs per kernel")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="only re-render a JSON")
    parser.add_argument(
        "--compare", type=Path, nargs=2, default=None, help="BEFORE.json AFTER.json: print a table"
    )
    parser.add_argument("--note", default=None, help="a sentence to record in the JSON / table")
    parser.add_argument("--smoke", action="store_true", help="D=72 bf16, one config per kernel")
    return parser.parse_args(argv)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def summary_table(rows: list[dict]) -> str:
    """One line per (kernel, GPU, head dim), over dtypes, cases and configs.

    Counted per unique compile (self-attention over 1024 and 4096 tokens compiles to the same code,
    so it counts once).
    """
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        groups[(r["kernel"], r["arch"], r["head_dim"])].setdefault(r["key"], r)
    lines = [
        "| kernel | GPU | D | configs | spilling | regs | max shared KiB | with 16-bit loads "
        "| 128-bit loads | cp.async (16 B) | loop not pipelined | clean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(_SHORT)
    for key in sorted(
        groups, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[1], -(k[2] or 0))
    ):
        g = list(groups[key].values())
        kernel, arch, head_dim = key
        regs = [r["regs"] or 0 for r in g]
        spilling = sum(1 for r in g if r["spill_stores"] or r["spill_loads"])
        narrow = sum(1 for r in g if r["ptx_ld16"])
        unpipelined = sum(
            1 for r in g if r["has_loop"] and r["num_stages"] > 1 and not r["ptx_cp_async"]
        )
        clean = sum(1 for r in g if not r["problems"])
        lines.append(
            f"| {_SHORT.get(kernel, kernel)} | sm_{arch} | {head_dim or '-'} | {len(g)} | "
            f"{spilling} | {min(regs)}–{max(regs)} | {_kib(max(r['shared'] for r in g))} | "
            f"{narrow} | {sum(r['ptx_ld128'] for r in g)} | "
            f"{sum(r['ptx_cp_async'] for r in g)} ({sum(r['ptx_cp_async16'] for r in g)}) | "
            f"{unpipelined} | {clean}/{len(g)} |"
        )
    return "\n".join(lines)


def detail_table(rows: list[dict], head_dim: int = 72, dtype: str = "bf16") -> str:
    """One line per config at PixArt's D = 72 (one dtype), both GPUs."""
    lines = [
        "| kernel | case | config | GPU | regs | spill B (st/ld) | shared KiB | ld.128 | ld.16 "
        "| cp.async (16 B) | blocks/SM | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in rows:
        if r["head_dim"] not in (head_dim, None) or r["dtype"] != dtype:
            continue
        case = r["case"] if r["op"] == "timestep_embedding" else r["case"].split(" ")[0]
        key = (r["kernel"], case, r["config"], r["arch"])
        if key in seen:  # self 1024 and self 4096 compile to the same code
            continue
        seen.add(key)
        lines.append(
            f"| {_SHORT.get(r['kernel'], r['kernel'])} | {case} | {r['config']} | sm_{r['arch']} | "
            f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {_kib(r['shared'])} | "
            f"{r['ptx_ld128']} | {r['ptx_ld16']} | {r['ptx_cp_async']} ({r['ptx_cp_async16']}) | "
            f"{r['blocks_per_sm']['blocks']} | {'; '.join(r['problems']) or 'clean'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# A model of expected speed (derived from the static report; NOT a measurement)
# --------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s) from NVIDIA's datasheets.
PEAKS = {80: ("A100 SXM", 312.0, 2.04), 90: ("H100 SXM", 989.4, 3.35)}
# Head-dim columns each implementation's tensor cores process at D = 72: e2ed2 covers 72 with a
# 64 + 16 tile pair; FlashAttention-2 (SDPA's flash backend) instantiates head dims 32/64/96/128/...
# and runs 72 on its 96 kernel; the memory-efficient (cutlass) backend uses its 128-column kernel
# above 64. cuDNN's padding is not documented, so it is left out.
EFFECTIVE_D = {"e2ed2": 80, "sdpa-flash (FA2)": 96, "sdpa-efficient": 128}
MODEL_CASES = (("self 1024", 1024, 1024), ("self 4096", 4096, 4096), ("cross 4096x120", 4096, 120))


def _config_tiles(config: str) -> dict[str, int]:
    """``"M128 N64 w4 s3"`` -> ``{"M": 128, "N": 64, "w": 4, "s": 3}``."""
    return {part[0]: int(part[1:]) for part in config.split()}


def speed_model(rows: list[dict], batch: int = 8, heads: int = 16, head_dim: int = 72) -> str:
    """Per kernel and GPU at D = 72 bf16 with the launcher's first config: tile bytes and FLOPs,
    arithmetic intensity against the GPU's ridge point, resident blocks from the compiled
    registers / shared memory, and the compute-bound time at 100% tensor-core efficiency for
    e2ed2 next to SDPA's D = 72 paths (same efficiency assumed: the ratio is the padding)."""
    first: dict[tuple, dict] = {}
    for r in rows:
        if r["op"] != "attention" or r["head_dim"] != head_dim or r["dtype"] != "bf16":
            continue
        key = (r["kernel"], r["arch"], "cross" in r["case"])
        first.setdefault(key, r)  # rows keep the launchers' config order: first = preferred
    lines = [
        "| GPU | kernel | case | config | tile FLOP / tile bytes | FLOP/B (ridge) | blocks/SM "
        "(warps) | useful GFLOP | bound at 100% TC: e2ed2 / FA2 / efficient (us) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    d_eff = EFFECTIVE_D["e2ed2"]
    for arch in sorted({k[1] for k in first}):
        gpu, peak_tflops, hbm_tbs = PEAKS[arch]
        ridge = peak_tflops / hbm_tbs
        for case, n_q, n_k in MODEL_CASES:
            cross = n_k != n_q
            fwd_flops = 4.0 * batch * heads * n_q * n_k * head_dim
            for kernel, factor, streamed in (
                ("_attn_fwd_kernel", 1.0, "kv"),
                ("_attn_bwd_dkdv_kernel", 1.5, "qdo"),
                ("_attn_bwd_dq_kernel", 1.0, "kv"),
            ):
                r = first.get((kernel, arch, cross))
                if r is None:
                    continue
                t = _config_tiles(r["config"])
                # Per loop iteration: the streamed tile pair (K, V or Q, dO) in bf16, and the
                # dots on it (fwd: QK^T, PV = 2; dQ: QK^T, dO V^T, dS K = 3; dK/dV: 4 + the
                # recomputed QK^T = 5, of which the FLOP accounting credits 1.5x fwd).
                rows_streamed = t["N"] if streamed == "kv" else t["M"]
                rows_owned = t["M"] if streamed == "kv" else t["N"]
                tile_bytes = 2 * rows_streamed * d_eff * 2
                dots = {"_attn_fwd_kernel": 2, "_attn_bwd_dq_kernel": 3}.get(kernel, 5)
                tile_flops = dots * 2 * rows_owned * rows_streamed * d_eff
                useful = fwd_flops * factor
                bounds = [
                    useful * d / head_dim / (peak_tflops * 1e12) * 1e6 for d in EFFECTIVE_D.values()
                ]
                occupancy = r["blocks_per_sm"]["blocks"]
                lines.append(
                    f"| {gpu} | {_SHORT[kernel]} | {case} | {r['config']} | "
                    f"{tile_flops / 1e6:.2f} M / {tile_bytes / 1024:.0f} KiB | "
                    f"{tile_flops / tile_bytes:.0f} ({ridge:.0f}) | "
                    f"{occupancy} ({occupancy * r['num_warps']}) | {useful / 1e9:.1f} | "
                    + " / ".join(f"{b:.0f}" for b in bounds)
                    + " |"
                )
    return "\n".join(lines)


def compare_table(before: dict, after: dict, head_dim: int = 72, dtype: str = "bf16") -> str:
    """Before / after per kernel and GPU at one head dim and dtype (unique compiles)."""

    def stats(results: dict) -> dict[tuple, dict]:
        out: dict[tuple, dict] = {}
        for r in {r["key"]: r for r in results["rows"]}.values():
            if r["head_dim"] not in (head_dim, None) or r["dtype"] != dtype:
                continue
            s = out.setdefault(
                (r["kernel"], r["arch"]),
                {"n": 0, "spill": 0, "ld16": 0, "ld128": 0, "cp": 0, "cp_loops": 0, "clean": 0},
            )
            s["n"] += 1
            s["spill"] += bool(r["spill_stores"] or r["spill_loads"])
            s["ld16"] += r["ptx_ld16"]
            s["ld128"] += r["ptx_ld128"]
            s["cp"] += r["ptx_cp_async"]
            s["cp_loops"] += bool(r["has_loop"] and r["ptx_cp_async"])
            s["clean"] += not r["problems"]
        return out

    b, a = stats(before), stats(after)
    lines = [
        f"| kernel (D = {head_dim}, {dtype}) | GPU | compiles | spilling | ld.16 | ld.128 | "
        "cp.async | clean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(_SHORT)
    for key in sorted(set(b) | set(a), key=lambda k: (order.index(k[0]), k[1])):
        x, y = b.get(key), a.get(key)

        def pair(field: str, x=x, y=y) -> str:
            return f"{x[field] if x else '-'} → {y[field] if y else '-'}"

        lines.append(
            f"| {_SHORT[key[0]]} | sm_{key[1]} | {pair('n')} | {pair('spill')} | {pair('ld16')} | "
            f"{pair('ld128')} | {pair('cp')} | {pair('clean')} |"
        )
    return "\n".join(lines)


def render(results: dict) -> str:
    rows = results["rows"]
    unique = {r["key"]: r for r in rows}.values()
    bad = sum(1 for r in unique if r["problems"])
    spilling = sum(1 for r in unique if r["spill_stores"] or r["spill_loads"])
    parts = [
        f"# Kernel static check: `{results['tag']}`",
        "",
        f"Triton {results['triton']}, ptxas from the wheel, {results['date']}. "
        f"{len(rows)} (config, GPU, shape) rows; {results['unique_compiles']} unique compiles, "
        f"dtypes {', '.join(sorted({r['dtype'] for r in rows}))}. "
        f"**{spilling} of the {results['unique_compiles']} compiles spill, {bad} have a "
        "problem.** Counts are PTX instructions per "
        "kernel (static, not executed): `ld.128` = `ld.global.v4.b32` (128-bit), `ld.16` = "
        "`ld.global.b16` (one fp16/bf16 element), cp.async in total (16-byte ones)."
        + (f" {results['note']}" if results.get("note") else ""),
        "",
        "## Summary (all dtypes and cases)",
        "",
        summary_table(rows),
    ]
    dtypes = sorted({r["dtype"] for r in rows})
    if 72 in {r["head_dim"] for r in rows}:
        for dtype in [d for d in ("bf16", "fp16") if d in dtypes][:1]:
            parts += ["", f"## D = 72, {dtype}, every config", "", detail_table(rows, 72, dtype)]
        parts += [
            "",
            "## Model of expected speed (derived from this report, not a measurement)",
            "",
            (speed_model.__doc__ or "").replace("\n    ", " "),
            "",
            speed_model(rows),
        ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        print(compare_table(before, after))
        return 0
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        if args.note:
            results["note"] = args.note
            args.from_json.write_text(json.dumps(results, indent=1) + "\n")
        args.from_json.with_suffix(".md").write_text(render(results))
        print(f"wrote {args.from_json.with_suffix('.md')}")
        return 0
    if os.environ.get("TRITON_INTERPRET"):
        print("bench_kernel_static: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    import triton

    from e2ed2.kernels import static_check as sc

    if args.smoke:
        args.head_dims, args.dtypes, args.max_configs, args.tag = [72], ["bf16"], 1, "smoke"
    start = time.time()
    jobs = sc.pixart_jobs(tuple(args.head_dims), tuple(args.dtypes), max_configs=args.max_configs)
    rows = sc.run_jobs(
        jobs,
        tuple(args.archs),
        cache_dir=args.cache_dir,
        workers=args.workers,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
    )
    results = {
        "benchmark": "kernel_static",
        "tag": args.tag,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "archs": args.archs,
        "seconds": round(time.time() - start, 1),
        "unique_compiles": len({r["key"] for r in rows}),
        "limits": {str(a): sc.GPU_LIMITS[a].__dict__ for a in args.archs},
        "note": args.note,
        "rows": rows,
    }
    out = (RESULTS / "smoke" if args.smoke else RESULTS) / f"kernel_static_{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(results))
    bad = [r for r in rows if r["problems"]]
    print(f"wrote {out} and {out.with_suffix('.md')}: {len(rows)} rows, {len(bad)} with problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
