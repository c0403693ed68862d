"""Every benchmark script runs end to end in its --smoke mode and writes its JSON + PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _smoke(script: str, tmp_path: Path, timeout: int) -> dict:
    env = dict(os.environ, E2ED2_BENCH_RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    written = sorted((tmp_path / "smoke").iterdir())
    assert [p.suffix for p in written] == [".json", ".png"], written
    return json.loads(written[0].read_text())


@pytest.mark.parametrize(
    "script",
    [
        "bench_checkpoint_policies.py",
        "bench_selective_checkpointing.py",
        "bench_memory_estimate.py",
        "bench_throughput.py",
        "bench_sana_estimate.py",
    ],
)
def test_benchmark_smoke(script: str, tmp_path: Path) -> None:
    result = _smoke(script, tmp_path, timeout=300)
    assert result["smoke"] is True


@pytest.mark.slow
def test_zero3_traffic_smoke(tmp_path: Path) -> None:
    """2 CPU ranks under the deepspeed launcher: gathering once per iteration moves fewer
    all-gather bytes than the shipped zero3 config and gives the same weights; the per-step
    backward reduce-scatters K times the gradient bytes and gives the same gradients."""
    result = _smoke("bench_zero3_traffic.py", tmp_path, timeout=900)
    rows = {(r["ds_config"], r["num_steps"]): r for r in result["rows"]}
    for k in (1, 2):
        assert rows["zero3_reuse", k]["all_gather_bytes"] <= rows["zero3", k]["all_gather_bytes"]
        assert rows["zero3_reuse", k]["all_gather_over_param_bytes"] <= 1.1
        per_step = rows["zero3_per_step", k]["reduce_scatter_bytes"]
        assert per_step == k * rows["zero3", k]["reduce_scatter_bytes"]
    weights = result["max_relative_weight_difference_after_3_iterations"]
    assert max(v for name, v in weights.items() if "per_step" not in name) <= 1e-6
    grads = result["max_gradient_difference_4th_iteration_over_largest_gradient"]
    assert max(grads.values()) <= 1e-5


def test_objective_cost_smoke(tmp_path: Path) -> None:
    """m = 1, 2, 4 side by side: more rows per step hold more live bytes, and every row carries
    the teacher's cost at both step counts."""
    result = _smoke("bench_objective_cost.py", tmp_path, timeout=300)
    rows = {r["m"]: r for r in result["rows"]}
    assert sorted(rows) == [1, 2, 4]
    assert rows[1]["peak_over_m1"] == 1.0
    assert rows[1]["peak_bytes"] < rows[2]["peak_bytes"] < rows[4]["peak_bytes"]
    assert [rows[m]["objective"] for m in (1, 2, 4)] == ["l2", "energy", "energy"]
    for row in rows.values():
        assert row["teacher2_seconds"] > 0 and row["teacher4_peak_bytes"] > 0


def test_peer_recipes_smoke(tmp_path: Path) -> None:
    """Every recipe at every K, the m rows, and the full-size part (on the toy): the offloading
    policy keeps host bytes and no other recipe does; its device peak is flat from K=2 to 4."""
    result = _smoke("bench_peer_recipes.py", tmp_path, timeout=300)
    rows = {(r["recipe"], r["num_steps"], r["samples_per_prompt"]): r for r in result["rows"]}
    recipes = {r for r, _, _ in rows}
    assert recipes == {"plain", "draft", "alignprop", "block", "block_offload", "selective"}
    for (name, _, _), row in rows.items():
        assert (row["host_peak_bytes"] > 0) == (name == "block_offload"), (name, row)
    # Flat: only the caller's injected noises (latent-sized) are added per step on the device.
    offload_2, offload_4 = rows["block_offload", 2, 1], rows["block_offload", 4, 1]
    assert offload_4["device_peak_bytes"] <= 1.05 * offload_2["device_peak_bytes"]
    assert offload_4["host_peak_bytes"] > 1.5 * offload_2["host_peak_bytes"]
    assert {m for r, k, m in rows if r == "block_offload" and k == 4} == {1, 2, 4}
    assert [r["recipe"] for r in result["full_size"]["rows"]] == ["plain", "block_offload"]


def test_step_backward_smoke(tmp_path: Path) -> None:
    """Both backwards at K = 1 and 4 (ZeRO-3 gradient handling) and the full-size part: at
    K = 1 there is nothing to cut (same device peak); at K = 4 the per-step backward holds less
    than one backward by about one full gradient of the model (the shared weights' sum)."""
    result = _smoke("bench_step_backward.py", tmp_path, timeout=300)
    rows = {(r["policy"], r["num_steps"], r["backward"]): r for r in result["rows"]}
    param_bytes = result["model"]["param_bytes"]
    for policy in ("step", "block_offload"):
        one = rows[policy, 1, "whole"]["device_peak_bytes"]
        assert rows[policy, 1, "per_step"]["device_peak_bytes"] == one
        saved = rows[policy, 4, "whole"]["device_peak_bytes"]
        saved -= rows[policy, 4, "per_step"]["device_peak_bytes"]
        assert 0.8 * param_bytes <= saved <= 1.2 * param_bytes, (policy, saved, param_bytes)
    full = {(r["policy"], r["backward"]): r for r in result["full_size"]["rows"]}
    for policy in ("step", "block_offload"):
        assert (
            full[policy, "per_step"]["device_peak_bytes"]
            < full[policy, "whole"]["device_peak_bytes"]
        )


def test_row_passes_smoke(tmp_path: Path) -> None:
    """m = 1 and 2, one batch and passes of B rows, and the full-size part (on the toy): passes
    hold fewer device bytes than one batch of the same rows."""
    result = _smoke("bench_row_passes.py", tmp_path, timeout=300)
    rows = {(r["policy"], r["samples_per_prompt"], r["rows_per_pass"]): r for r in result["rows"]}
    batch = result["model"]["batch"]
    for policy in ("step", "block_offload"):
        one_batch = rows[policy, 2, 2 * batch]["device_peak_bytes"]
        assert rows[policy, 2, batch]["device_peak_bytes"] < one_batch
    full = {
        (r["policy"], r["samples_per_prompt"], r["rows_per_pass"])
        for r in result["full_size"]["rows"]
    }
    assert ("block_offload", 2, 1) in full and ("block_offload", 2, 2) in full


def test_text_storage_smoke(tmp_path: Path) -> None:
    """Packed text costs less than padded for short captions, the same for full-length ones;
    SD3 (unmasked) is stored padded."""
    rows = _smoke("bench_text_storage.py", tmp_path, timeout=120)["rows"]
    pixart = {
        r["caption_tokens"]: r["ratio_stored_to_padded"] for r in rows if r["format"] == "pixart"
    }
    assert pixart[2] < 0.9 and 0.95 < pixart[12] <= 1.0  # a full caption: no padding to drop
    assert [r["ratio_stored_to_padded"] for r in rows if r["format"] == "sd3"] == [1.0]


def test_preset_fits_smoke(tmp_path: Path) -> None:
    """One preset (2-layer models) estimated at its header's world size, checked against it."""
    result = _smoke("bench_preset_fits.py", tmp_path, timeout=300)
    (cell,) = result["cells"]
    assert cell["preset"] == "pixart_sigma_1024" and cell["world_size"] == cell["stated"]["gpus"]
    assert cell["peak_device_bytes"] > 0 and cell["fits_stated"] is True
