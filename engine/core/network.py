"""The network seam: one call convention over diffusers denoisers, and per-step copies.

The network knows nothing of noise or schedules: it maps ``(x_t, timestep, conditioning)`` to its
raw prediction. :func:`denoise` hides the differences between diffusers models (PixArt's
``added_cond_kwargs``, SD3's ``pooled_projections`` and float flow matching timesteps, Sana's
``timestep_scale`` and SANA-Sprint's ``guidance`` input, UNet's positional ``timestep``,
learned-sigma outputs with 2C channels, ``return_dict``) so the sampler and trajectory can treat
every denoiser the same. It asks the model's forward signature and config, never its class.

Size: one call convention over every family's forward (PixArt, SD3, Sana / SANA-Sprint) and the
Conditioning record it consumes; they change together, so they stay in one module.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

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
    ``unconditional``: the null conditioning of classifier-free guidance (the empty prompt
    encoded as the prompts are, PixArt's negative prompt ""): states (1 or B, L, D) with the
    same L and D, its mask or None, no ``added_cond_kwargs`` (both halves of a guided batch share
    the batch's size conditions). Read by :func:`denoise` only when it guides.
    ``pooled_projections``: (B, D_pooled) pooled text embedding of models that take one (SD3 /
    SD3.5: CLIP-L's and CLIP-G's projected embeddings concatenated, 2048 wide); None for the
    others. A guided SD3 batch needs the unconditional part's pooled projections too.
    """

    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor | None = None
    added_cond_kwargs: Mapping[str, torch.Tensor | None] | None = None
    unconditional: Conditioning | None = None
    pooled_projections: torch.Tensor | None = None

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
        pooled = self.pooled_projections
        if pooled is not None and (pooled.dim() != 2 or pooled.shape[0] != batch):
            raise ValueError(
                f"pooled_projections must be ({batch}, D_pooled), got {tuple(pooled.shape)}"
            )
        null = self.unconditional
        if null is not None:
            shape = tuple(null.encoder_hidden_states.shape)
            if shape[0] not in (1, batch) or shape[1:] != tuple(states.shape[1:]):
                raise ValueError(
                    f"unconditional states must be (1 or {batch}, {states.shape[1]}, "
                    f"{states.shape[2]}) like the prompts' (the empty prompt padded to the same "
                    f"length), got {shape}"
                )
            if null.added_cond_kwargs or null.unconditional is not None:
                raise ValueError(
                    "the unconditional part has no added_cond_kwargs or unconditional of its own"
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
        null = self.unconditional
        pooled = self.pooled_projections
        return Conditioning(
            self.encoder_hidden_states.to(device, dtype),
            None if mask is None else mask.to(device),
            added,
            None if null is None else null.to(device, dtype),
            None if pooled is None else pooled.to(device, dtype),
        )

    def select(self, rows: slice) -> Conditioning:
        """The conditioning of samples ``rows`` (a slice of the batch)."""
        mask = self.encoder_attention_mask
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: None if v is None else v[rows] for k, v in self.added_cond_kwargs.items()}
        null = self.unconditional
        if null is not None and null.encoder_hidden_states.shape[0] != 1:
            null = null.select(rows)
        pooled = self.pooled_projections
        return Conditioning(
            self.encoder_hidden_states[rows],
            None if mask is None else mask[rows],
            added,
            null,
            None if pooled is None else pooled[rows],
        )

    def with_unconditional(self, null: Conditioning | None) -> Conditioning:
        """This conditioning with ``null`` as its :attr:`unconditional` part."""
        return dataclasses.replace(self, unconditional=null)


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
    # ``type``, not type[nn.Module]: mypy does not take a type[...] as hashable for the cache.
    return frozenset(inspect.signature(cast("type[nn.Module]", cls).forward).parameters)


