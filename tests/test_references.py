"""Every name the repository's prose points at exists.

Docstrings, comments, presets and READMEs name modules (``e2ed2.engine.core.step_cuts.CutUnroll``),
commands (``deepspeed --module e2ed2.engine.cli.train``) and files (``benchmarks/bench_lora.py``).
Renames leave such names dangling, and a user who copies a preset's launch line gets "No module
named ...". This resolves each of them: dotted names by import and attribute lookup, ``-m`` /
``--module`` targets as runnable modules (a module file, or a package with ``__main__``), and
paths under a top-level folder or an engine wing against the repository (from the root, from
``engine/``, or from the naming file's folder).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = {"engine", "kernels", "configs", "ds_configs", "benchmarks", "experiments", "tests"}
TOP_FOLDERS |= {"docs"}
ENGINE_WINGS = {"config", "core", "data", "objectives", "train", "eval", "cli"}
# Files written by runs, not shipped: their paths are named as outputs, never resolved.
GENERATED = ("results", "runs")

_DOTTED = re.compile(r"\be2ed2\.(?:engine|kernels|configs|ds_configs)(?:\.[A-Za-z_]\w*)*")
_RUN_MODULE = re.compile(r"(?:\s-m|--module)\s+(e2ed2(?:\.\w+)+)")
_PATH = re.compile(r"(?<![\w./-])((?:[A-Za-z_][\w-]*/)+[\w-]+\.(?:py|toml|json|md|txt|sh))\b")


def _prose_files() -> list[Path]:
    found = []
    for suffix in ("*.py", "*.md", "*.toml"):
        for path in ROOT.rglob(suffix):
            parts = path.relative_to(ROOT).parts
            if parts[0].startswith(".") or any(p in GENERATED for p in parts):
                continue
            if parts[0] not in TOP_FOLDERS and len(parts) > 1:
                continue  # virtual environments, build folders
            found.append(path)
    this_file = Path(__file__).resolve()  # its own checker test names dangling names on purpose
    return sorted(p for p in found if p != this_file)


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 1, -1):
        module_name = ".".join(parts[:split])
        try:
            found = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            found = None
        if found is None:
            continue
        obj = importlib.import_module(module_name)
        for attribute in parts[split:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def _runnable(module_name: str) -> bool:
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        return False
    if spec.submodule_search_locations is None:  # a plain module file
        return True
    return importlib.util.find_spec(f"{module_name}.__main__") is not None


def _dangling(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    bad = [name for name in {m.group(0).rstrip(".") for m in _DOTTED.finditer(text)}]
    bad = [name for name in bad if not _resolves(name)]
    bad += [f"-m {m}" for m in {m.group(1) for m in _RUN_MODULE.finditer(text)} if not _runnable(m)]
    for named in {m.group(1) for m in _PATH.finditer(text)}:
        if named.split("/")[0] not in TOP_FOLDERS | ENGINE_WINGS:
            continue
        if not any((base / named).exists() for base in (ROOT, ROOT / "engine", path.parent)):
            bad.append(named)
    return sorted(bad)


def test_the_checker_finds_dangling_names(tmp_path: Path) -> None:
    prose = tmp_path / "note.md"
    prose.write_text(
        "see e2ed2.engine.core.step_cuts.CutUnroll and e2ed2.engine.core.no_such_module, "
        "run `deepspeed --module e2ed2.engine.train` or `python -m e2ed2.engine.cli.train`, "
        "read engine/core/step_cuts.py and benchmarks/no_such_bench.py\n"
    )
    assert _dangling(prose) == [
        "-m e2ed2.engine.train",
        "benchmarks/no_such_bench.py",
        "e2ed2.engine.core.no_such_module",
    ]


@pytest.mark.parametrize("path", _prose_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_modules_commands_and_files_exist(path: Path) -> None:
    assert _dangling(path) == [], f"{path.relative_to(ROOT)} names what does not exist"
