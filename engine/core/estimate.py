"""Memory model of one E2ED2 training iteration, measured under fake tensors (no GPU needed).

Per rank, an iteration's peak is

    gathered parameters                 (ZeRO-3: the bf16 weights all-gathered during the K steps)
  + ZeRO-partitioned state              (params / grads / optimizer, each divided over the ranks)
  + ZeRO communication buckets          (reduce bucket for gradients, prefetch bucket for params)
  + activation peak of forward+backward (measured, not modelled: see below)

and, apart from it, the host bytes the offloading policies (``block_offload``, ``offload``) keep
per rank (``RankMemoryEstimate.host_bytes``; measured the same way, :func:`step_memory`).

One term inside the activation peak is the shared weights' gradient sum: with one network used by
K steps, autograd sums each parameter's K gradient contributions in its input buffer and releases
the sum (to ZeRO's reduce-scatter hook) only after the first step's backward, so from K = 2 on a
full-size gradient of every parameter is alive at once on every rank (parameter count x the
gradient's element size; ``benchmarks/bench_peer_recipes.py`` measures it at full size). A
backward one sampler step at a time (``per_step_backward``, core/step_cuts.py) has none.

The activation peak is the only term that depends on K, resolution and checkpoint policy, and the
only one that is hard to write down; it is *measured* by running the real diffusers model through
the real trajectory under ``FakeTensorMode`` with :class:`LiveTensorTracker` counting live bytes.
Fake and real runs give the same tracker peak (tests/engine/core/test_memory.py), and
:func:`validate_against_real` checks the whole sum against a real run of a small config.

The full-size gradients that autograd would accumulate are dropped as soon as each is produced
(``drop_full_grads``), which is what ZeRO-3 does: its gradient hook copies the gradient into the
reduce bucket, reduce-scatters it and keeps only this rank's partition.

Attention is measured with torch's fused CPU flash-attention kernel, which (like the GPU
flash / memory-efficient kernels, and e2ed2's Triton kernel) keeps only the output and the
logsumexp, never the N x N scores. Not modelled: the CUDA context and allocator fragmentation
(compare :attr:`MemoryReport.cuda_peak_bytes` on a GPU), and a VAE decode for LPIPS / GAN terms
(the estimate is for the denoiser trajectory with a latent L2 loss).

Non-square sizes (aspect-ratio buckets) are given as ``(height, width)``; for a bucketed run,
estimate its largest bucket (most pixels: the longest token sequence and the largest
activations; :func:`~e2ed2.engine.data.buckets.largest_bucket`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import LiveTensorTracker, MemoryReport
from .models import pixart_transformer
from .network import Conditioning
from .sampler import SamplerConfig, build_schedule
from .step_cuts import StepCuts
from .trajectory import CheckpointPolicy, Trajectory, TrajectoryConfig

__all__ = [
    "DenoiserShape",
    "PIXART_ALPHA_XL_2",
    "ZeroStateBytes",
    "RankMemoryEstimate",
    "build_pixart",
    "make_inputs",
    "make_trajectory",
    "run_iteration",
    "count_parameters",
    "step_peak_bytes",
    "step_memory",
    "zero3_state_bytes",
    "estimate_rank_memory",
    "drop_full_grads",
    "UpperBoundShapes",
]

VAE_DOWNSAMPLE = 8  # SD / PixArt VAE: 8x8 pixels per latent

#: A side, or (height, width) (in latent pixels or image pixels, as the argument says).
Size = int | tuple[int, int]


def _height_width(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class DenoiserShape:
    """Architecture of a PixArt-α-style transformer (diffusers ``PixArtTransformer2DModel``)."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    caption_channels: int = 4096  # T5-XXL
    text_tokens: int = 120  # PixArt-α's max caption length
    in_channels: int = 4
    out_channels: int = 8  # learned sigma
    patch_size: int = 2

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# PixArt-α-XL/2: 28 blocks, hidden 1152 = 16 heads x 72, T5-XXL captions (~0.61B parameters).
PIXART_ALPHA_XL_2 = DenoiserShape(num_layers=28, num_attention_heads=16, attention_head_dim=72)


