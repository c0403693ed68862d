"""The installed torch / deepspeed / diffusers / transformers are versions the suite was run on.

The engine touches DeepSpeed's ZeRO internals and relies on diffusers' model and pipeline classes;
a new major release (a new minor for 0.x packages) can change either without an error, only wrong
gradients or a broken export. setup.py bounds each of them above by the first untested release;
an environment built around those bounds (``pip install --no-deps``, a cluster image) fails here
with the package and the range instead of somewhere inside a training step.
"""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

SETUP = Path(__file__).resolve().parents[1] / "setup.py"
PINNED = ("torch", "deepspeed", "diffusers", "transformers")


def _install_requires() -> dict[str, Requirement]:
    for node in ast.walk(ast.parse(SETUP.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            requirements = [Requirement(ast.literal_eval(item)) for item in node.value.elts]
            return {r.name: r for r in requirements}
    raise AssertionError("setup.py has no install_requires")


def _untested(name: str, installed: str, requirement: Requirement) -> str | None:
    # Local build tags (torch's "+cu130") say how it was built, not which release it is.
    release = Version(Version(installed).base_version)
    if release in requirement.specifier:
        return None
    return f"{name} {installed} is outside the tested range {requirement.specifier}"


@pytest.mark.parametrize("name", PINNED)
def test_pins_have_an_upper_bound(name: str) -> None:
    specifier = _install_requires()[name].specifier
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in specifier), (
        f"setup.py: {name}{specifier} has no tested upper bound"
    )


@pytest.mark.parametrize("name", PINNED)
def test_installed_version_was_tested(name: str) -> None:
    problem = _untested(name, version(name), _install_requires()[name])
    assert problem is None, problem


def test_an_untested_major_is_caught() -> None:
    requirements = _install_requires()
    assert _untested("deepspeed", "1.0.0", requirements["deepspeed"]) is not None
    assert _untested("diffusers", "1.0.0", requirements["diffusers"]) is not None
    assert _untested("torch", "3.0.0+cu130", requirements["torch"]) is not None
    assert _untested("transformers", "6.0.0", requirements["transformers"]) is not None
