"""Live-tensor memory tracking that works on CPU, CUDA and under ``FakeTensorMode``.

Backprop through K sampler steps calls the same modules K times per iteration (forward, recompute,
backward), which ``torch.distributed._tools.mem_tracker.MemTracker`` refuses. This tracker does not
care about modules: a ``TorchDispatchMode`` sees every tensor an op returns, registers each new
storage once with its byte size, and a weakref on the storage subtracts the bytes when the storage
is freed. The running sum per device is the live-tensor footprint; its maximum is the peak.

Because it only reads ``untyped_storage().nbytes()``, it runs unchanged under ``FakeTensorMode``:
a full-size model built from fake tensors can be "trained" for one step and measured without
allocating a byte. On CUDA, ``torch.cuda.max_memory_allocated`` is recorded beside it so the two
can be compared (the allocator adds block rounding and fragmentation on top of live bytes).

Host offload (``block_offload``, ``offload``) moves saved activations off the accelerator. On a
CPU-only machine the "host" and the "device" are the same memory, so storages created inside
:func:`host_allocations` are counted under the name ``"host"`` instead of their device: the
report then gives device bytes (``peak_bytes``) and offloaded bytes (``host_peak_bytes``) apart,
on CPU as on CUDA.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "HOST",
    "MemoryReport",
    "LiveTensorTracker",
    "PhaseReport",
    "host_allocations",
    "track_memory",
]

#: The name offloaded storages are counted under (see :func:`host_allocations`).
HOST = "host"
_scope = threading.local()


@contextlib.contextmanager
def host_allocations() -> Iterator[None]:
    """Storages created inside (on this thread) are offloaded copies: counted as ``"host"``."""
    depth = getattr(_scope, "depth", 0)
    _scope.depth = depth + 1
    try:
        yield
    finally:
        _scope.depth = depth


def _in_host_scope() -> bool:
    return getattr(_scope, "depth", 0) > 0


@dataclass
class MemoryReport:
    """Peak live bytes per device for one tracked region (bytes allocated inside the region)."""

    peak_bytes: int = 0
    """Peak over the region of the bytes allocated inside it and still alive, summed over the
    devices (offloaded host copies excluded: see ``host_peak_bytes``)."""
    peak_bytes_per_device: dict[str, int] = field(default_factory=dict)
    """Peak of each device on its own (the per-device peaks need not coincide in time); offloaded
    copies under ``"host"``."""
    end_bytes: int = 0
    """Device bytes allocated inside the region and still alive when it closed."""
    host_peak_bytes: int = 0
    """Peak of the offloaded copies alive at once (:func:`host_allocations`)."""
    cuda_peak_bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` over the region minus its value at entry, if CUDA ran."""


@dataclass(frozen=True)
class PhaseReport:
    """Device and host bytes of one named phase of a tracked region (:meth:`LiveTensorTracker.phase`).

    Every figure counts the bytes allocated since the tracker was entered (the region's baseline),
    so phases of one region compare directly: ``peak_bytes - entry_bytes`` is what the phase
    itself added on top of what earlier phases left alive.
    """

    name: str
    entry_bytes: int  # device bytes alive when the phase began
    peak_bytes: int  # device peak during the phase
    exit_bytes: int  # device bytes alive when it ended (kept for later phases)
    host_peak_bytes: int  # peak of the offloaded host copies during the phase

    @property
    def rise_bytes(self) -> int:
        """The phase's own device peak above what was alive at its start."""
        return self.peak_bytes - self.entry_bytes


