"""benchmarks/bench_lora.py runs end to end in its --smoke mode and its numbers hang together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_lora_benchmark_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, E2ED2_BENCH_RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_lora.py"), "--smoke"],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    smoke = tmp_path / "smoke"
    assert sorted(p.name for p in smoke.iterdir()) == ["lora.json", "lora.md", "lora.png"]
    result = json.loads((smoke / "lora.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    k = result["num_steps"]
    # K adapters on one base: K x the shared adapter's trained parameters, the base once.
    assert (
        rows["per_step_lora"]["trained_parameters"] == k * rows["shared_lora"]["trained_parameters"]
    )
    frozen = rows["shared_lora"]["parameters"] - rows["shared_lora"]["trained_parameters"]
    assert frozen == rows["shared_full"]["parameters"]
    assert rows["per_step_copies"]["parameters"] == k * rows["shared_full"]["parameters"]
    assert rows["per_step_lora"]["total_peak_bytes"] < rows["per_step_copies"]["total_peak_bytes"]
    full = {v: r["full_size_trained_parameters"] for v, r in rows.items()}
    assert full["per_step_lora"] == k * full["shared_lora"]
