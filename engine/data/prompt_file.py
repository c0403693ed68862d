"""Prompt lists as users keep them: a ``.txt`` file (one prompt a line, as kohya's
``--sample_prompts``) or a ``.jsonl`` file (one JSON object a line with a ``prompt``, ``text`` or
``caption`` field, or a bare JSON string). Read by ``run.validation_prompts`` and by
``e2ed2 encode-prompts`` (prompt-only data)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["PROMPT_FIELDS", "read_prompts", "resolve_prompts"]

#: The fields of a JSONL record that hold its prompt, first match wins (``text``: the field of
#: diffusers' imagefolder metadata; ``caption``: e2ed2's captions.jsonl).
PROMPT_FIELDS = ("prompt", "text", "caption")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a ``.txt`` or ``.jsonl`` file, in file order; blank lines are skipped.
    Raises ValueError / FileNotFoundError naming the file (and line) on bad input."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text ({error})") from error
    prompts: list[str] = []
    jsonl = path.endswith(".jsonl")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path} line {number} is not JSON: {error}") from None
        if isinstance(record, dict):
            record = next((record[k] for k in PROMPT_FIELDS if k in record), None)
        if not isinstance(record, str) or not record.strip():
            raise ValueError(
                f"{path} line {number}: expected a string or an object with a non-empty "
                f"{' / '.join(repr(k) for k in PROMPT_FIELDS)} field"
            )
        prompts.append(record.strip())
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompt")
    return prompts


def resolve_prompts(prompts: Sequence[str] | str, key: str) -> list[str]:
    """A config's prompt list, or the prompts of the file it names; errors name ``key``."""
    if isinstance(prompts, str):
        try:
            return read_prompts(prompts)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{key}: {error}") from None
    return list(prompts)
