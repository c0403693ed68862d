"""The run configuration: one typed section per component, loaded from TOML plus overrides.

A preset is a TOML file whose tables are the sections (``[model]``, ``[data]``, ``[sampler]``,
``[trajectory]``, ``[objective]``, ``[gan]``, ``[optim]``, ``[ema]``, ``[run]``); anything it does
not set keeps the dataclass default. The defaults alone are the ``scratch`` preset (the
from-scratch toy); the main job is the ``embedded`` preset (``configs/embedded.toml``). Command-line
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
from dataclasses import fields
from typing import Any

import tomllib

from .base import ConfigError, field_docs
from .presets import resolve_preset
from .train import TrainConfig

__all__ = ["config_to_toml", "load_config"]


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


#: Keys naming local weights or data: in a preset, a relative path that exists beside the preset
#: file means that file (so a preset can ship with its weights, like ``embedded`` and its base).
_PATH_KEYS = frozenset(
    {
        ("model", "pretrained_path"),
        ("model", "vae_path"),
        ("data", "shard_dir"),
        ("objective", "lpips_backbone_path"),
        ("objective", "reward_path"),
    }
)


def _beside_preset(preset: str, section: str, values: dict[str, Any]) -> dict[str, Any]:
    folder = os.path.dirname(os.path.abspath(preset))
    resolved = dict(values)
    for key, value in values.items():
        if (section, key) in _PATH_KEYS and isinstance(value, str) and not os.path.isabs(value):
            beside = os.path.join(folder, value)
            if os.path.exists(beside):
                resolved[key] = beside
    return resolved


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The resolved config: dataclass defaults <- TOML preset ``path`` <- ``overrides``.

    ``path``: a TOML file, or the name of a shipped preset (``pixart_alpha_512``; see
    :func:`~e2ed2.engine.config.presets.shipped_presets`).
    """
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = resolve_preset(path)
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
            raw.setdefault(section, {}).update(_beside_preset(path, section, values))
    for text in overrides:
        section, key, value = _parse_override(text)
        if section not in _SECTIONS:
            raise _unknown("section", section, list(_SECTIONS))
        raw.setdefault(section, {})[key] = value

    built = {
        # Every section field has a default_factory (its config class).
        f.name: _build_section(
            f.name, typing.cast(typing.Callable[[], Any], f.default_factory)(), raw.get(f.name, {})
        )
        for f in fields(TrainConfig)
    }
    try:
        return TrainConfig(**built)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_to_toml(config: TrainConfig, *, docs: bool = True) -> str:
    """The resolved config as a TOML preset (unset optional values as comments); ``docs``: each
    key preceded by its field documentation as ``#`` comments."""
    lines: list[str] = []
    for section in fields(config):
        lines.append(f"[{section.name}]")
        values = getattr(config, section.name)
        section_type: type = type(values)
        documented = field_docs(section_type) if docs else {}
        for item in fields(values):
            value = getattr(values, item.name)
            for doc_line in documented.get(item.name, "").splitlines():
                lines.append(f"# {doc_line}".rstrip())
            if value is None:
                lines.append(f"# {item.name} = (unset)")
            else:
                lines.append(f"{item.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
