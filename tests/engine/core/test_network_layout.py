"""The network layout (``core/layout.py``): the one place that turns ``model.share_across_steps``
and ``model.lora_rank`` into what DeepSpeed wraps, what trains, what the EMA shadows, what the
trajectory calls and which K an export samples at."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from e2ed2.engine.config import ModelConfig
from e2ed2.engine.core.layout import NetworkLayout
from e2ed2.engine.core.lora import PerStepLoRA

NUM_STEPS = 3
ENGINE = Path(__file__).resolve().parents[3] / "engine"
# Modules allowed to read the two keys: their config, the layout, and the LoRA builder it calls.
READERS = {"config/model.py", "config/train.py", "core/layout.py", "core/lora.py"}


@pytest.mark.parametrize(
    ("shared", "rank", "kind"),
    [(True, 0, "shared"), (False, 0, "per_step"), (True, 2, "lora"), (False, 2, "per_step_lora")],
)
def test_each_layout_wraps_trains_and_calls_what_it_says(make_pixart, shared, rank, kind) -> None:
    layout = NetworkLayout(ModelConfig(share_across_steps=shared, lora_rank=rank))
    assert layout.kind == kind
    denoiser = make_pixart()
    base_names = {name for name, _ in denoiser.named_parameters()}
    module = layout.wrap(denoiser, NUM_STEPS)

    if kind == "shared":
        assert module is denoiser
    elif kind == "per_step":
        assert isinstance(module, torch.nn.ModuleList) and len(module) == NUM_STEPS
        assert module[0] is not module[1]
    elif kind == "lora":
        assert module is denoiser
    else:
        assert isinstance(module, PerStepLoRA)

    trainable = layout.trainable_parameters(module)
    ema = layout.ema_parameters(module)
    everything = list(module.parameters())
    if rank:
        # Only adapters train, and the EMA shadows exactly them (no copy of the frozen base).
        names = {n for n, p in module.named_parameters() if p.requires_grad}
        assert names and all("lora_" in n for n in names), sorted(names)[:4]
        assert [id(p) for p in ema] == [id(p) for p in trainable]
        assert len(trainable) < len(everything)
    else:
        assert [id(p) for p in trainable] == [id(p) for p in everything]
        assert [id(p) for p in ema] == [id(p) for p in everything]
        copies = NUM_STEPS if kind == "per_step" else 1
        assert len(everything) == copies * len(base_names)

    engine = SimpleNamespace(module=module)
    assert layout.networks(engine) is (engine if shared else module)  # type: ignore[arg-type]
    assert layout.exports_stock_pipeline() is shared
    assert layout.sampling_steps_error(NUM_STEPS, NUM_STEPS) is None
    other = layout.sampling_steps_error(NUM_STEPS + 1, NUM_STEPS)
    if shared:
        assert other is None
    else:
        assert other == f"per-step networks were trained for K={NUM_STEPS}"


def _branches_on(tree: ast.AST, keys: set[str]) -> bool:
    """Whether a condition (if / while / conditional expression / comprehension filter / assert)
    reads one of ``keys`` as an attribute; reading a key to print it is not branching."""
    tests: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(node.test)
        elif isinstance(node, ast.comprehension):
            tests.extend(node.ifs)
    return any(
        isinstance(sub, ast.Attribute) and sub.attr in keys
        for test in tests
        for sub in ast.walk(test)
    )


def test_only_the_layout_branches_on_the_layout_keys() -> None:
    """Outside the config, the layout and the LoRA builder, nothing branches on the two keys."""
    keys = {"share_across_steps", "lora_rank"}
    branching = {
        path.relative_to(ENGINE).as_posix()
        for path in ENGINE.rglob("*.py")
        if _branches_on(ast.parse(path.read_text(), str(path)), keys)
    }
    assert "core/lora.py" in branching  # the check sees the LoRA builder's own branch
    assert branching <= READERS, sorted(branching - READERS)
    planted = ast.parse("x = 1 if config.model.lora_rank else 0")
    assert _branches_on(planted, keys) and not _branches_on(ast.parse("print(m.lora_rank)"), keys)