class LiveTensorTracker(TorchDispatchMode):
    """Counts bytes of storages created while active, until each is freed.

    Use as a context manager (``with LiveTensorTracker() as tracker: ...``), then read
    ``tracker.report()``. Storages that existed before entry (parameters, inputs) are not counted;
    in-place ops and views reuse a counted storage and add nothing.
    """

    def __init__(self, *, track_cuda: bool | None = None) -> None:
        super().__init__()
        # Reentrant: a garbage collection triggered while a storage is being registered can free
        # another one, whose weakref callback then runs on this thread with the lock held.
        self._lock = threading.RLock()
        self._live_bytes: dict[str, int] = defaultdict(int)
        self._peak_per_device: dict[str, int] = defaultdict(int)
        self._live_total = 0
        self._peak_total = 0
        # id(storage) -> weakref; keeps each storage registered exactly once while it lives.
        self._seen: dict[int, weakref.ref] = {}
        self._track_cuda = torch.cuda.is_available() if track_cuda is None else track_cuda
        self._cuda_start = 0
        self._cuda_peak: int | None = None
        # Peaks since the current phase began (see phase()); the whole region is one phase.
        self._window_peak = 0
        self._window_host_peak = 0
        self._phases: list[PhaseReport] = []

    # -- bookkeeping -------------------------------------------------------------------------
    def _release(self, ref: weakref.ref, key: int, device: str, nbytes: int) -> None:
        with self._lock:
            # Only our own entry: a new storage may already have reused the id of this dead one.
            if self._seen.get(key) is ref:
                del self._seen[key]
            self._live_bytes[device] -= nbytes
            if device != HOST:
                self._live_total -= nbytes

    def _register(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        with self._lock:
            ref = self._seen.get(key)
            if ref is not None and ref() is storage:
                return
            nbytes = storage.nbytes()
            device = HOST if _in_host_scope() else str(storage.device)

            def release(dead: weakref.ref, k: int = key, d: str = device, n: int = nbytes) -> None:
                self._release(dead, k, d, n)

            self._seen[key] = weakref.ref(storage, release)
            self._live_bytes[device] += nbytes
            if device != HOST:
                self._live_total += nbytes
            self._peak_per_device[device] = max(
                self._peak_per_device[device], self._live_bytes[device]
            )
            self._peak_total = max(self._peak_total, self._live_total)
            self._window_peak = max(self._window_peak, self._live_total)
            self._window_host_peak = max(self._window_host_peak, self._live_bytes[HOST])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views, in-place and out= ops return storages of their inputs: nothing new was allocated
        # (and a view of a parameter must not count as parameter-sized allocation).
        inputs, _ = tree_flatten((args, kwargs))
        input_storages = {
            id(t.untyped_storage())
            for t in inputs
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        flat, _ = tree_flatten(out)
        for value in flat:
            if (
                isinstance(value, torch.Tensor)
                and value.layout == torch.strided
                and id(value.untyped_storage()) not in input_storages
            ):
                self._register(value)
        return out

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> LiveTensorTracker:
        if self._track_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._track_cuda:
            torch.cuda.synchronize()
            self._cuda_peak = torch.cuda.max_memory_allocated() - self._cuda_start

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Records the device / host peak of the code inside as a :class:`PhaseReport` named
        ``name`` (read them with :attr:`phases`). Phases may nest; the outer one's peak includes
        the inner's."""
        with self._lock:
            outer = (self._window_peak, self._window_host_peak)
            entry = self._live_total
            self._window_peak = entry
            self._window_host_peak = self._live_bytes[HOST]
        try:
            yield
        finally:
            with self._lock:
                peak, host_peak = self._window_peak, self._window_host_peak
                self._phases.append(PhaseReport(name, entry, peak, self._live_total, host_peak))
                self._window_peak = max(outer[0], peak)
                self._window_host_peak = max(outer[1], host_peak)

    @property
    def phases(self) -> list[PhaseReport]:
        """The phases recorded so far, in the order they ended."""
        return list(self._phases)

    @property
    def live_bytes(self) -> int:
        """Device bytes allocated since entry that are alive right now (host copies excluded)."""
        return self._live_total

    def report(self) -> MemoryReport:
        return MemoryReport(
            peak_bytes=self._peak_total,
            peak_bytes_per_device=dict(self._peak_per_device),
            end_bytes=self._live_total,
            host_peak_bytes=self._peak_per_device.get(HOST, 0),
            cuda_peak_bytes=self._cuda_peak,
        )


def track_memory(fn, *args, **kwargs) -> tuple[object, MemoryReport]:
    """Runs ``fn(*args, **kwargs)`` under a :class:`LiveTensorTracker`; returns (result, report).

    The result is kept alive, so its bytes show up in ``report.end_bytes``.
    """
    with LiveTensorTracker() as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.report()
