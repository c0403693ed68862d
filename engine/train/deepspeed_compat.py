"""Every place the engine relies on DeepSpeed behaviour that its public API does not promise.

The public API the rest of the engine uses directly: ``deepspeed.initialize``,
``init_distributed``, ``zero.Init`` / ``zero.GatheredParameters``, the accelerator, and the
engine's ``forward`` / ``backward`` / ``step`` / ``save_checkpoint`` / ``load_checkpoint`` and
config getters. Anything beyond that (a module under ``deepspeed.runtime`` / ``utils`` /
``checkpoint``, a ZeRO-3 parameter's ``ds_*`` attributes, an engine's or optimizer's attribute)
lives here or, for the core wing (below train/ in the import ranks), in
``core/deepspeed_compat.py``; tests/engine/train/test_deepspeed_compat.py fails on one elsewhere.

Each function names the DeepSpeed version it was written against (0.19; setup.py bounds the
install to 0.19.x and tests/test_versions.py fails on another release). A DeepSpeed upgrade starts
here: re-check each note below against the new release's source.

DeepSpeed's own modules are imported inside the functions that use them: importing DeepSpeed
takes seconds and probes the accelerator, and checkpoint.py (so this module) is also imported
where no engine is built (run_dir.py's start decision, the command boundary's error types).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "close_micro_step",
    "convert_to_universal",
    "failing_checkpoint_writes",
    "keep_zero3_params_gathered",
    "local_partition",
    "release_shm_allreduce_buffer",
    "shm_allreduce_buffer",
    "skipped_steps",
    "skips_nonfinite_steps",
    "step_without_update",
    "use_weights_only_loading",
    "weights_only_torch_load",
    "zero3_numel",
]

log = logging.getLogger("e2ed2.checkpoint")


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints (found by loading
    stage 0-3 fp32/bf16 checkpoints with ``weights_only=True``); plain data, no code on load."""
    # lazy: a DeepSpeed internal, imported where used: this module must not pay deepspeed (~0.6 s),
    # and a release that moves it breaks only this function
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
    # lazy: a DeepSpeed internal, imported where used: this module must not pay deepspeed (~0.6 s),
    # and a release that moves it breaks only this function
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


@contextlib.contextmanager
def failing_checkpoint_writes(engine: Any, fault: Callable[[str], OSError]) -> Iterator[None]:
    """While inside, every file ``engine.save_checkpoint`` writes raises ``fault(path)``.

    DeepSpeed 0.19 writes every checkpoint file through ``engine.checkpoint_engine.save(state,
    path)`` (model, ZeRO optimizer partitions, scheduler); an instance attribute shadows that
    method for the block. For the checkpoint save's injected write failure (write_errors.py).
    """
    checkpoint_engine = engine.checkpoint_engine

    def fail(state_dict: Any, path: str) -> None:
        raise fault(path)

    checkpoint_engine.save = fail  # an instance attribute over the class's method
    try:
        yield
    finally:
        del checkpoint_engine.save


def close_micro_step(engine: Any) -> None:
    """What ``engine.forward`` does first: a ZeRO optimizer closes the previous micro-step.

    DeepSpeed 0.19's forward calls ``optimizer.clear_backward_seen_flag()`` on a
    ``deepspeed.runtime.base_optimizer.ZeROOptimizer`` (ZeRO-3 then starts a micro-step's gradient
    partitions by copying instead of adding, ZeRO-1/2 clear their accumulation attributes); the
    engine has no public call for it (train/step_backward.py needs it between backward pieces).
    """
    # lazy: a DeepSpeed internal, imported where used: this module must not pay deepspeed (~0.6 s),
    # and a release that moves it breaks only this function
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()


def skipped_steps(engine: Any) -> int:
    """Optimizer steps the engine skipped for a NaN/Inf gradient norm so far.

    DeepSpeed 0.19 counts them in the engine attribute ``skipped_steps`` (incremented in
    ``_take_model_step`` when the optimizer reports an ``overflow``); there is no getter.
    """
    return engine.skipped_steps


def skips_nonfinite_steps(engine: Any) -> bool:
    """True if the engine's optimizer skips a step whose gradient norm is NaN/Inf by itself.

    DeepSpeed 0.19: the ZeRO 1-3 optimizers and the bf16 / fp16 optimizers check the all-reduced
    gradient norm and set ``overflow`` (the engine then skips the update and the LR schedule);
    plain fp32 without ZeRO steps the torch optimizer whatever the gradients hold.
    """
    return (
        engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
    )


@contextlib.contextmanager
def step_without_update(engine: Any) -> Iterator[None]:
    """Inside the block, ``engine.step()`` runs its bookkeeping but updates no weight.

    DeepSpeed 0.19's ``engine.step`` (``_take_model_step``) calls ``engine.optimizer.step()`` and
    ``engine.lr_scheduler.step()`` and then its own counters and ``zero_grad``; an instance
    attribute shadows each of the two ``step`` methods for the block, so micro-step counters and
    gradient clearing stay consistent. DeepSpeed offers no public "skip this step".
    """
    patched = [obj for obj in (engine.optimizer, engine.lr_scheduler) if obj is not None]
    for obj in patched:
        obj.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for obj in patched:
            del obj.step


