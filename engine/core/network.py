"""The network seam: one call convention over diffusers denoisers, and per-step copies.

The network knows nothing of noise or schedules: it maps ``(x_t, timestep, conditioning)`` to its
raw prediction. :func:`denoise` hides the differences between diffusers models (PixArt's
``added_cond_kwargs``, UNet's positional ``timestep``, learned-sigma outputs with 2C channels,
``return_dict``) so the sampler and trajectory can treat every denoiser the same.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Conditioning",
    "denoise",
    "per_step_networks",
    "pixart_size_conditions",
    "unwrap",
    "uses_size_conditions",
]


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of one batch.

    ``encoder_hidden_states``: (B, L, D_text) text-encoder output.
    ``encoder_attention_mask``: (B, L), 1/True = a real token, 0 = padding; None = no padding.
    ``added_cond_kwargs``: model-specific extras. PixArt-MS (sample_size 128, e.g.
    PixArt-LCM-XL-2-1024-MS) needs ``resolution`` (B, 2) = image (height, width) in pixels and
    ``aspect_ratio`` (B, 1) = height / width, both float (see :func:`pixart_size_conditions`).
    """

    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor | None = None
    added_cond_kwargs: Mapping[str, torch.Tensor | None] | None = None

    def __post_init__(self) -> None:
        states, mask = self.encoder_hidden_states, self.encoder_attention_mask
        if states.dim() != 3:
            raise ValueError(
                f"encoder_hidden_states must be (B, L, D), got shape {tuple(states.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(
                f"encoder_attention_mask must be (B, L) = {tuple(states.shape[:2])}, "
                f"got {tuple(mask.shape)}"
            )
        batch = states.shape[0]
        for name, width in _SIZE_CONDITIONS.items():
            value = (self.added_cond_kwargs or {}).get(name)
            if value is not None and tuple(value.shape) != (batch, width):
                raise ValueError(
                    f"added_cond_kwargs[{name!r}] must be ({batch}, {width}), "
                    f"got {tuple(value.shape)}"
                )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """On ``device``; the text states in ``dtype`` (default: theirs). The mask keeps its
        dtype and the size conditions stay float32: PixArt embeds them through a float32
        sinusoid, and bf16 would round an aspect ratio of 0.5625 or a size of 1000."""
        added = None
        if self.added_cond_kwargs is not None:
            added = {
                k: None if v is None else v.to(device, torch.float32)
                for k, v in self.added_cond_kwargs.items()
            }
        mask = self.encoder_attention_mask
        return Conditioning(
            self.encoder_hidden_states.to(device, dtype),
            None if mask is None else mask.to(device),
            added,
        )

    def select(self, rows: slice) -> Conditioning:
        """The conditioning of samples ``rows`` (a slice of the batch)."""
        mask = self.encoder_attention_mask
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: None if v is None else v[rows] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(
            self.encoder_hidden_states[rows], None if mask is None else mask[rows], added
        )


# PixArt-MS's size conditions and their widths per sample.
_SIZE_CONDITIONS = {"resolution": 2, "aspect_ratio": 1}


def pixart_size_conditions(
    heights: Sequence[float], widths: Sequence[float]
) -> dict[str, torch.Tensor]:
    """PixArt-MS's ``added_cond_kwargs`` for images of ``heights[i]`` x ``widths[i]`` pixels:
    ``resolution`` (B, 2) = (height, width) and ``aspect_ratio`` (B, 1) = height / width, float32,
    as ``PixArtAlphaPipeline`` builds them."""
    if len(heights) != len(widths):
        raise ValueError(f"{len(heights)} heights but {len(widths)} widths")
    resolution = torch.tensor([[float(h), float(w)] for h, w in zip(heights, widths, strict=True)])
    aspect_ratio = resolution[:, :1] / resolution[:, 1:]
    return {"resolution": resolution.reshape(-1, 2), "aspect_ratio": aspect_ratio.reshape(-1, 1)}


