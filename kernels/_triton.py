"""Helpers shared by every kernel package: backend choice, launch plumbing, the alignment contract.

Nothing here is specific to one op. Each kernel package (``attention/``, ``embedding/``) is
layered ``kernels.py`` (``@triton.jit`` only) -> ``launcher.py`` (argument checks, alignment
fallback, grids, autotune configs) -> ``function.py`` (``torch.autograd.Function``) -> the public
function / module, and imports only this module across packages.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor

__all__ = [
    "ALIGN_BYTES",
    "ALIGN_ELEMENTS",
    "BACKENDS",
    "INTERPRETED",
    "Backend",
    "aligned_empty",
    "aligned_for_kernel",
    "check_aligned",
    "device_guard",
    "dot_precision",
    "is_aligned",
    "is_fake",
    "resolve_backend",
    "tile_configs",
    "triton_available",
]

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


@triton.jit
def _probe():
    pass


# Whether `@triton.jit` builds interpreter functions (TRITON_INTERPRET=1 when triton was first
# imported): then the kernels run on CPU tensors with one fixed config and no autotuning.
INTERPRETED: bool = not isinstance(_probe, triton.runtime.JITFunction)

# The alignment contract of every kernel that reads row-major tiles. Its `tl.multiple_of` hints
# tell the compiler that each row of a tile starts on a 16-byte boundary, which is what lets it
# emit 128-bit loads (`ld.global.v4.b32`) and 16-byte `cp.async` copies instead of one load per
# element. Triton's runtime specialization cannot see this by itself: it only marks integers
# divisible by 16, and PixArt's head stride is 72. So the launchers promise, and check:
#   * every tensor's data pointer is a multiple of ALIGN_BYTES;
#   * every stride the kernel receives (all but the unit stride) is a multiple of ALIGN_ELEMENTS.
# 8 elements = 16 bytes at fp16/bf16 (32 at fp32); all supported head dims are multiples of 8, so
# any contiguous copy satisfies it. `e2ed2.kernels.static_check` reads ALIGNMENT in each
# kernels module and flags launches that break it.
ALIGN_BYTES = 16
ALIGN_ELEMENTS = 8


def is_aligned(x: torch.Tensor, dims: int | None = None) -> bool:
    """``x`` meets the alignment contract in its first ``dims`` strides (all but the last: None)."""
    strides = x.stride()[: (x.dim() - 1 if dims is None else dims)]
    if any(s % ALIGN_ELEMENTS for s in strides):
        return False
    if x.device.type == "meta":  # no address: the view's offset is what a real one would add
        return bool((x.storage_offset() * x.element_size()) % ALIGN_BYTES == 0)
    return x.data_ptr() % ALIGN_BYTES == 0


def aligned_empty(
    shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` that meets the contract (unit last stride).

    Row-major, with the last dim's storage padded to a multiple of ALIGN_ELEMENTS so every other
    stride is one too (a plain ``empty`` of a ``(B, 100)`` tensor would have row stride 100).
    """
    *lead, last = shape
    padded = -(-last // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
    buffer = torch.empty((*lead, max(padded, ALIGN_ELEMENTS)), dtype=dtype, device=device)
    return buffer[..., :last]


def aligned_for_kernel(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it meets the contract with a unit last stride, else an aligned copy.

    Views that fail: slices along the last dim or at an odd offset (``qkv[..., 1:]``), ZeRO-3 /
    flat-buffer views at arbitrary element offsets, expanded gradients (stride 0 everywhere is
    fine, but not along the last dim), rows whose length is not a multiple of 8. The copy is a
    fresh allocation (the caching allocator aligns to 512 bytes) from :func:`aligned_empty`.
    """
    if x.stride(-1) == 1 and is_aligned(x):
        return x
    out = aligned_empty(x.shape, dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out


def check_aligned(**tensors: torch.Tensor | None) -> None:
    """Raise if a tensor about to be passed to a hinted kernel breaks the contract (a bug here)."""
    for name, x in tensors.items():
        if x is not None and not (x.stride(-1) == 1 and is_aligned(x)):
            raise AssertionError(
                f"{name}: strides {tuple(x.stride())}, offset {x.storage_offset()} break the "
                f"kernels' alignment contract ({ALIGN_BYTES}-byte pointer, strides multiples of "
                f"{ALIGN_ELEMENTS}, unit last stride)"
            )


def tile_configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` -> configs; one small config if interpreted.

    The interpreter runs on CPU: it is only a correctness check, and small blocks keep it fast
    while still covering multi-block loops and partial blocks in the tests' odd shapes.
    ``E2ED2_TRITON_CONFIGS=first`` keeps only the first (preferred) config: no autotuning, so a
    GPU test run over dozens of shapes compiles one config per shape, not every one.
    """
    if INTERPRETED:
        tiles = [(32, 32, 4, 1)]
    elif os.environ.get("E2ED2_TRITON_CONFIGS") == "first":
        tiles = tiles[:1]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in tiles
    ]


def is_fake(x: torch.Tensor) -> bool:
    """FakeTensorMode tensors (shape and memory tracing) have no data a kernel could read."""
    return isinstance(x, FakeTensor)


def triton_available(x: torch.Tensor | torch.device) -> str | None:
    """None if the Triton kernels can run on tensor ``x`` (or device), else the reason why not."""
    if isinstance(x, torch.Tensor) and is_fake(x):
        return (
            "the Triton kernels cannot run on fake tensors (FakeTensorMode); use backend='auto' "
            "or 'torch' to trace shapes and memory"
        )
    device = x.device if isinstance(x, torch.Tensor) else x
    if INTERPRETED or device.type == "cuda":
        return None
    return (
        f"the Triton kernels need CUDA tensors (got {device.type}); to run them on CPU, set "
        "TRITON_INTERPRET=1 in the environment before triton is first imported"
    )


def resolve_backend(backend: str, x: torch.Tensor | torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensor ``x`` (or a device).

    "auto" is Triton for real CUDA tensors and torch otherwise: CPU, meta, and fake tensors (so
    that FakeTensorMode memory estimates of a model with the kernels installed still trace).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if isinstance(x, torch.Tensor):
            return "triton" if x.device.type == "cuda" and not is_fake(x) else "torch"
        return "triton" if x.type == "cuda" else "torch"
    return backend


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact IEEE dots (the reference path, no TF32); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, whatever the current device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
