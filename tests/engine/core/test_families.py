"""Model families (core/families.py): chosen once from the checkpoint folder, and the only place
that names the families' diffusers classes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from e2ed2.engine.config import ModelConfig
from e2ed2.engine.config.model import FAMILY_NAMES
from e2ed2.engine.core.families import FAMILIES, family_of_pipeline_folder, resolve_family
from e2ed2.engine.core.models import model_family

ENGINE = Path(__file__).resolve().parents[3] / "engine"
FAMILY_MODULE = ENGINE / "core" / "families.py"


def _class_names() -> set[str]:
    names = {f.denoiser_class for f in FAMILIES.values()}
    return names | {f.pipeline_class for f in FAMILIES.values()}


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of ``path`` that are code, not prose (docstrings and attribute
    docstrings are bare expression statements)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
    ]


def test_no_family_class_names_outside_the_family_module() -> None:
    names = _class_names()
    found = [
        f"{path.relative_to(ENGINE.parent)}:{line}: {text!r}"
        for path in sorted(ENGINE.rglob("*.py"))
        if path != FAMILY_MODULE
        for line, text in _code_strings(path)
        if any(name in text for name in names)
    ]
    assert found == [], "family class names belong in engine/core/families.py:\n" + "\n".join(found)


def test_the_class_name_check_sees_code_strings(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""PixArtAlphaPipeline in prose."""\nx = name == "PixArtAlphaPipeline"\n')
    assert _code_strings(module) == [(2, "PixArtAlphaPipeline")]


def test_config_names_every_family() -> None:
    assert set(FAMILY_NAMES) == {"auto", *FAMILIES}
    with pytest.raises(ValueError, match=r"model.family='flux' is not one of"):
        ModelConfig(family="flux")


def _folder(root: Path, pipeline: str | None, denoiser: str) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": denoiser}))
    (root / "transformer" / "model.safetensors").write_bytes(b"")
    if pipeline is not None:
        (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return root


@pytest.mark.parametrize(
    ("pipeline", "denoiser", "expected"),
    [
        ("PixArtAlphaPipeline", "PixArtTransformer2DModel", "pixart_alpha"),
        ("PixArtSigmaPipeline", "PixArtTransformer2DModel", "pixart_sigma"),
        ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "sd3"),
        (None, "PixArtTransformer2DModel", "pixart_alpha"),  # a bare transformer folder
        (None, "SD3Transformer2DModel", "sd3"),
    ],
)
def test_family_from_the_checkpoint_folder(
    tmp_path: Path, pipeline: str | None, denoiser: str, expected: str
) -> None:
    root = _folder(tmp_path / "ckpt", pipeline, denoiser)
    # The pipeline folder and its transformer/ subfolder name the same family.
    for path in (root, root / "transformer"):
        assert model_family(ModelConfig(pretrained_path=str(path))).name == expected
    if pipeline is None:
        assert family_of_pipeline_folder(root) is None


def test_explicit_family_wins_and_contradictions_fail(tmp_path: Path) -> None:
    bare = _folder(tmp_path / "bare", None, "PixArtTransformer2DModel") / "transformer"
    config = ModelConfig(pretrained_path=str(bare), family="pixart_sigma")
    assert model_family(config).pipeline_class == "PixArtSigmaPipeline"
    with pytest.raises(ValueError, match=r"model.family='sd3' trains a SD3Transformer2DModel"):
        model_family(ModelConfig(pretrained_path=str(bare), family="sd3"))
    # A denoiser built from config is PixArt's class.
    assert resolve_family("auto", None, None).name == "pixart_alpha"
