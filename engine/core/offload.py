"""Saved activations kept on the host: the pack/unpack pair behind ``block_offload``.

``block_offload`` runs each sampler step once, with diffusers' per-block checkpointing on, under
:meth:`HostOffload.hooks` (``torch.autograd.graph.saved_tensors_hooks``). What autograd would
keep on the device between the forward and the backward is then

* each transformer block's inputs: non-reentrant ``torch.utils.checkpoint`` stores its inputs as
  saved tensors *outside* its own hooks, so they pass through ours and go to the host;
* whatever the net saves outside its blocks (patch embedding input, final norm / projection,
  timestep and caption MLPs, the sampler's arithmetic).

Inside a block's checkpoint region the checkpoint's own hooks are the innermost pair and save
nothing (the block is recomputed in backward), so the activations themselves never reach us.
During backward each block's inputs are copied back when its recompute unpacks them, just before
the block runs again: device memory holds one block's recompute plus the gradients in flight,
whatever K is, at the compute of ``step`` (forward once, each block recomputed once).

What is not offloaded: parameters and other leaves that require grad, and views of them (they
live outside the graph anyway; copying a weight at each of its K uses would be pure traffic).

On CUDA the device-to-host copies go into pinned buffers on a side stream, overlapping the
forward; the host-to-device copy is queued on the compute stream when backward needs the tensor
(non-blocking from pinned memory). When the host *is* the compute device (CPU runs), both copies
are still made, inside :func:`~e2ed2.engine.core.memory.host_allocations`, so the live-tensor
tracker reports offloaded bytes as host bytes and fetched bytes as device bytes, and the memory
claim can be measured without an accelerator.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .memory import host_allocations

__all__ = ["HostOffload"]


@dataclass(frozen=True)
class _Packed:
    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None  # set on CUDA: the async device-to-host copy's completion


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter (trainable or frozen; ZeRO-3's gathered ones are Parameters too), a leaf that
    requires grad, or a view of one (``weight.t()`` is what a matmul saves)."""
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, torch.nn.Parameter) or (base.requires_grad and base.grad_fn is None)


class HostOffload:
    """Pack/unpack hooks that keep saved activations on ``host_device`` until backward.

    One instance per unrolled trajectory: it remembers what it already copied (by tensor
    identity and version) so a tensor saved by many blocks is copied once.
    """

    def __init__(self, host_device: str | torch.device = "cpu") -> None:
        self.host_device = torch.device(host_device)
        # id(device tensor) -> (weakref to it, its version, weakref to the host copy). Weak on
        # both sides: the saved-tensor packs own the host copies and free them with the graph.
        self._copies: dict[int, tuple[weakref.ref, int, weakref.ref]] = {}
        self._stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Saved tensors created inside go to the host and come back when backward unpacks."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield

    # -- hooks ---------------------------------------------------------------------------------
    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Packed:
        if _is_parameter(tensor):
            return tensor
        key = id(tensor)
        cached = self._copies.get(key)
        if cached is not None:
            ref, version, host_ref = cached
            host = host_ref()
            if ref() is tensor and version == tensor._version and host is not None:
                return host
        packed = self._copy_to_host(tensor)
        self._copies[key] = (weakref.ref(tensor), tensor._version, weakref.ref(packed))
        return packed

    def unpack(self, packed: torch.Tensor | _Packed) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        if packed.device.type == "cuda":
            if packed.copied is not None:
                torch.cuda.current_stream(packed.device).wait_event(packed.copied)
            return packed.host.to(packed.device, non_blocking=True)
        # Host and compute device are one memory (CPU): copy anyway, so the tracker counts the
        # fetched tensor as device bytes, as it would be on an accelerator.
        fetched = torch.empty_like(packed.host, device=packed.device)
        fetched.copy_(packed.host)
        return fetched

    # -- copies --------------------------------------------------------------------------------
    def _copy_to_host(self, tensor: torch.Tensor) -> _Packed:
        device = tensor.device
        # Pinned, so both copies can run asynchronously (only CUDA to CPU memory can be).
        pinned = device.type == "cuda" and self.host_device.type == "cpu"
        with host_allocations():
            # empty_like keeps a dense tensor's strides (a transposed patch embedding stays
            # transposed): a block's recompute must see its inputs as the forward did, or ops
            # that branch on layout save other tensors and the checkpoint's check fails.
            host = torch.empty_like(tensor, device=self.host_device, pin_memory=pinned)
        if device.type != "cuda":
            host.copy_(tensor)
            return _Packed(host, device, None)
        # Off the compute stream: the forward goes on while the copy runs. The source must not
        # be reused before the copy has read it (record_stream), and the copy must not start
        # before the kernel that wrote the source (wait_stream).
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        tensor.record_stream(self._stream)
        return _Packed(host, device, done)