def uses_size_conditions(model: nn.Module) -> bool:
    """Whether ``model`` (a PixArt-MS) embeds resolution / aspect ratio (``added_cond_kwargs``)."""
    return bool(getattr(unwrap(model), "use_additional_conditions", False))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside wrappers that expose it as ``.module`` (DeepSpeed, DDP)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def denoise(
    model: nn.Module, sample: torch.Tensor, timestep: int | torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """Raw network prediction (epsilon / v / x0, per the model) for ``sample`` at ``timestep``.

    ``timestep``: one int for the whole batch (sampler steps), or a (B,) integer tensor (one per
    sample, as the diffusion objective draws them).

    ``sample``: (B, C, H, W) latent. Returns (B, C, H, W); of a learned-sigma model's 2C output
    channels only the first C (the mean prediction) are returned, as diffusers' pipelines do.
    """
    accepted = _forward_parameters(type(unwrap(model)))
    batch = sample.shape[0]
    if cond.encoder_hidden_states.shape[0] != batch:
        raise ValueError(
            f"conditioning batch {cond.encoder_hidden_states.shape[0]} != sample batch {batch}"
        )
    if isinstance(timestep, torch.Tensor):
        if tuple(timestep.shape) != (batch,):
            raise ValueError(f"timestep tensor must be ({batch},), got {tuple(timestep.shape)}")
        timesteps = timestep.to(sample.device)
    else:
        timesteps = torch.full((batch,), timestep, dtype=torch.long, device=sample.device)
    kwargs: dict[str, object] = {
        "timestep": timesteps,
        "encoder_hidden_states": cond.encoder_hidden_states,
    }
    if cond.encoder_attention_mask is not None:
        if "encoder_attention_mask" not in accepted:
            raise ValueError(
                f"{type(unwrap(model)).__name__}.forward takes no encoder_attention_mask, but the "
                "conditioning has one"
            )
        kwargs["encoder_attention_mask"] = cond.encoder_attention_mask
    if "added_cond_kwargs" in accepted:
        added = dict(cond.added_cond_kwargs or {})
        if uses_size_conditions(model):
            missing = [k for k in _SIZE_CONDITIONS if added.get(k) is None]
            if missing:
                # Without this check diffusers fails deep inside the timestep embedding with
                # "'NoneType' object has no attribute 'flatten'".
                raise ValueError(
                    f"{type(unwrap(model)).__name__} uses additional conditions (PixArt-MS, "
                    f"use_additional_conditions=True) but the conditioning has no {missing}: "
                    "pass Conditioning(..., added_cond_kwargs=pixart_size_conditions(heights, "
                    "widths)); latent shards carry them per sample"
                )
        for key in _SIZE_CONDITIONS:
            added.setdefault(key, None)
        kwargs["added_cond_kwargs"] = added
    if "return_dict" in accepted:
        kwargs["return_dict"] = False
    out = model(sample, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    elif not isinstance(out, torch.Tensor):
        out = out.sample
    channels = sample.shape[1]
    if out.shape[1] == 2 * channels:
        out = out[:, :channels]
    elif out.shape[1] != channels:
        raise ValueError(
            f"denoiser returned {out.shape[1]} channels for a {channels}-channel sample "
            f"(expected {channels} or {2 * channels} with learned sigma)"
        )
    return out


def per_step_networks(model: nn.Module, num_steps: int) -> nn.ModuleList:
    """``num_steps`` independent copies of ``model`` (paper App. D.1: no sharing across steps).

    All copies start from the same weights; step ``i`` of the trajectory uses copy ``i``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return nn.ModuleList([copy.deepcopy(model) for _ in range(num_steps)])


def step_network(networks: nn.Module | Sequence[nn.Module], index: int) -> nn.Module:
    """The network of sampler step ``index``: the shared one, or the step's own copy."""
    if isinstance(networks, nn.ModuleList | list | tuple):
        return networks[index]
    return networks


def repeat_conditioning(cond: Conditioning, repeats: int) -> Conditioning:
    """Each prompt's conditioning ``repeats`` times in a row (rows i·m .. i·m+m-1 = prompt i):
    the conditioning of m trajectories per prompt."""
    if repeats == 1:
        return cond

    def rep(value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else value.repeat_interleave(repeats, dim=0)

    extras = cond.added_cond_kwargs
    return dataclasses.replace(
        cond,
        encoder_hidden_states=rep(cond.encoder_hidden_states),
        encoder_attention_mask=rep(cond.encoder_attention_mask),
        added_cond_kwargs=None if extras is None else {k: rep(v) for k, v in extras.items()},
    )