def build_pixart(
    shape: DenoiserShape, latent_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A randomly initialised denoiser of ``shape`` for ``latent_size`` x ``latent_size`` latents.

    Build it under ``FakeTensorMode`` to get a full-size model without allocating it. (Built
    directly in ``dtype``: ``Module.to`` cannot swap fake parameters.)
    """

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _pixart(shape, latent_size)
    finally:
        torch.set_default_dtype(default_dtype)


def _pixart(shape: DenoiserShape, latent_size: int) -> nn.Module:
    return pixart_transformer(
        num_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        attention_head_dim=shape.attention_head_dim,
        in_channels=shape.in_channels,
        out_channels=shape.out_channels,
        sample_size=latent_size,
        caption_channels=shape.caption_channels,
        patch_size=shape.patch_size,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def drop_full_grads(model: nn.Module) -> Iterator[None]:
    """Frees each parameter's full gradient right after autograd accumulates it (as ZeRO-3)."""

    def drop(param: torch.Tensor) -> None:
        param.grad = None

    handles = [
        p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def make_inputs(
    shape: DenoiserShape, latent_size: Size, batch: int, dtype: torch.dtype
) -> tuple[torch.Tensor, Conditioning]:
    """Clean latents (B, C, h, w) for ``latent_size`` = side or (h, w), and half-padded text
    (with a one-row empty prompt for classifier-free guidance)."""
    height, width = _height_width(latent_size)
    clean = torch.randn(batch, shape.in_channels, height, width, dtype=dtype)
    states = torch.randn(batch, shape.text_tokens, shape.caption_channels, dtype=dtype)
    mask = torch.ones(batch, shape.text_tokens, dtype=torch.long)
    mask[:, shape.text_tokens // 2 :] = 0  # half-length captions: the padding mask is exercised
    null_mask = torch.zeros(1, shape.text_tokens, dtype=torch.long)
    null_mask[:, 0] = 1  # "" encodes to EOS alone
    null = Conditioning(states[:1].clone(), null_mask)
    return clean, Conditioning(states, mask, unconditional=null)


def make_trajectory(
    policy: CheckpointPolicy, num_steps: int, guidance_scale: float = 1.0
) -> Trajectory:
    """K LCM steps from noise under ``policy`` (build it outside ``FakeTensorMode``);
    ``guidance_scale`` > 1: classifier-free guidance, each network call on the doubled batch."""
    return Trajectory(
        TrajectoryConfig(num_steps=num_steps, checkpoint=policy),
        build_schedule(SamplerConfig(guidance_scale=guidance_scale), num_steps),
    )


def run_iteration(
    model: nn.Module,
    trajectory: Trajectory,
    clean: torch.Tensor,
    cond: Conditioning,
    *,
    per_step_backward: bool = False,
) -> torch.Tensor:
    """One E2ED2 forward + backward: K sampler steps from noise, L2 on the final sample;
    ``per_step_backward``: the backward one sampler step at a time (core/step_cuts.py)."""
    cuts = StepCuts() if per_step_backward else None
    sample, _ = trajectory(model, cond, clean=clean, cuts=cuts)
    loss = (sample.float() - clean.float()).square().mean()
    for piece in cuts.pieces(loss) if cuts is not None else [loss]:
        piece.backward()
    return loss.detach()


def step_peak_bytes(shape: DenoiserShape, **kwargs: Any) -> int:
    """Peak device bytes of one forward+backward: :func:`step_memory`'s ``peak_bytes`` (same
    keyword arguments)."""
    return step_memory(shape, **kwargs).peak_bytes


def step_memory(
    shape: DenoiserShape,
    *,
    resolution_px: Size,
    policy: CheckpointPolicy,
    num_steps: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    zero3_grads: bool = True,
    fake: bool = True,
    guidance_scale: float = 1.0,
    per_step_backward: bool = False,
) -> MemoryReport:
    """Peak live bytes allocated by one forward+backward (parameters excluded: they pre-exist):
    device bytes (``peak_bytes``) and, for the offloading policies, the host bytes per rank
    (``host_peak_bytes``).

    ``resolution_px``: the image side, or its (height, width) (an aspect-ratio bucket); the
    model is built for the square of about the same area (``sample_size`` only sets PixArt's
    positional-embedding reference grid, which costs no activation memory).
    ``zero3_grads``: drop full gradients as ZeRO-3 does; else they are kept (and counted).
    ``fake``: under ``FakeTensorMode`` (nothing allocated); ``False`` runs it for real.
    ``guidance_scale`` > 1: classifier-free guidance (``sampler.guidance_scale``): every network
    call, forward and recompute, runs the doubled batch.
    ``per_step_backward``: the backward one sampler step at a time
    (``trajectory.per_step_backward``): no full-size gradient sum across the K steps.
    """
    height_px, width_px = _height_width(resolution_px)
    latent_hw = (height_px // VAE_DOWNSAMPLE, width_px // VAE_DOWNSAMPLE)
    patch = shape.patch_size
    square = max(patch, round((latent_hw[0] * latent_hw[1]) ** 0.5 / patch) * patch)
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        model = build_pixart(shape, square, dtype=dtype)
        clean, cond = make_inputs(shape, latent_hw, batch, dtype)
    trajectory = make_trajectory(policy, num_steps, guidance_scale)
    grads = drop_full_grads(model) if zero3_grads else contextlib.nullcontext()
    with mode, grads, LiveTensorTracker(track_cuda=False) as tracker:
        run_iteration(model, trajectory, clean, cond, per_step_backward=per_step_backward)
    return tracker.report()


@dataclass(frozen=True)
class ZeroStateBytes:
    """Bytes per rank of the model state ZeRO-3 keeps partitioned (mixed precision, AdamW)."""

    params_bytes: int  # this rank's partition of the low-precision weights
    grads_bytes: int  # this rank's partition of the gradients (low precision)
    optimizer_bytes: int  # fp32 master weights + Adam m and v, this rank's partition

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def zero3_state_bytes(
    num_params: int, world_size: int, *, precision: str = "bf16"
) -> ZeroStateBytes:
    """ZeRO paper (Rajbhandari et al. 2020, Sec. 3): 2 + 2 + 12 bytes/param, all divided by N.

    In fp32 there is no separate master copy: 4 (weights) + 4 (grads) + 8 (Adam m, v).
    """
    per_rank = -(-num_params // world_size)  # ZeRO pads partitions to equal size
    if precision == "fp32":
        return ZeroStateBytes(4 * per_rank, 4 * per_rank, 8 * per_rank)
    return ZeroStateBytes(2 * per_rank, 2 * per_rank, 12 * per_rank)


@dataclass(frozen=True)
class RankMemoryEstimate:
    """Peak bytes per rank of one iteration, by term."""

    gathered_params_bytes: int
    zero_state_bytes: int
    bucket_bytes: int
    activation_peak_bytes: int
    host_bytes: int = 0  # offloaded activations (block_offload / offload), host memory per rank

    @property
    def peak_bytes(self) -> int:
        return (
            self.gathered_params_bytes
            + self.zero_state_bytes
            + self.bucket_bytes
            + self.activation_peak_bytes
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def estimate_rank_memory(
    *,
    num_params: int,
    world_size: int,
    activation_peak_bytes: int,
    ds_zero_config: dict[str, Any],
    precision: str = "bf16",
    host_bytes: int = 0,
) -> RankMemoryEstimate:
    """Adds ZeRO-3's per-rank terms (from the ds_config's ``zero_optimization``) to a measured
    activation peak.

    Gathered parameters: ZeRO-3 keeps up to ``stage3_max_live_parameters`` elements gathered (the
    shipped configs allow 1e9, i.e. all of a 0.6B model, which is also what gathering once per
    iteration holds). Buckets: one gradient reduce bucket and one parameter prefetch bucket.
    """
    element_bytes = 4 if precision == "fp32" else 2
    max_live = int(ds_zero_config.get("stage3_max_live_parameters", 1_000_000_000))
    gathered = min(num_params, max_live) * element_bytes
    buckets = element_bytes * (
        int(ds_zero_config.get("reduce_bucket_size", 500_000_000))
        + int(ds_zero_config.get("stage3_prefetch_bucket_size", 50_000_000))
    )
    buckets = min(buckets, 2 * num_params * element_bytes)  # buckets never exceed the model
    state = zero3_state_bytes(num_params, world_size, precision=precision)
    return RankMemoryEstimate(
        gathered_params_bytes=gathered,
        zero_state_bytes=state.total_bytes,
        bucket_bytes=buckets,
        activation_peak_bytes=activation_peak_bytes,
        host_bytes=host_bytes,
    )


class UpperBoundShapes(TorchDispatchMode):
    """Data-dependent shapes under ``FakeTensorMode`` at their upper bound (enter it inside the
    fake mode).

    A boolean-mask index (``x[:, mask]``) or ``nonzero`` has an output size that depends on the
    values, which fake tensors do not have (``DynamicOutputShapeException``). For a memory
    estimate the largest size is the safe one: here every mask element counts as selected (the
    mask's positions become long indices, all of them), so the op returns the size it would have
    with an all-True mask. In the losses such masks are small (the energy score's m x m pair
    mask): the bound adds a few bytes.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.nonzero.default:
            source = args[0]
            return torch.empty(
                (source.numel(), source.dim()), dtype=torch.long, device=source.device
            )
        if func is aten.index.Tensor:
            source, indices = args[0], list(args[1])
            expanded: list[torch.Tensor | None] = []
            for index in indices:
                if index is not None and index.dtype == torch.bool:
                    # All positions of the mask, one long index tensor per mask dimension.
                    grids = torch.meshgrid(
                        *[torch.arange(n, device=index.device) for n in index.shape],
                        indexing="ij",
                    )
                    expanded.extend(grid.reshape(-1) for grid in grids)
                else:
                    expanded.append(index)
            return func(source, expanded, **kwargs)
        return func(*args, **kwargs)
