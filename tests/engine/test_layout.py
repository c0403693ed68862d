"""The package layout docs/design.md describes: wings whose imports point down, CLIs apart from
libraries, kernels independent of the engine, config free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"
# Each wing may import only wings of a lower rank (and itself).
RANKS = {"config": 0, "core": 1, "data": 2, "objectives": 2, "train": 3, "eval": 4, "cli": 5}


def _engine_imports(path: Path, package: list[str]) -> set[str]:
    """The engine wings ``path`` imports (relative or absolute ``e2ed2.engine.<wing>``)."""
    wings = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("e2ed2.engine"):
                target = node.module.split(".")[2:]
            else:
                continue
            if target:
                wings.add(target[0])
            else:  # ``from .. import x``: the names are the wings
                wings.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("e2ed2.engine."):
                    wings.add(alias.name.split(".")[2])
    return wings


def test_every_module_sits_in_a_wing() -> None:
    loose = [p.name for p in ENGINE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside a wing: {loose}"
    assert {p.name for p in ENGINE.iterdir() if (p / "__init__.py").is_file()} == set(RANKS)


@pytest.mark.parametrize("wing", sorted(RANKS))
def test_imports_point_down(wing: str) -> None:
    for path in sorted((ENGINE / wing).rglob("*.py")):
        package = [wing, *path.relative_to(ENGINE / wing).parent.parts]
        for imported in _engine_imports(path, package):
            assert imported in RANKS, f"{path.relative_to(ROOT)} imports unknown {imported!r}"
            assert RANKS[imported] < RANKS[wing] or imported == wing, (
                f"{path.relative_to(ROOT)} ({wing}) imports {imported}: imports must point down"
            )


def test_kernels_import_nothing_of_the_engine() -> None:
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        text = path.read_text()
        assert "e2ed2.engine" not in text and "from ..engine" not in text, path


def test_no_module_is_oversized_without_a_reason() -> None:
    """~400 lines per module; a longer one states why in a "Size:" line of its docstring."""
    for path in sorted(ENGINE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            assert "Size:" in docstring, f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines"


def test_config_loads_without_torch() -> None:
    code = (
        "import sys; import e2ed2.engine.config as c; c.load_config(None);"
        "bad = [m for m in ('torch', 'diffusers', 'deepspeed') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_running_a_command_as_a_module_from_the_checkout_does_not_shadow_pypi_kernels() -> None:
    """``python -m e2ed2.engine.cli.train`` (``deepspeed --module``) from the checkout's root puts
    the root first on sys.path, where the top-level ``kernels/`` folder would shadow the PyPI
    ``kernels`` package transformers imports (every diffusers model import then fails). The
    commands' package takes the root off sys.path; a bare ``import kernels`` must then find the
    PyPI package or nothing, never this folder."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import e2ed2.engine.cli; "
        "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    origin = done.stdout.strip()
    assert not origin.startswith(str(ROOT / "kernels")), origin


def _module_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The project modules ``path`` (module ``name``) imports anywhere in its code, function-local
    imports included; imports only a type checker runs (``if TYPE_CHECKING:``) are left out."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = package[: len(package) - node.level + 1]
                target += node.module.split(".") if node.module else []
            elif node.module and node.module.startswith("e2ed2."):
                target = node.module.split(".")[1:]
            else:
                continue
            candidates = [".".join(target)] + [".".join([*target, a.name]) for a in node.names]
            found.update(c for c in candidates if c in modules and c != name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("e2ed2."):
                    candidate = alias.name.split(".", 1)[1]
                    if candidate in modules and candidate != name:
                        found.add(candidate)
    return found


def _import_cycles() -> list[list[str]]:
    paths = {}
    for path in [*ENGINE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _module_imports(path, name, set(paths)) for name, path in paths.items()}
    # A module is on a cycle when it reaches itself; the cycle is its strongly connected set.
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, stack = set(), list(graph[start])
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(graph[current])
        reach[start] = seen
    cycles = {
        tuple(sorted(other for other in reach[name] if name in reach[other]))
        for name in graph
        if name in reach[name]
    }
    return [list(cycle) for cycle in sorted(cycles)]


def test_no_import_cycles() -> None:
    """Function-local imports hide cycles from Python's import system, not from this check."""
    assert _import_cycles() == []


def _unreasoned_local_imports(path: Path) -> list[int]:
    """Lines of the imports inside functions of ``path`` with no ``# lazy: <reason>`` comment on
    their line or in the comment lines right above (a run of imports under one such comment
    shares it)."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    local = sorted(
        inner.lineno
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(function)
        if isinstance(inner, ast.Import | ast.ImportFrom)
    )
    ends = {
        node.lineno: node.end_lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    reasoned: set[int] = set()
    for line in local:
        above, row = lines[line - 2] if line >= 2 else "", line - 2
        while row >= 1 and lines[row].lstrip().startswith("#"):
            row -= 1
            above += lines[row] if lines[row].lstrip().startswith("#") else ""
        previous = next((n for n, end in ends.items() if end == line - 1), None)
        if (
            "# lazy:" in lines[line - 1]
            or "# lazy:" in above
            or (previous is not None and previous in reasoned)
        ):
            reasoned.add(line)
    return [line for line in local if line not in reasoned]


def test_function_local_imports_state_why() -> None:
    """An import inside a function hides a dependency (and a cycle) from the module's top: each
    says why it cannot be there (heavy, optional, absent on some installs) in a ``# lazy:``
    comment."""
    bare = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted([*ENGINE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])
        for line in _unreasoned_local_imports(path)
    ]
    assert bare == [], f"function-local imports without a '# lazy: <reason>' comment: {bare}"


def test_the_local_import_check_sees_a_bare_and_a_reasoned_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n"
        "    import json\n"
        "    # lazy: heavy\n"
        "    import torch\n"
        "    from torch import nn\n"
        "\n"
        "    import os  # lazy: optional\n"
        "    # a comment that gives no reason\n"
        "    import sys\n"
        "    # lazy: a reason that wraps\n"
        "    # onto a second line\n"
        "    import math\n"
    )
    assert _unreasoned_local_imports(module) == [2, 9]
