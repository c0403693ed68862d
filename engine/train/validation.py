"""``run.validation_prompts``: the user's prompts, encoded once at start-up by the run's text
encoder, sampled every ``run.sample_every_steps`` at each K of ``run.validation_num_steps``
(default: the run's K) with the same seeds every time, written as captioned PNG grids
(``samples/validation-K<k>-step<N>.png``) and logged to every tracker as ``validation/K<k>``.

Rank 0 encodes the prompts and broadcasts their tensors (they are few; ZeRO-3's gathers need
every rank in the sampling forward, so every rank needs the conditioning); only rank 0 writes. The encoder: the digits'
own tiny T5 (``DigitsDataset.encode``), else the one a shard or prompt folder's ``index.json``
records (:class:`~e2ed2.engine.data.prompt_encoder.PromptEncoder`), freed after encoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, TrainConfig
from ..core.network import Conditioning
from ..core.sampler import build_schedule
from ..core.sampling import generate_pixels, save_captioned_grid
from ..data import derive_seed, sample_conditioning
from ..data.digits import DigitsDataset
from ..data.prompt_encoder import PromptEncoder
from ..data.prompt_file import resolve_prompts
from .metrics import MetricsLog

__all__ = ["ValidationPrompts"]


class ValidationPrompts:
    """The encoded validation prompts of a run and the K values they are sampled at."""

    def __init__(
        self, config: TrainConfig, dataset: Any, device: torch.device, dtype: torch.dtype
    ) -> None:
        run = config.run
        # Rank 0 encodes and sends the few prompts' tensors to the others: one text encoder
        # loaded per node's rank 0 instead of per rank (PixArt's T5-XXL: 9.5 GB in bf16).
        encoded: tuple[list[str], Conditioning] | str
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                prompts = resolve_prompts(run.validation_prompts, "run.validation_prompts")
                encoded = (prompts, _encode(prompts, dataset, device, dtype))
            except (ValueError, FileNotFoundError, OSError) as error:
                encoded = str(error)
                if "run.validation_prompts" not in encoded:
                    encoded = f"run.validation_prompts: {encoded}"
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [encoded if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
            received = box[0]
            assert received is not None  # rank 0 always sends its prompts or its error
            encoded = received
        if isinstance(encoded, str):  # every rank stops with rank 0's message
            raise ConfigError(encoded)
        self.prompts, self.cond = encoded
        self.num_steps = tuple(run.validation_num_steps) or (config.trajectory.num_steps,)
        self.schedules = {k: build_schedule(config.sampler, k) for k in self.num_steps}
        self.latent_shape = tuple(dataset.latent_shape)
        self.rows_per_batch = run.batch_per_rank
        self.seed = run.seed

    def sample(
        self,
        networks: nn.Module,
        decode,
        null_cond: Conditioning | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> dict[int, torch.Tensor]:
        """Pixels in [-1, 1] per K, (N, C, H, W) on the CPU. Batches of ``run.batch_per_rank``
        prompts, each batch's noise seeded by (run.seed, "validation", batch number): the same
        draws at every call, for every K."""
        pixels: dict[int, torch.Tensor] = {}
        count = len(self.prompts)
        for k, schedule in self.schedules.items():
            parts = []
            for number, start in enumerate(range(0, count, self.rows_per_batch)):
                rows = _rows(self.cond, start, min(start + self.rows_per_batch, count))
                part = generate_pixels(
                    networks,
                    schedule,
                    decode,
                    rows.with_unconditional(null_cond),
                    self.latent_shape,
                    seed=derive_seed(self.seed, "validation", number),
                    device=device,
                    dtype=dtype,
                )
                parts.append(part.cpu())
            pixels[k] = torch.cat(parts)
        return pixels

    def write(
        self, pixels: dict[int, torch.Tensor], output_dir: Path, step: int, metrics: MetricsLog
    ) -> list[Path]:
        """One captioned grid per K into ``output_dir/samples``, logged to every tracker."""
        paths = []
        for k, images in pixels.items():
            path = output_dir / "samples" / f"validation-K{k}-step{step:08d}.png"
            grid = save_captioned_grid(images, self.prompts, path)
            metrics.images(f"validation/K{k}", [grid], step, captions=[" | ".join(self.prompts)])
            paths.append(path)
        return paths


def _encode(
    prompts: list[str], dataset: Any, device: torch.device, dtype: torch.dtype
) -> Conditioning:
    """The prompts' conditioning (CPU, float32), as the dataset's own captions are encoded."""
    if isinstance(dataset, DigitsDataset):
        states, mask = dataset.encode(prompts)
        return Conditioning(states.float().cpu(), mask.cpu())
    index, root = getattr(dataset, "index", None), getattr(dataset, "root", None)
    if not isinstance(index, dict):
        raise ValueError(f"the data ({type(dataset).__name__}) records no text encoder")
    # fp16's range is too small for T5's activations (PixArt encodes in bf16 or fp32).
    encode_dtype = torch.float32 if dtype == torch.float16 else dtype
    encoder = PromptEncoder.from_index(index, root, device=device, dtype=encode_dtype)
    tensors = {name: t.cpu() for name, t in encoder.encode(prompts).items()}
    del encoder  # the encoder's weights go now: only the few prompts' states are kept
    if device.type == "cuda":
        torch.cuda.empty_cache()
    text_mask = tensors.get("encoder_attention_mask")
    added = _size_conditions(dataset, len(prompts))
    return Conditioning(
        tensors["encoder_hidden_states"].float(),
        None if text_mask is None else text_mask.long(),
        added,
        pooled_projections=(
            None if "pooled_projections" not in tensors else tensors["pooled_projections"].float()
        ),
    )


def _size_conditions(dataset: Any, count: int) -> dict[str, torch.Tensor] | None:
    """PixArt-MS's size conditions where the data carries them: the grid's crop (height, width)
    in pixels and its aspect ratio, the same for every prompt."""
    cond, _ = sample_conditioning(dataset, 1)
    if not cond.added_cond_kwargs:
        return None
    height, width = dataset.bucket_sizes[dataset.grid_bucket]
    return {
        "resolution": torch.tensor([[float(height), float(width)]]).expand(count, 2).clone(),
        "aspect_ratio": torch.tensor([[height / width]]).expand(count, 1).clone(),
    }


def _rows(cond: Conditioning, start: int, stop: int) -> Conditioning:
    """Rows ``start:stop`` of a batch's conditioning (no unconditional part yet)."""
    added = cond.added_cond_kwargs
    return Conditioning(
        cond.encoder_hidden_states[start:stop],
        None if cond.encoder_attention_mask is None else cond.encoder_attention_mask[start:stop],
        None if not added else {k: v[start:stop] for k, v in added.items() if v is not None},
        pooled_projections=(
            None if cond.pooled_projections is None else cond.pooled_projections[start:stop]
        ),
    )
