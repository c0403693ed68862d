"""One-command GPU validation: kernel tests on the GPU, kernels vs SDPA, 20 bf16 ZeRO-3 steps.

Run on a CUDA machine with the project installed (``pip install -e .``; nothing else is
installed or downloaded):

    python benchmarks/gpu_check.py            # -> benchmarks/results/gpu_check_<gpu>.json

Steps, each a subprocess with its own time limit (all run even when one fails; the sum of the
limits is about 9 minutes, sized for one H100):

1. ``tests``: ``pytest tests/kernels -m "not slow"`` on the GPU (the tests' conftest uses the GPU
   whenever ``nvidia-smi`` sees one), with ``E2ED2_TRITON_CONFIGS=first``: one autotune config
   per kernel, or the ~40 shapes of the tests would each compile every config.
   ``offload``: ``tests/engine/core/test_offload_cuda.py``: ``block_offload``'s pinned
   side-stream copies on CUDA, its gradients against ``none`` and its device peak against ``block``;
   the per-step backward's CUDA peak against one backward's (the shared weights' gradient sum).
2. ``flash_attention``: ``bench_flash_attention.py`` at PixArt-α's D = 72, bf16, batch 8, 16
   heads: self-attention over 1024 and 4096 tokens, cross-attention 4096 x 120 padded keys;
   e2ed2 vs every SDPA backend (and xformers when importable); outputs and gradients checked
   against each other and an fp32 reference before timing. Summarised below as measured TFLOP/s
   of forward+backward, e2ed2 next to the best SDPA backend.
3. ``timestep_embedding``: ``bench_timestep_embedding.py`` (fused vs eager diffusers, bf16).
4. ``train``: ``e2ed2 train`` for 20 optimizer steps, bf16, ZeRO-3, fused kernels on, a mid-size
   PixArt (12 blocks x 16 heads x 72 = 1152 wide, 64 x 64 input = 1024 tokens, batch 8, K = 4
   sampler steps, the per-step backward: one ZeRO-3 micro-step per sampler step, as the
   presets run), configured only through the CLI's ``section.key=value`` overrides.

Writes one JSON with every step's status, time, output tail and parsed results; exits 0 if every
step passed, 1 otherwise, 2 without CUDA (nothing is run or faked then).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"

# Per-step wall-clock limits in seconds (sum ~ 9 minutes).
LIMITS = {
    "tests": 150,
    "offload": 45,
    "flash_attention": 150,
    "timestep_embedding": 45,
    "train": 135,
}

TRAIN_OVERRIDES = [
    "run.max_steps=20",
    'run.precision="bf16"',
    'run.deepspeed_config="zero3"',
    "run.batch_per_rank=8",
    "run.log_every_steps=5",
    "run.checkpoint_every_steps=1000",
    "run.sample_every_steps=1000",
    "run.export_at_end=false",
    "run.resume=false",
    "model.num_layers=12",
    "model.num_attention_heads=16",
    "model.attention_head_dim=72",
    "model.fused_kernels=true",
    "data.resolution=64",
    "trajectory.per_step_backward=true",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument(
        "--only", nargs="+", choices=list(LIMITS), default=list(LIMITS), help="steps to run"
    )
    parser.add_argument("--scale-limits", type=float, default=1.0, help="multiply every limit")
    return parser.parse_args(argv)


def run_step(name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
    """Run one step; never raises. ``passed`` = exit status 0 within the limit."""
    start = time.time()
    print(f"== {name}: {' '.join(cmd)} (limit {limit_s:.0f} s)", flush=True)
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=limit_s,
        )
        rc, out, timed_out = proc.returncode, proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as err:
        rc, timed_out = None, True
        out = (
            (err.stdout or b"").decode(errors="replace")
            if isinstance(err.stdout, bytes)
            else (err.stdout or "")
        )
    seconds = time.time() - start
    passed = rc == 0
    print(
        f"   {'passed' if passed else 'FAILED'} in {seconds:.0f} s"
        + (" (time limit)" if timed_out else f" (exit {rc})"),
        flush=True,
    )
    return {
        "command": cmd,
        "passed": passed,
        "returncode": rc,
        "timed_out": timed_out,
        "seconds": round(seconds, 1),
        "output_tail": out[-4000:],
    }


def flash_summary(results: dict) -> list[dict]:
    """Measured fwd+bwd TFLOP/s at D = 72: e2ed2 next to the best SDPA backend, per case."""
    rows = []
    for case in results.get("cases", []):
        providers = case["providers"]
        ours = providers.get("e2ed2", {})
        sdpa = {p: e for p, e in providers.items() if p.startswith("sdpa") and e.get("supported")}
        best = min(sdpa, key=lambda p: sdpa[p]["fwd+bwd_ms"]) if sdpa else None
        row = {
            "case": case["case"],
            "head_dim": case["head_dim"],
            "e2ed2_fwd+bwd_tflops": ours.get("fwd+bwd_tflops"),
            "best_sdpa": best,
            "best_sdpa_fwd+bwd_tflops": sdpa[best]["fwd+bwd_tflops"] if best else None,
            "speedup_fwd+bwd": case.get("fwd+bwd_speedup_vs_best_sdpa"),
            "speedup_fwd": case.get("fwd_speedup_vs_best_sdpa"),
            "speedup_bwd": case.get("bwd_speedup_vs_best_sdpa"),
        }
        if "xformers" in providers and providers["xformers"].get("supported"):
            row["xformers_fwd+bwd_tflops"] = providers["xformers"]["fwd+bwd_tflops"]
        rows.append(row)
    return rows


def _train_command(output_dir: str) -> list[str]:
    exe = shutil.which("e2ed2", path=str(Path(sys.executable).parent)) or shutil.which("e2ed2")
    base = [exe, "train"] if exe else [sys.executable, "-m", "e2ed2.engine.cli", "train"]
    return [*base, *TRAIN_OVERRIDES, f'run.output_dir="{output_dir}"']


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False). This script measures "
            "the kernels on a GPU and has nothing to check without one; on CPU use "
            "`pytest tests/kernels` (Triton interpreter) and "
            "`python benchmarks/bench_kernel_static.py` (sm_80/sm_90 compile report).",
            file=sys.stderr,
        )
        return 2
    name = torch.cuda.get_device_name()
    tag = name.replace(" ", "_").replace("/", "_")
    limits = {k: v * args.scale_limits for k, v in LIMITS.items()}
    report: dict = {
        "benchmark": "gpu_check",
        "device": name,
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "limits_s": limits,
        "steps": {},
    }
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # `python -m pytest` runs from the checkout's root: without this (Python >= 3.11) the root
    # would come first on sys.path and its kernels/ folder would shadow the PyPI `kernels`
    # package that transformers imports.
    env["PYTHONSAFEPATH"] = "1"
    with tempfile.TemporaryDirectory(prefix="e2ed2_gpu_check_") as tmp:
        tmp_path = Path(tmp)
        if "tests" in args.only:
            report["steps"]["tests"] = run_step(
                "tests",
                [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-m", "not slow", "-x"],
                limits["tests"],
                {**env, "E2ED2_TRITON_CONFIGS": "first"},
            )
        if "offload" in args.only:
            # block_offload's CUDA path (pinned side-stream copies): gradients and peak memory.
            report["steps"]["offload"] = run_step(
                "offload",
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "tests/engine/core/test_offload_cuda.py",
                    "-q",
                    "-s",
                ],
                limits["offload"],
                env,
            )
        if "flash_attention" in args.only:
            out = tmp_path / "flash_attention.json"
            step = run_step(
                "flash_attention",
                [
                    sys.executable,
                    str(BENCH / "bench_flash_attention.py"),
                    "--dtype",
                    "bf16",
                    "--head-dim",
                    "72",
                    "--self-lengths",
                    "1024",
                    "4096",
                    "--rep-ms",
                    "100",
                    "--out",
                    str(out),
                ],
                limits["flash_attention"],
                env,
            )
            if out.exists():
                step["results"] = json.loads(out.read_text())
                step["summary_d72"] = flash_summary(step["results"])
            elif step["passed"]:
                step["passed"] = False
                step["error"] = "the benchmark wrote no JSON"
            report["steps"]["flash_attention"] = step
        if "timestep_embedding" in args.only:
            out = tmp_path / "timestep_embedding.json"
            step = run_step(
                "timestep_embedding",
                [
                    sys.executable,
                    str(BENCH / "bench_timestep_embedding.py"),
                    "--dtype",
                    "bf16",
                    "--rep-ms",
                    "100",
                    "--out",
                    str(out),
                ],
                limits["timestep_embedding"],
                env,
            )
            if out.exists():
                step["results"] = json.loads(out.read_text())
            elif step["passed"]:
                step["passed"] = False
                step["error"] = "the benchmark wrote no JSON"
            report["steps"]["timestep_embedding"] = step
        if "train" in args.only:
            report["steps"]["train"] = run_step(
                "train", _train_command(str(tmp_path / "run")), limits["train"], env
            )
    report["seconds"] = round(time.time() - start, 1)
    report["passed"] = all(s["passed"] for s in report["steps"].values())
    out = args.out or RESULTS / f"gpu_check_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for row in report["steps"].get("flash_attention", {}).get("summary_d72", []):
        print(
            f"{row['case']}: e2ed2 {row['e2ed2_fwd+bwd_tflops']:.1f} TFLOP/s fwd+bwd vs "
            f"{row['best_sdpa']} {row['best_sdpa_fwd+bwd_tflops']:.1f} "
            f"({row['speedup_fwd+bwd']:.2f}x)"
        )
    failed = [k for k, s in report["steps"].items() if not s["passed"]]
    print(
        f"wrote {out}; {report['seconds']:.0f} s; "
        + (f"FAILED: {failed}" if failed else "all passed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
