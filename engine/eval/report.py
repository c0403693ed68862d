"""The main job's report: the fine-tuned export against its pretrained base, side by side.

After ``e2ed2 train`` fine-tunes a digits base (the embedded preset), both models sample the same
prompts from the same seeds at K = 1, 2, 4; the digit classifier's Fréchet distance to the
held-out digits (:mod:`.digits`, a metric that is not any training signal) scores both, and a PNG
shows one digit per prompt per row, upscaled with nearest-neighbour so a person can read it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..config import TrainConfig
from ..core.models import resolve_model_folder
from ..core.sampler import build_schedule
from ..core.sampling import generate_pixels
from ..data.digits import DIGIT_WORDS
from ..objectives.teacher import dpm_solver_sample, teacher_sampler_config
from .common import load_export
from .digits import DigitEvaluator, digit_prompts, score_networks

__all__ = ["compare_with_base", "format_report", "side_by_side"]

GRID_NAME = "compare_base_vs_finetuned.png"
REPORT_NAME = "compare_base_vs_finetuned.json"


def side_by_side(rows: Sequence[tuple[str, torch.Tensor]], *, cell_px: int = 64) -> Any:
    """A PIL image: one labelled row per ``(label, images (N, C, H, W) in [-1, 1])``, each image
    upscaled by an integer factor (nearest-neighbour: pixels stay sharp) to >= ``cell_px``."""
    label_px, pad = 150, 4
    height, width = rows[0][1].shape[-2:]
    scale = max(1, -(-cell_px // min(height, width)))
    cell_h, cell_w = height * scale, width * scale
    count = max(len(images) for _, images in rows)
    canvas = Image.new(
        "RGB",
        (label_px + count * (cell_w + pad), len(rows) * (cell_h + pad) + pad),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = pad + r * (cell_h + pad)
        draw.text((6, top + cell_h // 2 - 6), label, fill="black")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        for c, image in enumerate(pixels):
            tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
                (cell_w, cell_h), Image.Resampling.NEAREST
            )
            canvas.paste(tile, (label_px + c * (cell_w + pad), top))
    return canvas


def _base_networks(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    # lazy: diffusers adds ~3 s over torch; only the comparison with the base model needs it
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

    pretrained_path = config.model.pretrained_path
    assert pretrained_path is not None  # compare_with_base refuses a config without one
    folder = resolve_model_folder(pretrained_path, "transformer", "model.pretrained_path")
    return PixArtTransformer2DModel.from_pretrained(folder, use_safetensors=True).to(device).eval()


def compare_with_base(
    config: TrainConfig,
    export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_steps: Sequence[int] = (1, 2, 4),
    seeds: Sequence[int] = (0, 1, 2),
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    teacher_seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Scores the export and ``config.model.pretrained_path`` at each K on the same seeds, writes
    the side-by-side PNG and a JSON report into ``out_dir``, returns the report.

    With a teacher term, the teacher alone (the base with the teacher's sampler and steps) is
    scored too, on ``teacher_seeds`` (default: the first of ``seeds``): its 16 steps cost more
    than K = 1, 2 and 4 together, and the main job's report stays within its time budget."""
    if config.data.source != "digits" or config.model.pretrained_path is None:
        raise ValueError(
            "the base comparison needs data.source='digits' and model.pretrained_path (a base)"
        )
    device = torch.device(device)
    out_dir = Path(out_dir)
    evaluator = DigitEvaluator(config.data, cache_dir=cache_dir)
    tuned_config, tuned, decode = load_export(export_dir, device)
    base = _base_networks(config, device)
    models = {"base": (base, config), "finetuned": (tuned, tuned_config)}
    scores = {
        name: score_networks(
            networks,
            model_config,
            decode,
            evaluator,
            num_steps=num_steps,
            seeds=seeds,
            device=device,
        )
        for name, (networks, model_config) in models.items()
    }
    # The teacher alone (the frozen base with the teacher's many-step sampler, from pure noise):
    # where the student stands against the model whose samples it was pulled towards.
    teacher = None
    objective = config.objective
    if objective.kind == "e2ed2" and objective.teacher_weight > 0:
        sampler = teacher_sampler_config(objective, config.sampler)
        teacher_config = dataclasses.replace(config, sampler=sampler)
        k = objective.teacher_steps
        teacher_seeds = list(seeds[:1] if teacher_seeds is None else teacher_seeds)
        solver = None
        if objective.teacher_sampler == "dpm_solver":
            # The DDIM schedule of k steps draws the same start noise; the solver replaces it.
            solver = functools.partial(dpm_solver_sample, base, sampler, k)
        teacher = {
            "sampler": objective.teacher_sampler,
            "num_steps": k,
            "seeds": teacher_seeds,
            **score_networks(
                base,
                teacher_config,
                decode,
                evaluator,
                num_steps=(k,),
                seeds=teacher_seeds,
                device=device,
                solver=solver,
            )[str(k)],
        }
    # The grid: digits 0..9 once per row, sampling seed = the first scoring seed.
    cond, _ = digit_prompts(evaluator.train_set, 1)
    rows = []
    for k in num_steps:
        schedule = build_schedule(config.sampler, k)
        for name, (networks, _) in models.items():
            pixels = generate_pixels(
                networks,
                schedule,
                decode,
                cond,
                evaluator.train_set.latent_shape,
                seed=seeds[0],
                device=device,
            )
            fd = scores[name][str(k)].get("fd_mean")
            label = f"{name} K={k}" + ("" if fd is None else f"\nFD {fd:.1f}")
            rows.append((label, pixels))
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / GRID_NAME
    side_by_side(rows).save(grid)
    report = {
        "metric": "digit-classifier Fréchet distance to the held-out digits (lower is better)",
        "prompts": [f"digit {w}" for w in DIGIT_WORDS],
        "per_class": evaluator.per_class,
        "seeds": list(seeds),
        "base": str(config.model.pretrained_path),
        "finetuned": str(export_dir),
        "grid": str(grid),
        "num_steps": {str(k): {name: scores[name][str(k)] for name in models} for k in num_steps},
    }
    if teacher is not None:
        report["teacher"] = teacher
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


