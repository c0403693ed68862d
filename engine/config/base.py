"""What every config section shares: the error type, checks derived from the field types, and
the field documentation (attribute docstrings) that ``--dry-run`` and ``config.toml`` print.

No torch, no diffusers: a config is read and checked in the first second of a launch.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
import types
import typing
from dataclasses import fields
from typing import Any

__all__ = [
    "ConfigError",
    "check_fields",
    "check_int",
    "field_docs",
    "literal_choices",
]


class ConfigError(ValueError):
    """A bad preset, override or local path; the message names the key."""


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation (also inside ``X | None``), else None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            choices = literal_choices(option)
            if choices is not None:
                return choices
    return None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(section: str, config: Any) -> None:
    """Checks every field whose type says what is allowed: a ``Literal`` value is one of its
    choices, a float is finite (``lr <= 0`` is False for NaN, so range checks alone let NaN in).
    Raises ValueError naming ``section.key``."""
    config_type: type = type(config)
    hints = _type_hints(config_type)
    for item in fields(config):
        value = getattr(config, item.name)
        choices = literal_choices(hints[item.name])
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{section}.{item.name}={value!r} is not one of {list(choices)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{section}.{item.name} must be a finite number, got {value}")


def check_int(key: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal right after each field of a dataclass."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    # getsource of a class: its (decorated) class statement is the module's first statement.
    body = typing.cast(ast.ClassDef, ast.parse(source).body[0]).body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs
