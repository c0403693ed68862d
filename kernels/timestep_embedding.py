"""Fused timestep embedding: sinusoid -> Linear -> SiLU -> Linear (PixArt-α's ``adaln_single``).

diffusers computes it as ``Timesteps`` (arange, exp, mul, sin, cos, two cats) then
``TimestepEmbedding`` (Linear, SiLU, Linear): about a dozen kernel launches forward and as many
backward, on tensors of a few KB. It runs once per sampler step, K times per sample per
iteration, so it is pure launch overhead. Here:

* forward: one Triton kernel builds the sinusoid in registers, multiplies by ``W1``, adds ``b1``
  and applies SiLU (the ``(B, 256)`` sinusoid never reaches memory); the second Linear is one
  ``F.linear`` (cuBLAS ``addmm``: a ``(B, D) x (D, D)`` GEMM with D = 1152 is what cuBLAS does
  best, and a Triton GEMM would not beat it);
* backward: three cuBLAS/torch ops for the second Linear (``dh = dy W2``, ``dW2 = dy^T h``,
  ``db2 = sum dy``) and one Triton kernel for the first, which recomputes the sinusoid and the
  pre-activation, applies SiLU' and reduces ``dW1 = dpre^T emb`` and ``db1 = sum dpre`` over the
  batch in one pass (nothing but ``t`` and ``h`` is saved).

Layers: ``_temb_*_kernel`` -> ``_temb_forward`` / ``_temb_backward_first`` ->
:class:`TimestepEmbeddingFunction` -> :func:`timestep_embedding` -> :class:`FusedTimestepEmbedding`
(state-dict compatible with ``TimestepEmbedding``: ``linear_1.*``, ``linear_2.*``).

Numerics: the frequency table is computed by torch with diffusers' exact ops and read by the
kernel, so ``t * freq`` rounds as in diffusers; sin/cos are libdevice's (full range reduction;
timesteps reach 1000 rad). The sinusoid is rounded to ``W1``'s dtype before the first matmul, as
PixArt rounds it to the hidden dtype; all accumulation is fp32; fp32 weights use IEEE dots.
Timesteps are not differentiable here (they are integers in PixArt; a timestep requiring grad
raises).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn
from torch.autograd.function import once_differentiable
from triton.language.extra import libdevice

from .flash_attention import (
    BACKENDS,
    INTERPRETED,
    Backend,
    _device_guard,
    _dot_precision,
    resolve_backend,
    triton_available,
)
from .reference import sinusoidal_frequencies, timestep_embedding_reference

__all__ = ["FusedTimestepEmbedding", "TimestepEmbeddingFunction", "timestep_embedding"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _sinusoid(t, freqs, scale, USE_LIBDEVICE: tl.constexpr):
    """``(cos, sin)`` of ``scale * t[:, None] * freqs[None, :]``, each ``(len(t), len(freqs))``."""
    args = scale * (t[:, None] * freqs[None, :])
    if USE_LIBDEVICE:
        # libdevice's sinf/cosf reduce any fp32 argument exactly; the default lowering may use
        # the approximate instructions, whose error grows past |x| ~ 100 pi.
        cos = libdevice.cos(args)
        sin = libdevice.sin(args)
    else:
        cos = tl.cos(args)
        sin = tl.sin(args)
    return cos, sin


@triton.jit
def _temb_fwd_kernel(
    T,
    FREQS,
    W1,
    B1,
    H,
    n_rows,
    n_out,
    stride_w1,
    stride_h,
    scale,
    HALF: tl.constexpr,
    FLIP: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``h[b, j] = silu(emb(t_b) . W1[j] + b1[j])`` for a BLOCK_B x BLOCK_J tile of ``h``.

    ``emb = [cos, sin]`` (FLIP, PixArt) or ``[sin, cos]``: W1's columns split the same way, so the
    concatenation is two dots into one accumulator and never built.
    """
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    chans = tl.arange(0, HALF)
    t = tl.load(T + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
    cos, sin = _sinusoid(t, tl.load(FREQS + chans), scale, USE_LIBDEVICE)
    if FLIP:
        first, second = cos, sin
    else:
        first, second = sin, cos
    w_ptrs = W1 + outs[:, None] * stride_w1 + chans[None, :]
    w_mask = outs[:, None] < n_out
    w_first = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_second = tl.load(w_ptrs + HALF, mask=w_mask, other=0.0)
    wdt = W1.dtype.element_ty
    pre = tl.dot(first.to(wdt), tl.trans(w_first), input_precision=DOT_PRECISION)
    pre = tl.dot(second.to(wdt), tl.trans(w_second), pre, input_precision=DOT_PRECISION)
    pre += tl.load(B1 + outs, mask=outs < n_out, other=0.0).to(tl.float32)[None, :]
    h = pre * tl.sigmoid(pre)
    h_ptrs = H + rows[:, None] * stride_h + outs[None, :]
    tl.store(
        h_ptrs, h.to(H.dtype.element_ty), mask=(rows[:, None] < n_rows) & (outs[None, :] < n_out)
    )


@triton.jit
def _temb_bwd_kernel(
    T,
    FREQS,
    W1,
    B1,
    DH,
    DW1,
    DB1,
    n_rows,
    n_out,
    stride_w1,
    stride_dh,
    stride_dw1,
    scale,
    HALF: tl.constexpr,
    FLIP: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``dW1[j] = sum_b dpre[b, j] emb(t_b)``, ``db1[j] = sum_b dpre[b, j]`` for BLOCK_J rows j.

    ``dpre = dh * silu'(pre)`` with ``pre`` recomputed; one program owns its rows of dW1 and loops
    over the whole batch, so the reduction needs no atomics.
    """
    pid_j = tl.program_id(0)
    outs = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    chans = tl.arange(0, HALF)
    offs_b = tl.arange(0, BLOCK_B)
    freqs = tl.load(FREQS + chans)
    w_ptrs = W1 + outs[:, None] * stride_w1 + chans[None, :]
    w_mask = outs[:, None] < n_out
    w_first = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_second = tl.load(w_ptrs + HALF, mask=w_mask, other=0.0)
    b1 = tl.load(B1 + outs, mask=outs < n_out, other=0.0).to(tl.float32)
    wdt = W1.dtype.element_ty
    dw_first = tl.zeros([BLOCK_J, HALF], dtype=tl.float32)
    dw_second = tl.zeros([BLOCK_J, HALF], dtype=tl.float32)
    db = tl.zeros([BLOCK_J], dtype=tl.float32)
    for start_b in range(0, n_rows, BLOCK_B):
        rows = start_b + offs_b
        t = tl.load(T + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
        cos, sin = _sinusoid(t, freqs, scale, USE_LIBDEVICE)
        if FLIP:
            first, second = cos.to(wdt), sin.to(wdt)
        else:
            first, second = sin.to(wdt), cos.to(wdt)
        pre = tl.dot(first, tl.trans(w_first), input_precision=DOT_PRECISION)
        pre = tl.dot(second, tl.trans(w_second), pre, input_precision=DOT_PRECISION)
        pre += b1[None, :]
        sig = tl.sigmoid(pre)
        dh_ptrs = DH + rows[:, None] * stride_dh + outs[None, :]
        dh_mask = (rows[:, None] < n_rows) & (outs[None, :] < n_out)
        dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0).to(tl.float32)
        # silu'(x) = sig(x) * (1 + x * (1 - sig(x))); padded batch rows have dh = 0.
        dpre = dh * sig * (1.0 + pre * (1.0 - sig))
        db += tl.sum(dpre, 0)
        dpre_t = tl.trans(dpre.to(wdt))
        dw_first = tl.dot(dpre_t, first, dw_first, input_precision=DOT_PRECISION)
        dw_second = tl.dot(dpre_t, second, dw_second, input_precision=DOT_PRECISION)
    dw_ptrs = DW1 + outs[:, None] * stride_dw1 + chans[None, :]
    dw_dt = DW1.dtype.element_ty
    tl.store(dw_ptrs, dw_first.to(dw_dt), mask=w_mask)
    tl.store(dw_ptrs + HALF, dw_second.to(dw_dt), mask=w_mask)
    tl.store(DB1 + outs, db.to(DB1.dtype.element_ty), mask=outs < n_out)


# Tiles: BLOCK_B >= 16 is tl.dot's minimum (batches of 8 are padded); BLOCK_J keeps the two
# (BLOCK_J, 128) weight halves plus the fp32 dW1 accumulators in registers.
_BLOCK_B = 16
_FWD_BLOCK_J = 32 if INTERPRETED else 64
_BWD_BLOCK_J = 32
_NUM_WARPS = 4


def _temb_forward_first(
    timesteps: torch.Tensor,
    freqs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    scale: float,
    flip_sin_to_cos: bool,
) -> torch.Tensor:
    """Launch the forward kernel: ``h = silu(Linear_1(sinusoid(t)))``, ``(B, D)`` in W1's dtype."""
    n_rows, n_out = timesteps.shape[0], w1.shape[0]
    h = torch.empty((n_rows, n_out), device=w1.device, dtype=w1.dtype)
    grid = (triton.cdiv(n_rows, _BLOCK_B), triton.cdiv(n_out, _FWD_BLOCK_J))
    with _device_guard(w1.device):
        _temb_fwd_kernel[grid](
            timesteps,
            freqs,
            w1,
            b1,
            h,
            n_rows,
            n_out,
            w1.stride(0),
            h.stride(0),
            scale,
            HALF=freqs.shape[0],
            FLIP=flip_sin_to_cos,
            USE_LIBDEVICE=not INTERPRETED,
            DOT_PRECISION=_dot_precision(w1.dtype),
            BLOCK_B=_BLOCK_B,
            BLOCK_J=_FWD_BLOCK_J,
            num_warps=_NUM_WARPS,
        )
    return h


def _temb_backward_first(
    dh: torch.Tensor,
    timesteps: torch.Tensor,
    freqs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    scale: float,
    flip_sin_to_cos: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``(dW1, db1)`` in the dtypes of W1 and b1."""
    n_rows, n_out = dh.shape
    dh = dh if dh.stride(1) == 1 else dh.contiguous()
    dw1 = torch.empty_like(w1, memory_format=torch.contiguous_format)
    db1 = torch.empty_like(b1)
    with _device_guard(w1.device):
        _temb_bwd_kernel[(triton.cdiv(n_out, _BWD_BLOCK_J),)](
            timesteps,
            freqs,
            w1,
            b1,
            dh,
            dw1,
            db1,
            n_rows,
            n_out,
            w1.stride(0),
            dh.stride(0),
            dw1.stride(0),
            scale,
            HALF=freqs.shape[0],
            FLIP=flip_sin_to_cos,
            USE_LIBDEVICE=not INTERPRETED,
            DOT_PRECISION=_dot_precision(w1.dtype),
            BLOCK_B=_BLOCK_B,
            BLOCK_J=_BWD_BLOCK_J,
            num_warps=_NUM_WARPS,
        )
    return dw1, db1


class TimestepEmbeddingFunction(torch.autograd.Function):
    """Fused ``Linear_2(SiLU(Linear_1(sinusoid(t))))``; saves only ``t`` and ``h`` (B x D)."""

    @staticmethod
    def forward(
        ctx: Any,
        timesteps: torch.Tensor,
        freqs: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        scale: float,
        flip_sin_to_cos: bool,
    ) -> torch.Tensor:
        h = _temb_forward_first(timesteps, freqs, w1, b1, scale, flip_sin_to_cos)
        ctx.save_for_backward(timesteps, freqs, w1, b1, w2, h)
        ctx.scale, ctx.flip_sin_to_cos = scale, flip_sin_to_cos
        return F.linear(h.to(w2.dtype), w2, b2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        timesteps, freqs, w1, b1, w2, h = ctx.saved_tensors
        dy = dy.to(w2.dtype)
        need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[2:6]
        dw2 = dy.t().mm(h.to(w2.dtype)) if need_w2 else None
        db2 = dy.sum(0) if need_b2 else None
        dw1 = db1 = None
        if need_w1 or need_b1:
            dh = dy.mm(w2)
            dw1, db1 = _temb_backward_first(
                dh, timesteps, freqs, w1, b1, ctx.scale, ctx.flip_sin_to_cos
            )
        return None, None, dw1, db1, dw2, db2, None, None


def _check_timestep_inputs(
    timesteps: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> None:
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    if timesteps.requires_grad:
        raise ValueError("timestep_embedding does not differentiate with respect to timesteps")
    if b1 is None or b2 is None:
        raise ValueError("timestep_embedding needs both Linear layers to have biases")
    if w1.dim() != 2 or w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"linear weights must be (D, C) and (D_out, D), got {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    if b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],):
        raise ValueError(
            f"bias shapes {tuple(b1.shape)}, {tuple(b2.shape)} do not match the weights"
        )
    if w1.dtype not in _DTYPES or b1.dtype != w1.dtype:
        raise TypeError(
            f"linear_1 weight/bias must share a float dtype, got {w1.dtype}, {b1.dtype}"
        )
    devices = {x.device for x in (timesteps, w1, b1, w2, b2)}
    if len(devices) != 1:
        raise ValueError(
            f"timesteps and weights are on different devices: {sorted(map(str, devices))}"
        )


def timestep_embedding(
    timesteps: torch.Tensor,
    linear_1_weight: torch.Tensor,
    linear_1_bias: torch.Tensor,
    linear_2_weight: torch.Tensor,
    linear_2_bias: torch.Tensor,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
    backend: Backend = "auto",
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Linear_2(SiLU(Linear_1(sinusoid(t))))``: ``(B,)`` timesteps -> ``(B, D_out)``.

    The sinusoid is diffusers' ``get_timestep_embedding(t, C, flip_sin_to_cos,
    downscale_freq_shift, scale, max_period)`` with ``C = linear_1_weight.shape[1]``; PixArt-α uses
    ``C = 256, flip_sin_to_cos=True, downscale_freq_shift=0``. The output has linear_2's dtype.
    ``freqs``: the table of :func:`sinusoidal_frequencies` (computed if None; Triton path only).
    ``backend``: "triton" (the fused kernels), "torch" (the reference ops), "auto" (Triton for
    CUDA tensors).
    """
    _check_timestep_inputs(
        timesteps, linear_1_weight, linear_1_bias, linear_2_weight, linear_2_bias
    )
    num_channels = linear_1_weight.shape[1]
    kwargs = {
        "flip_sin_to_cos": flip_sin_to_cos,
        "downscale_freq_shift": downscale_freq_shift,
        "scale": scale,
        "max_period": max_period,
    }
    if resolve_backend(backend, timesteps) == "torch":
        return timestep_embedding_reference(
            timesteps, linear_1_weight, linear_1_bias, linear_2_weight, linear_2_bias, **kwargs
        )
    reason = triton_available(timesteps)
    if reason is not None:
        raise RuntimeError(f"timestep_embedding(backend='triton'): {reason}")
    half = num_channels // 2
    if num_channels % 2 or half < 16 or half & (half - 1):
        raise ValueError(
            "the fused timestep embedding needs 2 * (a power of two >= 16) sinusoid channels, "
            f"got {num_channels}"
        )
    if INTERPRETED and torch.bfloat16 in (linear_1_weight.dtype, linear_2_weight.dtype):
        raise TypeError("the Triton interpreter (TRITON_INTERPRET=1) does not support bfloat16")
    if freqs is None:
        freqs = sinusoidal_frequencies(
            num_channels,
            downscale_freq_shift=downscale_freq_shift,
            max_period=max_period,
            device=timesteps.device,
        )
    return TimestepEmbeddingFunction.apply(
        timesteps.contiguous(),
        freqs,
        linear_1_weight if linear_1_weight.stride(1) == 1 else linear_1_weight.contiguous(),
        linear_1_bias,
        linear_2_weight,
        linear_2_bias,
        float(scale),
        bool(flip_sin_to_cos),
    )


def _register_zero3_external_parameters(module: nn.Module, owners: tuple[nn.Module, ...]) -> None:
    """Tell ZeRO-3 that ``module``'s forward uses the parameters of ``owners`` (a no-op without it)."""
    try:
        from deepspeed.runtime.zero import register_external_parameter
    except ImportError:  # DeepSpeed is optional for the kernels themselves
        return
    for owner in owners:
        for parameter in owner.parameters():
            register_external_parameter(module, parameter)


class FusedTimestepEmbedding(nn.Module):
    """diffusers' ``Timesteps`` + ``TimestepEmbedding`` as one fused op.

    Owns ``linear_1`` and ``linear_2`` (the very ``nn.Linear`` modules of the ``TimestepEmbedding``
    it replaces, so parameters, optimizer state and state-dict keys are unchanged); the sinusoid
    has no parameters. Its ``forward`` reads the Linear weights directly instead of calling the
    Linear modules, so DeepSpeed ZeRO-3 must gather them when *this* module runs: they are
    registered as its external parameters (``deepspeed.zero.register_external_parameter``), which
    ZeRO-3 fetches in this module's pre-forward and pre-backward hooks and reduces through the
    usual per-parameter gradient hooks. (Not a ZeRO-3 *leaf* module: DeepSpeed reduces a leaf's
    gradients in a backward hook that fires once per call, and the sampler calls this module K
    times per iteration, so the first hook would reduce and free a partial gradient.)
    """

    def __init__(
        self,
        linear_1: nn.Linear,
        linear_2: nn.Linear,
        *,
        flip_sin_to_cos: bool = True,
        downscale_freq_shift: float = 0.0,
        scale: float = 1.0,
        max_period: float = 10000.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.linear_1 = linear_1
        self.linear_2 = linear_2
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale
        self.max_period = max_period
        self.backend = backend
        _register_zero3_external_parameters(self, (linear_1, linear_2))
        # Frequency table per device (not a buffer: `.half()` / `.to(bf16)` would round it).
        self._freqs: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_diffusers(
        cls, time_proj: nn.Module, timestep_embedder: nn.Module, *, backend: Backend = "auto"
    ) -> FusedTimestepEmbedding:
        """Fuse a diffusers ``Timesteps`` and the ``TimestepEmbedding`` that follows it."""
        for name in ("num_channels", "flip_sin_to_cos", "downscale_freq_shift", "scale"):
            if not hasattr(time_proj, name):
                raise TypeError(f"{type(time_proj).__name__} is not a diffusers Timesteps module")
        embedder = timestep_embedder
        if not all(hasattr(embedder, n) for n in ("linear_1", "act", "linear_2")):
            raise TypeError(f"{type(embedder).__name__} is not a diffusers TimestepEmbedding")
        if not isinstance(embedder.act, nn.SiLU):
            raise ValueError(f"only SiLU is fused, the embedder uses {type(embedder.act).__name__}")
        if getattr(embedder, "cond_proj", None) is not None or getattr(embedder, "post_act", None):
            raise ValueError("TimestepEmbedding with cond_proj or post_act is not supported")
        if embedder.linear_1.in_features != time_proj.num_channels:
            raise ValueError(
                f"Timesteps gives {time_proj.num_channels} channels, linear_1 takes "
                f"{embedder.linear_1.in_features}"
            )
        return cls(
            embedder.linear_1,
            embedder.linear_2,
            flip_sin_to_cos=bool(time_proj.flip_sin_to_cos),
            downscale_freq_shift=float(time_proj.downscale_freq_shift),
            scale=float(time_proj.scale),
            backend=backend,
        )

    def _frequencies(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The cached frequency table where the Triton path will read it, else None."""
        if resolve_backend(self.backend, timesteps) == "torch":
            return None
        freqs = self._freqs.get(timesteps.device)
        if freqs is None:
            freqs = sinusoidal_frequencies(
                self.linear_1.in_features,
                downscale_freq_shift=self.downscale_freq_shift,
                max_period=self.max_period,
                device=timesteps.device,
            )
            self._freqs[timesteps.device] = freqs
        return freqs

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``(B,)`` timesteps -> ``(B, D_out)`` in ``linear_2``'s dtype."""
        return timestep_embedding(
            timesteps,
            self.linear_1.weight,
            self.linear_1.bias,
            self.linear_2.weight,
            self.linear_2.bias,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
            max_period=self.max_period,
            backend=self.backend,
            freqs=self._frequencies(timesteps),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.linear_1.in_features}, flip_sin_to_cos={self.flip_sin_to_cos}, "
            f"downscale_freq_shift={self.downscale_freq_shift}, backend={self.backend!r}"
        )