#: How the report line names a teacher's sampler (others: upper case, e.g. DDIM).
_SAMPLER_NAMES = {"dpm_solver": "DPM-Solver++", "flow_euler": "flow Euler"}


def format_report(report: dict[str, Any]) -> str:
    """One line: FD of base and fine-tuned per K (mean ± std over the seeds) and the change."""
    parts = []
    for k, by_model in report["num_steps"].items():
        base, tuned = by_model["base"], by_model["finetuned"]
        if "fd_mean" not in base or "fd_mean" not in tuned:
            continue
        change = 100.0 * (tuned["fd_mean"] - base["fd_mean"]) / base["fd_mean"]
        parts.append(
            f"K={k} {base['fd_mean']:.1f} ± {base['fd_std']:.1f} -> "
            f"{tuned['fd_mean']:.1f} ± {tuned['fd_std']:.1f} ({change:+.0f}%)"
        )
    teacher = report.get("teacher")
    if teacher is not None and "fd_mean" in teacher:
        solver = _SAMPLER_NAMES.get(teacher["sampler"], teacher["sampler"].upper())
        what = f"teacher (base, {teacher['num_steps']}-step {solver}"
        if len(teacher["seeds"]) == 1:
            parts.append(f"{what}, seed {teacher['seeds'][0]}) {teacher['fd_mean']:.1f}")
        else:
            parts.append(f"{what}) {teacher['fd_mean']:.1f} ± {teacher['fd_std']:.1f}")
    seeds = len(report["seeds"])
    return f"FD base -> fine-tuned (digit classifier, mean ± std over {seeds} seeds): " + (
        "; ".join(parts)
    )
