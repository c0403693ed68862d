"""e2ed2.engine: the differentiable K-step trajectory and the trainer built around it.

Wings (imports point down the list; none imports a CLI):

``config``      typed sections, the TOML loader, shipped presets (no torch import)
``core``        sampler, trajectory + checkpoint policies, network seam, models, memory tracker
``data``        digits, the latent-shard format, text encoding, resumable batching, precompute
``objectives``  losses on the final sample, GAN, the diffusion loss
``train``       the trainer, DeepSpeed glue, checkpoints, EMA, export
``eval``        digits FD / accuracy, FID / CLIP for real data
``cli``         ``e2ed2 train | precompute | sample | evaluate`` (thin)
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562), so that ``import e2ed2.engine.config`` stays free of torch.
_EXPORTS = {
    "CHECKPOINT_POLICIES": "core.trajectory",
    "Conditioning": "core.network",
    "LiveTensorTracker": "core.memory",
    "MemoryReport": "core.memory",
    "SamplerConfig": "core.sampler",
    "SamplerSchedule": "core.sampler",
    "Trajectory": "core.trajectory",
    "TrajectoryConfig": "core.trajectory",
    "TrajectoryPlan": "core.trajectory",
    "build_schedule": "core.sampler",
    "denoise": "core.network",
    "per_step_networks": "core.network",
    "run_steps": "core.trajectory",
    "track_memory": "core.memory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
