"""Every place the engine relies on DeepSpeed behaviour that its public API does not promise.

Each function names the DeepSpeed version it was written against (0.19; setup.py bounds the
install to 0.19.x and tests/test_versions.py fails on another release). A DeepSpeed upgrade starts
here: re-check each note below against the new release's source.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["use_weights_only_loading", "weights_only_torch_load"]

log = logging.getLogger("e2ed2.checkpoint")


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints (found by loading
    stage 0-3 fp32/bf16 checkpoints with ``weights_only=True``); plain data, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """While inside, every ``torch.load`` reads with ``weights_only=True`` (DeepSpeed's few
    plain-data classes allowed), whatever its caller asks for.

    For DeepSpeed's universal-checkpoint conversion and loading (reshard.py), which call
    ``torch.load(..., weights_only=False)`` directly rather than through the engine's checkpoint
    engine; used on the main thread, around those calls only.
    """
    allowed = _deepspeed_safe_globals()
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def use_weights_only_loading(engine: Any) -> bool:
    """Makes ``engine.load_checkpoint`` read its files with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19's ``TorchCheckpointEngine.load`` hard-codes ``weights_only=False`` (a
    checkpoint file could run code when loaded) and its API has no switch. Model, ZeRO optimizer
    and scheduler states all go through that one method (universal / MoE checkpoints, which call
    ``torch.load`` directly, are not used here), so it is replaced on this engine's instance by a
    ``weights_only`` load that allows only DeepSpeed's few plain-data classes. Returns False (and
    warns) for another checkpoint engine (Nebula, fast writer), which is left as it is.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine) is not TorchCheckpointEngine:
        log.warning(
            "DeepSpeed checkpoint engine %s keeps its own loader (torch.load may unpickle code)",
            type(checkpoint_engine).__name__,
        )
        return False
    allowed = _deepspeed_safe_globals()

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
    return True
