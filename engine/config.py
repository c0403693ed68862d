"""The run configuration: one typed section per component, loaded from TOML plus overrides.

A preset is a TOML file whose tables are the sections (``[model]``, ``[data]``, ``[sampler]``,
``[trajectory]``, ``[objective]``, ``[gan]``, ``[optim]``, ``[ema]``, ``[run]``); anything it does
not set keeps the dataclass default, and the defaults *are* the embedded default run. Command-line
overrides are ``section.key=value`` with TOML value syntax (``run.max_steps=50``,
``sampler.kind="ddim"`` or ``sampler.kind=ddim``, ``model.vae_path=none``). Unknown sections or keys,
wrong types and impossible combinations fail here, before any model is built, with a message that
names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import tomllib

from .data import DataConfig
from .distributed import OptimConfig
from .ema import EmaConfig
from .gan import GanConfig
from .models import ModelConfig
from .objectives import ObjectiveConfig
from .run import RunConfig
from .sampler import SamplerConfig
from .trajectory import TrajectoryConfig

__all__ = ["TrainConfig", "load_config", "config_to_toml", "ConfigError", "check_launch"]


class ConfigError(ValueError):
    """A bad preset or override; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The embedded default trains from scratch in pixel space; v-prediction keeps the x0 estimate
    # bounded at t = 999, where epsilon-prediction divides by sqrt(alphas_cumprod) ~ 0.006.
    # Presets for pretrained PixArt set prediction_type = "epsilon" (its training target).
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(prediction_type="v_prediction")
    )
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        traj, sampler = self.trajectory, self.sampler
        if sampler.kind == "lcm" and traj.num_steps > sampler.original_inference_steps:
            raise ConfigError(
                f"trajectory.num_steps={traj.num_steps} exceeds "
                f"sampler.original_inference_steps={sampler.original_inference_steps} (LCM)"
            )
        if self.objective.kind == "diffusion":
            if not self.model.share_across_steps:
                raise ConfigError(
                    "model.share_across_steps=false needs objective.kind='e2ed2' (the diffusion "
                    "objective trains one network)"
                )
            if self.gan.enabled:
                raise ConfigError("gan.enabled=true needs objective.kind='e2ed2'")
        if self.data.source == "digits" and self.model.vae_path is not None:
            raise ConfigError(
                "model.vae_path is set but data.source='digits' is pixel space; unset it "
                "(model.vae_path=none)"
            )
        needs_pixels = self.objective.needs_pixels or self.gan.enabled
        if self.data.source == "shards" and needs_pixels and self.model.vae_path is None:
            raise ConfigError(
                "LPIPS / GAN on latent shards need a decoder: set model.vae_path to a local "
                "AutoencoderKL folder"
            )


_SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))


def _allowed(options: Sequence[str]) -> str:
    return ", ".join(sorted(options))


def _unknown(kind: str, name: str, options: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(options), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint}; allowed: {_allowed(options)}")


