"""Sample-quality metrics for real data (latent shards), with weights from local paths only.

Real data (``data.source="shards"``): :class:`RealDataScorer` wires torchmetrics'
``FrechetInceptionDistance`` and ``CLIPScore`` with weights from local paths only (InceptionV3 FID
weights as torch-fidelity's ``pt_inception-2015-12-05`` file, a local ``transformers`` CLIP
folder). :func:`evaluate_shard_export` prompts an export with the first N samples of a shard
folder and scores its images against those samples' latents decoded by the same decoder, i.e.
VAE *reconstructions* of the real images (the shards hold no pixels), so the FID measures the
denoiser, not the VAE. :func:`real_data_metrics` scores two given image batches.

"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.sampling import generate_pixels, save_grid
from ..data import build_dataset, derive_seed, null_conditioning
from ..data.prompts import batch_conditioning, stack_items
from .common import load_export, scored_schedules, seed_summary

if TYPE_CHECKING:
    from transformers import CLIPModel

__all__ = [
    "RealDataScorer",
    "check_metric_paths",
    "evaluate_shard_export",
    "real_data_metrics",
    "to_uint8",
]


def check_metric_paths(
    inception_weights: str | Path | None, clip_model: str | Path | None = None
) -> None:
    """Raises FileNotFoundError naming the option when a local metric weight path is unusable."""
    if inception_weights is None or not Path(inception_weights).is_file():
        raise FileNotFoundError(
            f"--inception-weights {str(inception_weights)!r} does not exist; expected torch-"
            "fidelity's InceptionV3 FID weights (pt_inception-2015-12-05-6726825d.pth)"
        )
    if clip_model is not None and not (Path(clip_model) / "config.json").is_file():
        raise FileNotFoundError(
            f"--clip-model {str(clip_model)!r} holds no config.json; expected a local "
            "transformers CLIP folder (e.g. openai/clip-vit-large-patch14 saved to disk)"
        )


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W), C = 1 or 3 -> uint8 (N, 3, H, W) in [0, 255] (1 channel is
    repeated to 3), the input FID and CLIP score take."""
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got {tuple(pixels.shape)}")
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _ClipEmbeddings(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings as tensors: transformers >= 5 returns output objects (``pooler_output``), which
    torchmetrics' CLIP score (<= 1.9) does not unpack."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _clip_score_metric(folder: Path) -> Any:
    """torchmetrics' ``CLIPScore`` with the model and processor of a local folder."""
    # lazy: torchmetrics adds ~6 s over torch; only real-data evaluation needs it
    from torchmetrics.functional.multimodal.clip_score import _get_clip_model_and_processor
    from torchmetrics.multimodal.clip_score import CLIPScore

    def load() -> tuple[Any, Any]:
        # lazy: transformers adds ~1 s over torch; only the CLIP score needs it
        from transformers import CLIPModel, CLIPProcessor

        model = _ClipEmbeddings(CLIPModel.from_pretrained(folder).eval())
        return model, CLIPProcessor.from_pretrained(folder)

    # Newer torchmetrics accept only hub names they know, or a callable returning (model,
    # processor); older ones pass any string to from_pretrained.
    takes_callable = "Callable" in str(
        inspect.signature(_get_clip_model_and_processor).parameters["model_name_or_path"]
    )
    # torchmetrics' annotation is the newer one (hub names or a callable).
    source = load if takes_callable else str(folder)
    return CLIPScore(model_name_or_path=source)  # type: ignore[arg-type]


class RealDataScorer:
    """FID against a fixed reference set, and the CLIP score of generated images vs captions.

    Reference images are fed once (:meth:`add_reference`); each generated set is fed with
    :meth:`add_generated` and scored with :meth:`compute`, which then forgets the generated set
    but keeps the reference statistics (``reset_real_features=False``), so several K and seeds
    are scored against one pass over the reference. Images: uint8 (N, 3, H, W), fed in batches
    of any size. Weights come from local paths only; nothing is downloaded.
    """

    def __init__(
        self,
        *,
        inception_weights: str | Path,
        clip_model: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        check_metric_paths(inception_weights, clip_model)
        try:
            # lazy: torchmetrics adds ~6 s over torch; only real-data evaluation needs it
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:
            raise ImportError(
                "FID / CLIP score on real data need torchmetrics and torch-fidelity "
                "(pip install torchmetrics torch-fidelity)"
            ) from err
        self.device = torch.device(device)
        self.fid = FrechetInceptionDistance(
            feature=2048,
            reset_real_features=False,
            feature_extractor_weights_path=str(inception_weights),
        ).to(self.device)
        self.clip = None if clip_model is None else _clip_score_metric(Path(clip_model))
        if self.clip is not None:
            self.clip = self.clip.to(self.device)
        self.num_reference = 0
        self.num_generated = 0

    @torch.no_grad()
    def add_reference(self, images: torch.Tensor) -> None:
        self.fid.update(images.to(self.device), real=True)
        self.num_reference += len(images)

    @torch.no_grad()
    def add_generated(self, images: torch.Tensor, captions: Sequence[str] | None = None) -> None:
        if self.clip is not None:
            if captions is None or len(captions) != len(images):
                raise ValueError("the CLIP score needs one caption per generated image")
            self.clip.update(images.to(self.device), list(captions))
        self.fid.update(images.to(self.device), real=False)
        self.num_generated += len(images)

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """Scores of the images added since the last call; the reference is kept."""
        if self.num_reference < 2 or self.num_generated < 2:
            raise ValueError(
                f"FID needs at least 2 reference and 2 generated images, got "
                f"{self.num_reference} and {self.num_generated}"
            )
        out = {"fid": float(self.fid.compute())}
        self.fid.reset()
        if self.clip is not None:
            out["clip_score"] = float(self.clip.compute())
            self.clip.reset()
        self.num_generated = 0
        return out


def real_data_metrics(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    inception_weights: str | Path,
    captions: Sequence[str] | None = None,
    clip_model: str | Path | None = None,
) -> dict[str, float]:
    """FID (torchmetrics, InceptionV3 weights from ``inception_weights``) between uint8 image
    batches (N, 3, H, W), and the CLIP score of ``generated`` vs ``captions`` when a local
    ``clip_model`` folder is given. Nothing is downloaded: missing paths fail, naming them.
    To score several generated sets against one reference, use :class:`RealDataScorer`."""
    check_metric_paths(inception_weights, clip_model)
    if clip_model is not None and (captions is None or len(captions) != len(generated)):
        raise ValueError("the CLIP score needs one caption per generated image")
    scorer = RealDataScorer(inception_weights=inception_weights, clip_model=clip_model)
    scorer.add_reference(reference)
    scorer.add_generated(generated, captions)
    return scorer.compute()


def _shard_batches(dataset: Any, count: int, batch_size: int):
    """(conditioning, latents, captions) of the first ``count`` samples, ``batch_size`` at a
    time (a bad sample is replaced by the dataset's next good one, caption included); with
    aspect-ratio buckets each batch holds one bucket's samples (one latent shape)."""
    buckets = dataset.sample_buckets[:count].tolist()
    for bucket in dict.fromkeys(buckets):  # buckets in order of their first sample
        group = [i for i in range(count) if buckets[i] == bucket]
        for start in range(0, len(group), batch_size):
            items = [dataset[i] for i in group[start : start + batch_size]]
            batch = stack_items(items)
            # With the samples' PixArt-MS size conditions, which a 1024-MS model cannot run
            # without.
            cond = batch_conditioning(batch)
            captions = [dataset.captions[int(it["index"])] for it in items]
            yield cond, batch.latents, captions


def evaluate_shard_export(
    export_dir: str | Path,
    *,
    inception_weights: str | Path,
    clip_model: str | Path | None = None,
    shard_dir: str | Path | None = None,
    num_images: int = 1000,
    num_steps: Sequence[int] = (1, 2, 4),
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 32,
    grid_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """FID (and CLIP score) of a latent-shard export at each K in ``num_steps``, per seed.

    Prompts are the stored text embeddings of the first ``num_images`` samples of ``shard_dir``
    (default: the export's ``data.shard_dir``), capped at the dataset size. The FID reference is
    those samples' latents decoded by the export's decoder: VAE reconstructions of the real
    images, not the originals. Images are generated and scored ``batch_size`` at a time; batch
    ``b`` of seed ``s`` starts from the noise of seed ``derive_seed(s, "evaluate", b)``, so
    exports are compared on identical noise. Per-step networks are scored only at their K.
    """
    export_dir = Path(export_dir)
    device = torch.device(device)
    check_metric_paths(inception_weights, clip_model)
    config, networks, decode = load_export(export_dir, device)
    data_config = config.data
    if shard_dir is not None:
        data_config = dataclasses.replace(data_config, shard_dir=str(shard_dir))
    dataset = build_dataset(data_config)
    null = null_conditioning(dataset, config.sampler.guidance_scale)  # None: no guidance
    count = min(num_images, len(dataset))
    scorer = RealDataScorer(
        inception_weights=inception_weights, clip_model=clip_model, device=device
    )
    with torch.no_grad():
        for _, latents, _ in _shard_batches(dataset, count, batch_size):
            scorer.add_reference(to_uint8(decode(latents.to(device))))

    by_k: dict[str, Any] = {}
    for k, schedule in scored_schedules(config, num_steps, by_k):
        scores = []
        for seed in seeds:
            batches = _shard_batches(dataset, count, batch_size)
            for number, (cond, latents, captions) in enumerate(batches):
                pixels = generate_pixels(
                    networks,
                    schedule,
                    decode,
                    cond.with_unconditional(null),
                    latents.shape[1:],  # the batch's bucket
                    seed=derive_seed(seed, "evaluate", number),
                    device=device,
                )
                if grid_dir is not None and seed == seeds[0] and number == 0:
                    save_grid(pixels[:64].cpu(), Path(grid_dir) / f"K{k}.png", nrow=8)
                scorer.add_generated(to_uint8(pixels), captions)
            scores.append({"seed": seed, **scorer.compute()})
        by_k[str(k)] = {"per_seed": scores, **seed_summary(scores, ("fid", "clip_score"))}
    return {
        "export": str(export_dir),
        "shard_dir": str(data_config.shard_dir),
        "num_images": count,
        "reference": "the prompts' own latents decoded by the export's decoder "
        "(VAE reconstructions of the real images)",
        "clip_model": None if clip_model is None else str(clip_model),
        "num_steps": by_k,
    }
