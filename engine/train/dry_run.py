"""``e2ed2 train --dry-run``'s model check: one denoiser forward and one decode under fake tensors.

Reading a config and its files cannot tell whether the denoiser accepts the data: a PixArt-MS
(sample_size 128) needs the resolution / aspect-ratio conditions, a bf16 sample must meet a VAE
in a dtype it can run. Those failed only at the first training step. Here the denoiser and the
VAE are built from their ``config.json`` under ``FakeTensorMode`` (no weights are read, nothing
is allocated, so a 0.6B model costs nothing), in the run's compute dtype as the trainer builds
them, and run once on the first real batch of the data (its latents, text and size conditions
made fake): the shapes, dtypes and keyword arguments of that forward are the real ones. With
aspect-ratio buckets the batch is taken from the largest bucket (most latent pixels: the
run's memory peak and its longest token sequence).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import TrainConfig
from ..core.models import build_autoencoder, build_denoiser
from ..core.network import Conditioning, denoise
from ..core.sampler import build_schedule
from ..data import LatentShardDataset, build_dataset
from ..data.prompts import batch_conditioning, null_conditioning, stack_items
from ..data.storage import COMPUTE_DTYPES
from .step_estimate import check_fits, estimate_step, format_estimate

__all__ = ["COMPUTE_DTYPES", "dry_run_estimate", "dry_run_forward"]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Fake parameters cannot be swapped by Module.to(dtype): build them in the dtype instead.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def dry_run_forward(config: TrainConfig) -> str:
    """Runs the first sampler step's denoiser call (and, with a VAE, the decode of its output)
    on one batch of the data under fake tensors; returns a one-line summary. Raises what the
    first training step would raise (e.g. ValueError naming missing size conditions)."""
    dtype = COMPUTE_DTYPES[config.run.precision]
    dataset = build_dataset(config.data)
    indices: Sequence[int] = range(len(dataset))
    if isinstance(dataset, LatentShardDataset):
        shapes = dataset.bucket_latent_shapes
        largest = shapes.index(dataset.largest_latent_shape)
        indices = dataset.bucket_members(largest).tolist()
    batch = stack_items([dataset[i] for i in indices[: config.run.batch_per_rank]])
    channels, latent_size = dataset.latent_shape[0], dataset.base_latent_size
    _, text_dim = dataset.text_shape
    schedule = build_schedule(config.sampler, config.trajectory.num_steps)

    mode = FakeTensorMode()
    with mode, _default_dtype(dtype):
        denoiser = build_denoiser(
            config.model,
            latent_channels=channels,
            latent_size=latent_size,
            text_dim=text_dim,
            pooled_dim=getattr(dataset, "pooled_dim", None),
            load_weights=False,
        )
        autoencoder = build_autoencoder(config.model, load_weights=False)
    # The trainer's conversions, on the real batch; then the tensors become fake.
    # Classifier-free guidance's empty prompt: a folder without one is refused, as by the trainer.
    null = null_conditioning(dataset, config.sampler.guidance_scale)
    cond = batch_conditioning(batch).to("cpu", dtype)
    fake = mode.from_tensor
    added = cond.added_cond_kwargs
    pooled = cond.pooled_projections
    cond = Conditioning(
        fake(cond.encoder_hidden_states),
        None if cond.encoder_attention_mask is None else fake(cond.encoder_attention_mask),
        None if added is None else {k: None if v is None else fake(v) for k, v in added.items()},
        pooled_projections=None if pooled is None else fake(pooled),
    )
    if null is not None:
        null = null.to("cpu", dtype)
        null_pooled = null.pooled_projections  # SD3
        cond = cond.with_unconditional(
            Conditioning(
                fake(null.encoder_hidden_states),
                # SD3's empty prompt has no mask (it attends to every token).
                None if null.encoder_attention_mask is None else fake(null.encoder_attention_mask),
                pooled_projections=None if null_pooled is None else fake(null_pooled),
            )
        )
    latents = fake(batch.latents.to(dtype))
    with mode, torch.no_grad():
        scale = config.sampler.guidance_scale
        prediction = denoise(denoiser, latents, schedule.timestep(0), cond, guidance_scale=scale)
        pixels = autoencoder.decode(prediction)
    sizes = "" if added is None else ", size conditions resolution/aspect_ratio"
    if null is not None:
        sizes += f", guidance_scale {config.sampler.guidance_scale:g} (doubled batch)"
    if pooled is not None:
        sizes += f", pooled projections {tuple(pooled.shape)}"
    return (
        f"dry run: denoiser forward {tuple(latents.shape)} {str(dtype).removeprefix('torch.')} "
        f"with text {tuple(cond.encoder_hidden_states.shape)}{sizes} -> decode "
        f"{tuple(pixels.shape)}: ok (fake tensors, no weights loaded)"
    )


def dry_run_estimate(config: TrainConfig, world_size: int) -> tuple[str, str | None]:
    """The whole step's memory per rank at ``world_size`` (train/step_estimate.py) as a table,
    and the refusal when it exceeds 92% of ``run.device_memory_gib`` (None: fits, or no device
    memory given)."""
    estimate = estimate_step(config, world_size=world_size)
    refusal = None
    if config.run.device_memory_gib is not None:
        refusal = check_fits(estimate, config.run.device_memory_gib)
    return format_estimate(estimate), refusal
