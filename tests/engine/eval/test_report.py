"""The main job's report: the side-by-side picture and the FD line."""

from __future__ import annotations

import torch

from e2ed2.engine.eval.report import format_report, side_by_side


def test_side_by_side_upscales_small_images_with_nearest_neighbour() -> None:
    images = torch.full((3, 1, 16, 16), -1.0)
    images[:, :, :8] = 1.0  # top half white, bottom half black
    canvas = side_by_side([("base K=1", images), ("finetuned K=1", images)], cell_px=64)
    width, height = canvas.size
    assert height >= 2 * 64 and width >= 3 * 64
    # Nearest-neighbour keeps pure black and white: no grey from interpolation inside a tile.
    tile = canvas.crop((150, 4, 150 + 64, 4 + 64))
    assert set(tile.convert("L").getdata()) == {0, 255}


def test_format_report_gives_both_fds_and_the_change_per_k() -> None:
    report = {
        "seeds": [0, 1, 2],
        "num_steps": {
            "1": {
                "base": {"fd_mean": 200.0, "fd_std": 1.0},
                "finetuned": {"fd_mean": 50.0, "fd_std": 2.0},
            },
            "4": {"base": {"skipped": "x"}, "finetuned": {"fd_mean": 1.0, "fd_std": 0.0}},
        },
    }
    line = format_report(report)
    assert "K=1 200.0 ± 1.0 -> 50.0 ± 2.0 (-75%)" in line
    assert "K=4" not in line and "over 3 seeds" in line


def test_format_report_adds_the_teachers_fd() -> None:
    report = {
        "seeds": [0, 1],
        "num_steps": {
            "1": {
                "base": {"fd_mean": 200.0, "fd_std": 1.0},
                "finetuned": {"fd_mean": 50.0, "fd_std": 2.0},
            }
        },
        "teacher": {
            "sampler": "ddim",
            "num_steps": 16,
            "seeds": [0, 1],
            "fd_mean": 34.5,
            "fd_std": 0.7,
        },
    }
    assert format_report(report).endswith("; teacher (base, 16-step DDIM) 34.5 ± 0.7")
    report["teacher"].update(seeds=[0], fd_std=0.0)
    assert format_report(report).endswith("; teacher (base, 16-step DDIM, seed 0) 34.5")
    report["teacher"]["sampler"] = "dpm_solver"
    assert format_report(report).endswith("; teacher (base, 16-step DPM-Solver++, seed 0) 34.5")
    del report["teacher"]
    assert "teacher" not in format_report(report)
