"""What a run logs: ``metrics.jsonl`` (one JSON line per logged step) and the trackers of
``run.report_to`` (TensorBoard events, wandb; train/trackers.py), all written by rank 0 and
made consistent with the checkpoint a run resumes from."""

from __future__ import annotations

import json
import logging
import os
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .trackers import Tracker, build_trackers

__all__ = ["MetricsLog", "mean_across_ranks", "peak_memory_bytes"]

METRICS_FILE = "metrics.jsonl"

log = logging.getLogger("e2ed2.train")


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
        packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # CPU: the process's peak resident set (ru_maxrss is KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def truncate_metrics(path: Path, step: int) -> None:
    """Drops ``metrics.jsonl`` records past ``step`` (written by a run killed after it), and any
    line that is not a JSON record (a torn last line of a killed write), with a warning."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            log.warning("%s line %d is not a JSON record (a torn write); dropped", path, number)
            continue
        if record_step <= step:
            kept.append(line)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept))
    os.replace(temporary, path)


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` and the trackers ``run.report_to`` names (train/trackers.py:
    TensorBoard, wandb); on other ranks every call is a no-op."""

    def __init__(
        self,
        output_dir: Path,
        *,
        resume_step: int,
        enabled: bool,
        report_to: Sequence[str] = ("tensorboard",),
        wandb_project: str = "e2ed2",
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        # On every start, not only a resume: a run killed before its first checkpoint starts
        # again at step 0 and must not log steps 1, 1, 2, ...
        truncate_metrics(self.path, resume_step)
        self.trackers = build_trackers(
            report_to,
            output_dir,
            resume_step=resume_step,
            wandb_project=wandb_project,
            run_config=run_config,
        )

    def record(self, step: int, record: dict[str, Any], loss_terms: dict[str, float]) -> None:
        """One logged step: every value as a scalar (``loss/<term>`` or ``train/<name>``)."""
        if not self.enabled:
            return
        scalars = {
            (f"loss/{name}" if name in loss_terms else f"train/{name}"): value
            for name, value in record.items()
            if name != "step"
        }
        for tracker in self.trackers:
            tracker.log_scalars(scalars, step)
        self.flush()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def scalar(self, tag: str, value: float, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_scalars({tag: value}, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """One (C, H, W) image in [0, 1] (a sample grid)."""
        self.images(tag, [image], step)

    def images(
        self,
        tag: str,
        images: Sequence[torch.Tensor | np.ndarray],
        step: int,
        captions: Sequence[str] | None = None,
    ) -> None:
        """Images as (C, H, W) float tensors in [0, 1] or (H, W, 3) uint8 arrays, each with
        its caption, to every tracker."""
        if not self.trackers:
            return
        arrays = [_to_uint8_hwc(image) for image in images]
        for tracker in self.trackers:
            tracker.log_images(tag, arrays, step, captions=captions)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _to_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:  # grey (the digits): the trackers take RGB
        image = image.expand(3, -1, -1)
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
