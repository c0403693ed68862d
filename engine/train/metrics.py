"""What a run logs: ``metrics.jsonl`` (one JSON line per logged step) and TensorBoard events,
both written by rank 0 and made consistent with the checkpoint a run resumes from."""

from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
    """Rank 0's ``metrics.jsonl`` and TensorBoard writer; on other ranks every call is a no-op."""

    def __init__(self, output_dir: Path, *, resume_step: int, enabled: bool) -> None:
        self.path = output_dir / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        # On every start, not only a resume: a run killed before its first checkpoint starts
        # again at step 0 and must not log steps 1, 1, 2, ...
        truncate_metrics(self.path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run logged after its last checkpoint (steps > step) are
        # dropped, so the resumed curve has no duplicated or diverging tail.
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)

    def record(self, step: int, record: dict[str, Any], loss_terms: dict[str, float]) -> None:
        """One logged step: every value as a scalar (``loss/<term>`` or ``train/<name>``)."""
        if self.writer is None:
            return
        for name, value in record.items():
            if name == "step":
                continue
            tag = f"loss/{name}" if name in loss_terms else f"train/{name}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