class _NoneWord(str):
    """``none`` / ``null`` typed on the command line: None for an optional key, else the word
    (``trajectory.checkpoint=none`` is the policy named "none", not a missing value)."""


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """``value`` if it fits ``annotation`` (int->float widened), else a ConfigError naming key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if (value is None or isinstance(value, _NoneWord)) and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if isinstance(value, _NoneWord):
        value = str(value)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, bool) != (annotation is bool) or not isinstance(value, annotation):
            raise ConfigError(
                f"{key}={value!r} has type {type(value).__name__}, expected {annotation.__name__}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list")
        return tuple(value) if origin is tuple else list(value)
    return value


def _build_section(name: str, default: Any, values: Mapping[str, Any]) -> Any:
    """``default`` (the TrainConfig default of the section) with ``values`` replaced."""
    cls = type(default)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown("key", f"{name}.{key}", [f"{name}.{k}" for k in known])
        kwargs[key] = _check_type(f"{name}.{key}", value, hints[key])
    try:
        return dataclasses.replace(default, **kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        if f"{name}." not in message:
            message = f"[{name}] {message}"
        raise ConfigError(message) from err


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not section.key=value")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. run.max_steps")
    section, key = dotted.strip().split(".")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return section, key, _NoneWord(raw)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return section, key, value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The resolved config: dataclass defaults <- TOML preset ``path`` <- ``overrides``."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                loaded = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path!r} is not valid TOML: {err}") from None
        for section, values in loaded.items():
            if section not in _SECTIONS:
                raise _unknown(f"section in {path}:", section, list(_SECTIONS))
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: {section!r} must be a table [{section}]")
            raw.setdefault(section, {}).update(values)
    for text in overrides:
        section, key, value = _parse_override(text)
        if section not in _SECTIONS:
            raise _unknown("section", section, list(_SECTIONS))
        raw.setdefault(section, {})[key] = value

    built = {
        f.name: _build_section(f.name, f.default_factory(), raw.get(f.name, {}))
        for f in fields(TrainConfig)
    }
    try:
        return TrainConfig(**built)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_launch(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """What a config can only be checked against at launch: the DeepSpeed JSON for this world
    size and the local files it names. Returns the DeepSpeed config; raises ConfigError.

    Not part of :class:`TrainConfig` itself because a config is also read where those files are
    absent (an export's ``e2ed2_config.toml`` on another machine, ``--dry-run`` of a preset).
    Runs before any model is built (``Trainer`` calls it first, ``e2ed2 train`` before that).
    """
    from .data import read_index
    from .distributed import build_ds_config
    from .models import resolve_model_folder

    run = config.run
    try:
        ds_config = build_ds_config(
            run.deepspeed_config,
            batch_per_rank=run.batch_per_rank,
            grad_accum_steps=run.grad_accum_steps,
            world_size=world_size,
            optim=config.optim,
            precision=run.precision,
        )
        _keep_linear_for_selective(config, ds_config)
        if config.model.pretrained_path is not None:
            resolve_model_folder(
                config.model.pretrained_path, "transformer", "model.pretrained_path"
            )
        if config.model.vae_path is not None:
            resolve_model_folder(config.model.vae_path, "vae", "model.vae_path")
        lpips_path = config.objective.lpips_backbone_path
        if config.objective.lpips_weight > 0 and lpips_path is not None:
            from .objectives import _TORCHVISION_MODELS

            if not os.path.isfile(lpips_path):
                raise FileNotFoundError(
                    f"objective.lpips_backbone_path={lpips_path!r} does not exist; expected a "
                    f"torchvision {_TORCHVISION_MODELS[config.objective.lpips_net]} state dict "
                    "(.pth)"
                )
        if config.data.source == "shards":
            read_index(config.data.shard_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err).replace("\n", " ")) from None
    return ds_config


def _keep_linear_for_selective(config: TrainConfig, ds_config: dict[str, Any]) -> None:
    """ZeRO-3 with ``trajectory.checkpoint='selective'``: DeepSpeed's memory_efficient_linear off.

    With it on (DeepSpeed's default), ZeRO-3 replaces ``torch.nn.functional.linear`` by a version
    whose in-place bias add corrupts the matmul outputs a selective checkpoint keeps (see
    ``trajectory._linear_mutates_its_matmul_output``). Off, ZeRO-3 keeps torch's linear, which
    saves the same input and weight for backward, so little is lost.
    """
    zero = ds_config.get("zero_optimization", {})
    if config.trajectory.checkpoint != "selective" or zero.get("stage", 0) != 3:
        return
    if zero.get("memory_efficient_linear") is True:
        raise ValueError(
            f"run.deepspeed_config={config.run.deepspeed_config!r} sets "
            "zero_optimization.memory_efficient_linear=true, which gives wrong gradients with "
            "trajectory.checkpoint='selective'; remove the key or set it to false"
        )
    ds_config["zero_optimization"] = {**zero, "memory_efficient_linear": False}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_to_toml(config: TrainConfig) -> str:
    """The resolved config as a TOML preset (unset optional values as comments)."""
    lines: list[str] = []
    for section in fields(config):
        lines.append(f"[{section.name}]")
        for item in fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), item.name)
            if value is None:
                lines.append(f"# {item.name} = (unset)")
            else:
                lines.append(f"{item.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def config_to_dict(config: TrainConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)
