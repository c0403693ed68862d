"""The run configuration: one typed section per component, a TOML loader, shipped presets.

Importing this package imports neither torch nor diffusers: ``--dry-run`` and every config error
come back in well under a second.
"""

from .base import ConfigError, field_docs
from .data import DataConfig
from .ema import EmaConfig
from .gan import GanConfig
from .loader import config_to_toml, load_config
from .model import ModelConfig
from .objective import ObjectiveConfig
from .optim import OptimConfig
from .presets import resolve_preset, shipped_ds_configs, shipped_presets
from .run import RunConfig
from .sampler import SamplerConfig
from .train import TrainConfig
from .trajectory import CHECKPOINT_POLICIES, TrajectoryConfig

__all__ = [
    "CHECKPOINT_POLICIES",
    "ConfigError",
    "DataConfig",
    "EmaConfig",
    "GanConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RunConfig",
    "SamplerConfig",
    "TrainConfig",
    "TrajectoryConfig",
    "config_to_toml",
    "field_docs",
    "load_config",
    "resolve_preset",
    "shipped_ds_configs",
    "shipped_presets",
]
