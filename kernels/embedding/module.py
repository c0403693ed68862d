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

Layers: ``kernels`` (``_temb_*_kernel``) -> ``launcher`` (``temb_forward_first`` /
``temb_backward_first``) -> ``function`` (:class:`TimestepEmbeddingFunction`) -> ``module``
(:func:`timestep_embedding`, :class:`FusedTimestepEmbedding`, state-dict compatible with
``TimestepEmbedding``: ``linear_1.*``, ``linear_2.*``). The torch backend is the same math in
eager torch (the module calls its own ``nn.Linear`` children, exactly like diffusers'
``TimestepEmbedding``), not the test reference.

Numerics: the frequency table is computed by torch with diffusers' exact ops and read by the
kernel, so ``t * freq`` rounds as in diffusers; sin/cos are libdevice's (full range reduction;
timesteps reach 1000 rad). The sinusoid is rounded to ``W1``'s dtype before the first matmul, as
PixArt rounds it to the hidden dtype; all accumulation is fp32; fp32 weights use IEEE dots.
Timesteps are not differentiable here (they are integers in PixArt; a timestep requiring grad
raises).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .._triton import BACKENDS, INTERPRETED, Backend, resolve_backend, triton_available
from .function import TimestepEmbeddingFunction

if TYPE_CHECKING:
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

__all__ = [
    "FusedTimestepEmbedding",
    "sinusoidal_embedding",
    "sinusoidal_frequencies",
    "timestep_embedding",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def sinusoidal_frequencies(
    num_channels: int,
    *,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``num_channels // 2`` float32 frequencies of diffusers' ``get_timestep_embedding``.

    Computed with exactly diffusers' ops so that ``timestep * freq`` rounds identically in the
    fused kernel (which reads this table) and in diffusers.
    """
    half = num_channels // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - downscale_freq_shift))


def sinusoidal_embedding(
    timesteps: torch.Tensor,
    num_channels: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """The torch backend's sinusoid, ``(B,)`` -> ``(B, C)`` float32 (diffusers' op order).

    ``[cos, sin]`` of ``scale * t * freq`` (``flip_sin_to_cos``, PixArt) or ``[sin, cos]``.
    """
    freqs = sinusoidal_frequencies(
        num_channels,
        downscale_freq_shift=downscale_freq_shift,
        max_period=max_period,
        device=timesteps.device,
    )
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


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
    ``backend``: "triton" (the fused kernels), "torch" (eager torch: sinusoid, ``F.linear``,
    ``F.silu``, ``F.linear``), "auto" (Triton for CUDA tensors).
    """
    _check_timestep_inputs(
        timesteps, linear_1_weight, linear_1_bias, linear_2_weight, linear_2_bias
    )
    num_channels = linear_1_weight.shape[1]
    if resolve_backend(backend, timesteps) == "torch":
        emb = sinusoidal_embedding(
            timesteps,
            num_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            downscale_freq_shift=downscale_freq_shift,
            scale=scale,
            max_period=max_period,
        )
        hidden = F.silu(F.linear(emb.to(linear_1_weight.dtype), linear_1_weight, linear_1_bias))
        return F.linear(hidden.to(linear_2_weight.dtype), linear_2_weight, linear_2_bias)
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
    try:  # lazy: the kernels do not depend on DeepSpeed (absent: nothing to register)
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
        cls,
        time_proj: Timesteps,
        timestep_embedder: TimestepEmbedding,
        *,
        backend: Backend = "auto",
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
        if resolve_backend(self.backend, timesteps) == "torch":
            # diffusers' TimestepEmbedding, through the Linear modules themselves (so their
            # hooks, e.g. ZeRO-3's or an adapter's, run as in the stock model).
            emb = sinusoidal_embedding(
                timesteps,
                self.linear_1.in_features,
                flip_sin_to_cos=self.flip_sin_to_cos,
                downscale_freq_shift=self.downscale_freq_shift,
                scale=self.scale,
                max_period=self.max_period,
            )
            hidden = F.silu(self.linear_1(emb.to(self.linear_1.weight.dtype)))
            return self.linear_2(hidden.to(self.linear_2.weight.dtype))
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
            backend="triton",
            freqs=self._frequencies(timesteps),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.linear_1.in_features}, flip_sin_to_cos={self.flip_sin_to_cos}, "
            f"downscale_freq_shift={self.downscale_freq_shift}, backend={self.backend!r}"
        )
