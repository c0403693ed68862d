"""DeepSpeed internals are touched in the compat modules only, and the checkpointed-state
registry refuses what the on-disk layout cannot hold.

The internals check reads the code of every module in ``engine/`` (its syntax tree, so docstrings
that name an internal are fine) for what DeepSpeed's public API does not promise: imports from
``deepspeed.runtime`` / ``utils`` / ``checkpoint`` / ``ops`` / ``module_inject``, a ZeRO-3
parameter's ``ds_*`` attributes (also as ``hasattr`` strings), and an engine's internal
attributes (``checkpoint_engine``, ``optimizer``, ``lr_scheduler``, ``skipped_steps``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from e2ed2.engine.train.checkpoint import CheckpointStore, ProcessRng
from e2ed2.engine.train.checkpointed import (
    DeepSpeedEngineState,
    RankPrivate,
    RankTensors,
    check_entries,
    rank_file,
)

ENGINE = Path(__file__).resolve().parents[3] / "engine"
COMPAT = {"train/deepspeed_compat.py", "core/deepspeed_compat.py"}
INTERNAL_MODULES = (
    "deepspeed.runtime",
    "deepspeed.utils",
    "deepspeed.checkpoint",
    "deepspeed.ops",
    "deepspeed.module_inject",
)
# A ZeRO-3 parameter's bookkeeping (ds_id, ds_tensor, ds_status, ds_persist, ds_numel, ...) and
# the flag gather_once relies on.
PARAM_INTERNALS = ("is_external_param", "clear_backward_seen_flag", "checkpoint_engine")
# An engine's attributes beyond its public methods, when read off something called *engine.
ENGINE_INTERNALS = ("optimizer", "lr_scheduler", "skipped_steps")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_internal_name(name: str) -> bool:
    return name.startswith("ds_") and name != "ds_config" or name in PARAM_INTERNALS


def internals(source: str) -> list[tuple[int, str]]:
    """(line, what) of every DeepSpeed internal ``source`` touches."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            modules = []
        found += [(node.lineno, m) for m in modules if m.startswith(INTERNAL_MODULES)]
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            owner = _dotted(node.value)
            if (
                _is_internal_name(node.attr)
                or dotted.startswith(INTERNAL_MODULES)
                or (node.attr in ENGINE_INTERNALS and owner.lower().endswith("engine"))
            ):
                found.append((node.lineno, dotted or node.attr))
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _is_internal_name(node.value)
        ):
            found.append((node.lineno, repr(node.value)))
    return found


def test_the_check_finds_each_kind_of_internal() -> None:
    planted = """
from deepspeed.runtime.zero import partition_parameters
import deepspeed.utils.zero_to_fp32
x = param.ds_tensor
if hasattr(p, "ds_persist"):
    p.is_external_param = True
n = self.engine.skipped_steps
engine.optimizer.step()
deepspeed.checkpoint.ds_to_universal.main()
"""
    lines = sorted({line for line, _ in internals(planted)})
    assert lines == [2, 3, 4, 5, 6, 7, 8, 9]
    public = """
import deepspeed
engine, _, _, scheduler = deepspeed.initialize(model=m, config=ds_config)
with deepspeed.zero.GatheredParameters(params):
    pass
self.optimizer = None
counters.skipped_steps += 1
'''A docstring naming param.ds_tensor and deepspeed.runtime is prose.'''
"""
    assert internals(public) == []


def test_deepspeed_internals_only_in_the_compat_modules() -> None:
    outside = {
        f"engine/{path.relative_to(ENGINE)}:{line}: {what}"
        for path in sorted(ENGINE.rglob("*.py"))
        if str(path.relative_to(ENGINE)) not in COMPAT
        for line, what in internals(path.read_text())
    }
    assert not outside, "DeepSpeed internals outside the compat modules:\n" + "\n".join(
        sorted(outside)
    )
    # The training wing's compat module is where it is (not vacuous for a renamed file).
    assert internals((ENGINE / "train/deepspeed_compat.py").read_text())