def denoise(
    model: nn.Module,
    sample: torch.Tensor,
    timestep: int | float | torch.Tensor,
    cond: Conditioning,
    *,
    guidance_scale: float = 1.0,
    embedded_guidance: float | None = None,
) -> torch.Tensor:
    """Raw network prediction (epsilon / v / x0, per the model) for ``sample`` at ``timestep``.

    ``timestep``: one int (LCM / DDIM) or float (flow matching) for the whole batch (sampler
    steps), or a (B,) tensor (one per sample, as the diffusion objective draws them).

    ``sample``: (B, C, H, W) latent. Returns (B, C, H, W); of a learned-sigma model's 2C output
    channels only the first C (the mean prediction) are returned, as diffusers' pipelines do.

    ``guidance_scale`` w > 1: classifier-free guidance exactly as ``PixArtAlphaPipeline``: one
    network call on the doubled batch (rows 0..B-1 ``cond.unconditional``, rows B..2B-1 the
    prompts; sample, timesteps and size conditions repeated), then
    ``uncond + w * (text - uncond)`` on the raw output, then the learned-sigma split. 1.0: the
    conditional call alone (no guidance, diffusers' ``guidance_scale <= 1``).

    ``embedded_guidance``: the guidance input of a guidance-distilled model (its config's
    ``guidance_embeds``, SANA-Sprint): every row gets ``embedded_guidance`` in the text states'
    dtype times the config's ``guidance_embeds_scale``, as SanaSprintPipeline builds it. Required
    by such a model, refused by any other.
    """
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
        # LCM / DDIM step at integer timesteps; flow matching at float ones (sigma * 1000, as
        # the SD3 pipeline passes them: float32, never rounded to an integer).
        dtype = torch.float32 if isinstance(timestep, float) else torch.long
        timesteps = torch.full((batch,), timestep, dtype=dtype, device=sample.device)
    if not guidance_scale >= 1:
        raise ValueError(f"guidance_scale must be >= 1 (1.0 = no guidance), got {guidance_scale}")
    if guidance_scale > 1:
        doubled = _guidance_batch(cond, guidance_scale)
        out = _network_output(
            model,
            torch.cat([sample, sample]),
            torch.cat([timesteps, timesteps]),
            doubled,
            embedded_guidance,
        )
        out_uncond, out_text = out.chunk(2)
        out = out_uncond + guidance_scale * (out_text - out_uncond)
    else:
        out = _network_output(model, sample, timesteps, cond, embedded_guidance)
    channels = sample.shape[1]
    if out.shape[1] == 2 * channels:
        out = out[:, :channels]
    elif out.shape[1] != channels:
        raise ValueError(
            f"denoiser returned {out.shape[1]} channels for a {channels}-channel sample "
            f"(expected {channels} or {2 * channels} with learned sigma)"
        )
    return out


def _guidance_batch(cond: Conditioning, guidance_scale: float) -> Conditioning:
    """The 2B-row conditioning of a guided call: [unconditional; prompts], as the pipeline
    concatenates ``negative_prompt_embeds`` before ``prompt_embeds`` (same for the masks); the
    size conditions are the batch's own, twice."""
    null = cond.unconditional
    if null is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs the unconditional (empty-prompt) conditioning: "
            "Conditioning(..., unconditional=...); latent shards store it in "
            "null_condition.safetensors (`e2ed2 precompute`)"
        )
    states = cond.encoder_hidden_states
    batch, length = states.shape[:2]
    null_states = null.encoder_hidden_states.to(states.dtype).expand(batch, -1, -1)
    mask, null_mask = cond.encoder_attention_mask, null.encoder_attention_mask
    if mask is not None or null_mask is not None:
        # A missing mask means "every token is real".
        like = mask if mask is not None else null_mask
        assert like is not None  # one of the two masks is present (checked above)
        if mask is None:
            mask = torch.ones(batch, length, dtype=like.dtype, device=like.device)
        if null_mask is None:
            null_mask = torch.ones_like(mask)
        mask = torch.cat([null_mask.to(mask.dtype).expand(batch, -1), mask])
    added = None
    if cond.added_cond_kwargs is not None:
        added = {
            k: None if v is None else torch.cat([v, v]) for k, v in cond.added_cond_kwargs.items()
        }
    pooled = cond.pooled_projections
    if pooled is not None:
        # SD3: the pipeline concatenates negative_pooled_prompt_embeds before the prompts' too.
        if null.pooled_projections is None:
            raise ValueError(
                "guidance with pooled_projections (SD3) needs the unconditional part's pooled "
                "projections (the empty prompt's)"
            )
        null_pooled = null.pooled_projections.to(pooled.dtype).expand(batch, -1)
        pooled = torch.cat([null_pooled, pooled])
    return Conditioning(torch.cat([null_states, states]), mask, added, None, pooled)


