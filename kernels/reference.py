"""Pure-torch references for the fused kernels: the ground truth the tests compare against.

Both are written for clarity, not speed: every intermediate is float32 and materialised.

* :func:`attention_reference` is exact softmax attention (the full ``(Nq, Nk)`` score matrix).
* :func:`timestep_embedding_reference` restates diffusers' ``get_timestep_embedding`` followed by
  ``TimestepEmbedding`` (Linear -> SiLU -> Linear), the way PixArt-α's ``adaln_single`` calls them.

Nothing here is used by the kernels or their torch backends (those are SDPA and eager torch in
the op packages), so a test against these is a test against an independent implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["attention_reference", "timestep_embedding_reference"]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` in float32, returned in ``q.dtype``.

    q ``(B, H, Nq, D)``, k/v ``(B, H, Nk, D)``, ``key_padding_mask`` ``(B, Nk)`` bool, True =
    attend. A query whose keys are all masked gets a zero output (and zero gradients), the
    convention of the fused kernel; plain ``softmax`` would give NaN there.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if key_padding_mask is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        keep = key_padding_mask[:, None, None, :]
        has_key = key_padding_mask.any(dim=-1)[:, None, None, None]
        # Rows without any key are given finite (zero) scores so softmax stays finite, then
        # their probabilities are zeroed: output 0 and no gradient flows through them.
        scores = torch.where(keep, scores, float("-inf"))
        scores = torch.where(has_key, scores, 0.0)
        probs = torch.softmax(scores, dim=-1) * has_key
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


def timestep_embedding_reference(
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
) -> torch.Tensor:
    """``Linear_2(SiLU(Linear_1(sinusoid(t))))`` as diffusers computes it, ``(B,) -> (B, D_out)``.

    The sinusoid is float32; it is cast to the first weight's dtype before the first linear (as
    PixArt casts it to the hidden dtype); the result has the second weight's dtype.
    """
    half = linear_1_weight.shape[1] // 2
    exponent = -math.log(max_period) * torch.arange(
        0, half, dtype=torch.float32, device=timesteps.device
    )
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    hidden = F.silu(F.linear(emb.to(linear_1_weight.dtype), linear_1_weight, linear_1_bias))
    return F.linear(hidden.to(linear_2_weight.dtype), linear_2_weight, linear_2_bias)