class _Engine:
    def __init__(self) -> None:
        self.saved: list[str] = []

    def train_batch_size(self) -> int:
        return 4

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        (Path(root) / tag).mkdir()
        (Path(root) / tag / "model_states.pt").write_bytes(b"weights")
        self.saved.append(tag)

    def load_checkpoint(self, root: str, tag: str) -> tuple[str | None, dict]:
        return (str(Path(root) / tag) if (Path(root) / tag).is_dir() else None), {}


class _Counter:
    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state.get("value", -1)


class _Tensors:
    def __init__(self, value: float) -> None:
        self.tensor = torch.full((3,), value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"shadow.0": self.tensor}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensor = state["shadow.0"]


def test_registered_state_round_trips_in_the_layout_it_always_had(tmp_path: Path) -> None:
    """Every kind of entry through one save and load: the files keep the names checkpoints had
    before the registry, a new entry gets its own, and each entry is restored in place."""
    model, disc = _Engine(), _Engine()
    counter, extra, ema = _Counter(7), _Counter(3), _Tensors(2.0)
    states = {
        "model": DeepSpeedEngineState(model),
        "discriminator": DeepSpeedEngineState(disc),
        "ema": RankTensors(ema, torch.nn.Linear(1, 3), label="EMA"),
        "rng": RankPrivate(ProcessRng()),
        "counters": counter,
        "later": extra,
    }
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep=1, fingerprint={"a": 1})
    path = store.save(5, states)
    assert model.saved == ["step00000005"] and disc.saved == ["discriminator"]
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE",
        "discriminator",
        "latest",
        "rank00000.safetensors",
        "rank00000.state.pt",
        "step00000005",
        "trainer.json",
    ]
    assert CheckpointStore.read_state(path) == {
        "step": 5,
        "counters": {"value": 7},
        "later": {"value": 3},
        "fingerprint": {"a": 1},
        "train_batch_size": 4,
        "world_size": 1,
    }
    counter.value, extra.value, ema.tensor = 0, 0, torch.zeros(3)
    state = store.load(path, {**states, "newer": (newer := _Counter(9))})
    assert state["step"] == 5 and (counter.value, extra.value) == (7, 3)
    assert torch.equal(ema.tensor, torch.full((3,), 2.0))
    assert newer.value == -1  # an entry the checkpoint predates loads from an empty dict

    (path / "rank00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no EMA for rank 0"):
        store.load(path, states)


def test_the_rng_entry_restores_the_generators(tmp_path: Path) -> None:
    states = {"model": DeepSpeedEngineState(_Engine()), "rng": RankPrivate(ProcessRng())}
    store = CheckpointStore(tmp_path, rank=0, world_size=1, keep=1)
    path = store.save(1, states)
    after_save = torch.rand(4)
    torch.rand(100)
    store.load(path, states)
    assert torch.equal(torch.rand(4), after_save)


@pytest.mark.parametrize(
    ("states", "message"),
    [
        ({}, r"needs the model's engine as 'model'"),
        ({"model": DeepSpeedEngineState(None), "step": _Counter(1)}, r"\['step'\]"),
        (
            {  # "state" would write rank<R>.state.pt, the rng's file
                "model": DeepSpeedEngineState(None),
                "rng": RankPrivate(ProcessRng()),
                "state": RankPrivate(ProcessRng()),
            },
            r"share a per-rank file",
        ),
        (
            {"model": DeepSpeedEngineState(None), "export": DeepSpeedEngineState(None)},
            r"cannot be named 'export'",
        ),
    ],
)
def test_the_registry_refuses_what_the_layout_cannot_hold(states: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_entries(states)


def test_per_rank_entries_keep_their_file_names() -> None:
    entries = {
        "ema": RankTensors(_Tensors(0.0), torch.nn.Module(), label="EMA"),
        "rng": RankPrivate(ProcessRng()),
        "teacher": RankTensors(_Tensors(0.0), torch.nn.Module(), label="teacher"),
        "loader": RankPrivate(ProcessRng()),
    }
    assert [rank_file(name, entry, 3) for name, entry in entries.items()] == [
        "rank00003.safetensors",
        "rank00003.state.pt",
        "rank00003.teacher.safetensors",
        "rank00003.loader.pt",
    ]