def _network_output(
    model: nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    embedded_guidance: float | None = None,
) -> torch.Tensor:
    """The model's raw output tensor (all its channels) for a (B,) ``timesteps`` tensor."""
    model_class: type = type(unwrap(model))
    accepted = _forward_parameters(model_class)
    config = getattr(unwrap(model), "config", None)
    timestep_scale = float(getattr(config, "timestep_scale", 1.0) or 1.0)
    if timestep_scale != 1.0:
        # Sana's config scales the float timestep (SanaPipeline: t * timestep_scale);
        # SanaSprintPipeline does not, so a guidance-distilled model with a scale is ambiguous.
        if getattr(config, "guidance_embeds", False):
            raise ValueError(
                f"{type(unwrap(model)).__name__} has guidance_embeds and timestep_scale="
                f"{timestep_scale}: Sana's pipeline scales the timestep, SANA-Sprint's does not"
            )
        timesteps = timesteps * timestep_scale
    kwargs: dict[str, object] = {
        "timestep": timesteps,
        "encoder_hidden_states": cond.encoder_hidden_states,
    }
    guided = bool(getattr(config, "guidance_embeds", False)) and "guidance" in accepted
    if guided != (embedded_guidance is not None):
        raise ValueError(
            f"{type(unwrap(model)).__name__} "
            + (
                "is guidance-distilled (guidance_embeds): set sampler.embedded_guidance_scale "
                "(SANA-Sprint's pipeline default: 4.5)"
                if guided
                else "has no guidance embedding: leave sampler.embedded_guidance_scale unset"
            )
        )
    if guided:
        # guided: the model has guidance_embeds (its config) and a scale was given (checked above)
        assert embedded_guidance is not None and config is not None
        guidance = torch.full(
            (sample.shape[0],), embedded_guidance, dtype=torch.float32, device=sample.device
        )
        kwargs["guidance"] = guidance.to(cond.encoder_hidden_states.dtype) * float(
            config.guidance_embeds_scale
        )
    if cond.encoder_attention_mask is not None:
        if "encoder_attention_mask" not in accepted:
            raise ValueError(
                f"{type(unwrap(model)).__name__}.forward takes no encoder_attention_mask, but the "
                "conditioning has one"
            )
        kwargs["encoder_attention_mask"] = cond.encoder_attention_mask
    if "pooled_projections" in accepted:
        if cond.pooled_projections is None:
            raise ValueError(
                f"{type(unwrap(model)).__name__} needs pooled_projections (SD3: the pooled CLIP "
                "embeddings, (B, 2048)): pass Conditioning(..., pooled_projections=...); latent "
                "shards precomputed from an SD3 pipeline folder carry them"
            )
        kwargs["pooled_projections"] = cond.pooled_projections
    elif cond.pooled_projections is not None:
        raise ValueError(
            f"{type(unwrap(model)).__name__}.forward takes no pooled_projections, but the "
            "conditioning has them (text encoded for SD3?)"
        )
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
    return out


def per_step_networks(model: nn.Module, num_steps: int) -> nn.ModuleList:
    """``num_steps`` independent copies of ``model`` (paper App. D.1: no sharing across steps).

    All copies start from the same weights; step ``i`` of the trajectory uses copy ``i``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return nn.ModuleList([copy.deepcopy(model) for _ in range(num_steps)])


def step_network(networks: nn.Module | Sequence[nn.Module], index: int) -> nn.Module:
    """The network of sampler step ``index``: the shared one, or the step's own (a copy, or a
    per-step adapter on a shared base: any ``Sequence``, as ``core.lora.PerStepLoRA``)."""
    if isinstance(networks, nn.ModuleList | Sequence):
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
    null = cond.unconditional
    if null is not None and null.encoder_hidden_states.shape[0] != 1:  # one null per prompt
        null = repeat_conditioning(null, repeats)
    return dataclasses.replace(
        cond,
        encoder_hidden_states=cond.encoder_hidden_states.repeat_interleave(repeats, dim=0),
        encoder_attention_mask=rep(cond.encoder_attention_mask),
        added_cond_kwargs=None if extras is None else {k: rep(v) for k, v in extras.items()},
        unconditional=null,
        pooled_projections=rep(cond.pooled_projections),
    )