def local_partition(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this rank owns: its ZeRO-3 partition, or the whole tensor.

    DeepSpeed 0.19's ZeRO-3 keeps a partitioned parameter's own flat, zero-padded 1/N slice in
    ``param.ds_tensor`` (``param.data`` is then an empty placeholder outside a gather).
    """
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def zero3_numel(param: torch.Tensor) -> int | None:
    """The whole size of a ZeRO-3 partitioned ``param`` (None: not partitioned).

    DeepSpeed 0.19 records it in ``param.ds_numel``; rank r's partition (``ds_tensor``) holds
    elements ``[r*p, (r+1)*p)`` of the flattened parameter, zero-padded at the end.
    """
    return param.ds_numel if hasattr(param, "ds_numel") else None


@contextlib.contextmanager
def keep_zero3_params_gathered(module: nn.Module) -> Iterator[None]:
    """Within the block, each ZeRO-3 parameter of ``module`` is gathered at most once.

    DeepSpeed 0.19's per-module release after a forward / backward skips a parameter marked
    ``ds_persist`` or ``is_external_param`` (with or without a complete module trace), so both are
    set on every partitioned, non-persistent parameter; on exit they are restored and the
    parameters still gathered (``ds_status == ZeroParamStatus.AVAILABLE``) are partitioned again
    with ``param.partition(param_list=...)``. Without ZeRO-3 parameters nothing is done.
    """
    # ZeRO-3's parameters carry attributes torch's Parameter type does not declare.
    params: list[Any] = [
        p for p in module.parameters() if hasattr(p, "ds_persist") and not p.ds_persist
    ]
    if not params:
        yield
        return
    external = [p.is_external_param for p in params]
    for param in params:
        param.ds_persist = True
        param.is_external_param = True
    try:
        yield
    finally:
        for param, was_external in zip(params, external, strict=True):
            param.ds_persist = False
            param.is_external_param = was_external
        # lazy: a DeepSpeed internal, imported where used: this module must not pay deepspeed (~0.6
        # s), and a release that moves it breaks only this function
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)


def convert_to_universal(tag_folder: Path, target: Path) -> None:
    """DeepSpeed's universal checkpoint of the ZeRO state in ``tag_folder``, written to ``target``.

    Calls the ``main`` of DeepSpeed 0.19's ``deepspeed.checkpoint.ds_to_universal`` (a script
    without a library entry point) with the namespace its argument parser would build. It reads
    the checkpoint with ``torch.load(weights_only=False)``, so it runs inside
    :func:`weights_only_torch_load`.
    """
    # lazy: a DeepSpeed internal, imported where used: this module must not pay deepspeed (~0.6 s),
    # and a release that moves it breaks only this function
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with weights_only_torch_load():
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(tag_folder),
                output_folder=str(target),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # e2ed2 writes no Megatron-style universal_checkpoint_info (no tensor parallelism).
                inject_missing_state=True,
            )
        )


#: Where POSIX shared memory lives on Linux (shm_open names are files here).
SHM_DIR = Path("/dev/shm")


def shm_allreduce_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed 0.19's CPU all-reduce creates for ``rank``.

    ``deepspeed/ops/csrc/cpu/comm/shm.cpp`` (``shm_initialize``, reached from ``TorchBackend``'s
    constructor when the launcher's ``LOCAL_SIZE`` equals the world size, i.e. every CPU run
    under the ``deepspeed`` launcher) names it
    ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_allreduce_buffer(rank: int, world_size: int) -> None:
    """Unlinks this rank's CPU all-reduce buffer name once every rank has mapped every buffer.

    DeepSpeed 0.19 never unlinks it (its ``shared_close`` has no caller), so each CPU launcher
    run left ``world_size`` files of ~64 MiB in ``/dev/shm``, which is RAM: on a CPU node that
    runs many short jobs (a test suite, a sweep) they add up until the machine swaps. Each rank's
    ``shm_initialize`` returns only after it has mapped every peer's buffer, so after a barrier
    the names can go: the mappings stay valid until the processes exit, and a rank that is
    killed later leaves nothing behind. A no-op, without the barrier, where DeepSpeed created
    none: no shm op built (GPU accelerators: a barrier there would run before the trainer has set
    the rank's CUDA device), a world of one, ranks on several nodes.
    """
    # lazy: a DeepSpeed internal, imported where used: this module must not pay deepspeed (~0.6
    # s), and a release that moves it breaks only this function
    from deepspeed.comm import comm as ds_comm

    # DeepSpeed's own condition (TorchBackend built the op; shm_interface.cpp's LOCAL_SIZE test),
    # the same on every rank, so every rank or none meets the barrier.
    built = getattr(ds_comm.cdb, "shm_comm_op", None) is not None
    if not built or world_size < 2 or os.environ.get("LOCAL_SIZE") != str(world_size):
        return
    torch.distributed.barrier()
    shm_allreduce_buffer(rank).unlink(missing_ok=True)
