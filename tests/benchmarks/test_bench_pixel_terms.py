"""bench_pixel_terms.py --smoke: a small VAE at 512² under fake tensors and the real CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_pixel_terms_smoke(tmp_path: Path) -> None:
    """In passes of one row batch 2 holds what batch 1 holds (within 1.2x) and less than one
    pass of 2 rows (fake tensors); the real CPU run's batch 8 within 1.2x of batch 1."""
    env = dict(os.environ, E2ED2_BENCH_RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_pixel_terms.py"), "--smoke"],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((tmp_path / "smoke" / "pixel_terms.json").read_text())
    assert (tmp_path / "smoke" / "pixel_terms.png").is_file()
    peak = {(r["recipe"], r["batch"]): r["peak_bytes"] for r in result["rows"]}
    assert peak["passes of 1 row", 2] <= 1.2 * peak["passes of 1 row", 1]
    assert peak["passes of 1 row", 2] < peak["per-block checkpoint", 2]
    assert result["real_cpu_run"]["batch8_over_batch1"] <= 1.2
