"""e2ed2.engine: the differentiable K-step trajectory and the trainer built around it."""

from .memory import LiveTensorTracker, MemoryReport, track_memory
from .network import Conditioning, denoise, per_step_networks
from .sampler import SamplerConfig, SamplerSchedule, build_schedule
from .trajectory import (
    CHECKPOINT_POLICIES,
    Trajectory,
    TrajectoryConfig,
    TrajectoryPlan,
    run_steps,
)

__all__ = [
    "CHECKPOINT_POLICIES",
    "Conditioning",
    "LiveTensorTracker",
    "MemoryReport",
    "SamplerConfig",
    "SamplerSchedule",
    "Trajectory",
    "TrajectoryConfig",
    "TrajectoryPlan",
    "build_schedule",
    "denoise",
    "per_step_networks",
    "run_steps",
    "track_memory",
]
