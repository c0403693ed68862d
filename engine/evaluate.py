"""Sample-quality metrics that run offline: the embedded digits, and FID / CLIP for real data.

Digits (no downloads): a small CNN classifier is trained on the digits *train* split (the split
the denoiser trains on); generated images are scored against the *held-out* split with

- ``fd``: the Fréchet distance (FID's formula) between the classifier's penultimate-layer
  features of generated and held-out real images, and
- ``accuracy``: the share of generated images the classifier reads as the prompted digit.

The FD estimate depends on the sample sizes, so every comparison uses the same number of images
per class as the held-out split has (``per_class``), and :meth:`DigitEvaluator.noise_floor`
reports what real images score: train-split images (a generator that reproduced its training
data exactly) and per-class mean images (a perfectly conditioned generator without diversity,
what an L2-trained few-step sampler tends towards).

Real data (``data.source="shards"``): :class:`RealDataScorer` wires torchmetrics'
``FrechetInceptionDistance`` and ``CLIPScore`` with weights from local paths only (InceptionV3 FID
weights as torch-fidelity's ``pt_inception-2015-12-05`` file, a local ``transformers`` CLIP
folder). :func:`evaluate_shard_export` prompts an export with the first N samples of a shard
folder and scores its images against those samples' latents decoded by the same decoder, i.e.
VAE *reconstructions* of the real images (the shards hold no pixels), so the FID measures the
denoiser, not the VAE. :func:`real_data_metrics` scores two given image batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import DIGIT_WORDS, DataConfig, DigitsDataset

__all__ = [
    "DigitClassifier",
    "DigitEvaluator",
    "DigitScores",
    "RealDataScorer",
    "check_metric_paths",
    "evaluate_export",
    "evaluate_shard_export",
    "frechet_distance",
    "main",
    "real_data_metrics",
    "to_uint8",
    "train_digit_classifier",
]

# Penultimate feature width: small enough that a ~360-image covariance is well estimated.
FEATURE_DIM = 64
_CLASSIFIER_VERSION = 1  # bump when the architecture or its training recipe changes (cache key)


class DigitClassifier(nn.Module):
    """A 3-conv CNN for (B, 1, H, W) digits in [-1, 1]; ``features`` is the FD's feature space."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            # Any resolution >= 8 px maps to the same 4x4 grid.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(64 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.convs(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _random_shift(images: torch.Tensor, max_shift_px: int, g: torch.Generator) -> torch.Tensor:
    """Each image translated by up to ``max_shift_px`` in x and y, background (-1) filled in."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, [max_shift_px] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift_px + 1, (2, batch, 1), generator=g)
    rows = (dy + torch.arange(height))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(width))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(batch)[:, None, None, None]
    c = torch.arange(channels)[None, :, None, None]
    return padded[b, c, rows, cols]


def train_digit_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> DigitClassifier:
    """A :class:`DigitClassifier` trained on ``images`` (N, 1, H, W) / ``labels`` (N,), in eval
    mode. Deterministic for a given seed and thread count; the global RNG is left untouched.

    One-pixel random shifts augment the data so the features do not hinge on exact positions
    (generated digits are rarely pixel-aligned with the training set).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), batch_size):
            rows = order[start : start + batch_size]
            batch = _random_shift(images[rows], 1, g)
            loss = F.cross_entropy(model(batch), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two (N, D) feature sets.

    FID's formula in float64. ``tr((S_a S_b)^(1/2))`` is computed as the sum of the square roots
    of the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum), which stays
    exact when a covariance is singular (dead ReLU features, or a few distinct images) where a
    general matrix square root of ``S_a S_b`` is ill-conditioned.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("each feature set needs at least 2 rows for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    trace_root = float(np.sqrt(middle).sum())
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    return mean_term + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * trace_root


@dataclass(frozen=True)
class DigitScores:
    """Scores of one set of images: Fréchet distance to the held-out digits, prompted-digit
    accuracy (0..1), and how many images they came from."""

    fd: float
    accuracy: float
    num_images: int


class DigitEvaluator:
    """Scores digit images against the held-out split of ``data_config``'s digits.

    ``cache_dir``: where the classifier's weights are kept (safetensors, keyed by the data
    config and the recipe), so a series of evaluations uses one classifier; None = train it.
    """

    def __init__(
        self, data_config: DataConfig, *, seed: int = 0, cache_dir: str | Path | None = None
    ) -> None:
        if data_config.source != "digits":
            raise ValueError(
                f"DigitEvaluator needs data.source='digits', got {data_config.source!r}; "
                "use real_data_metrics for real datasets"
            )
        if data_config.holdout_fraction <= 0:
            raise ValueError("DigitEvaluator needs data.holdout_fraction > 0 (a held-out split)")
        self.train_set = DigitsDataset(data_config, "train")
        self.holdout = DigitsDataset(data_config, "holdout")
        self.classifier = self._classifier(data_config, seed, cache_dir)
        self.holdout_features = self.features(self.holdout.images)
        counts = torch.bincount(self.holdout.labels, minlength=10)
        #: Images per class of the held-out split (the smallest class): the sample size to use.
        self.per_class = int(counts.min())

    def _classifier(
        self, data_config: DataConfig, seed: int, cache_dir: str | Path | None
    ) -> DigitClassifier:
        from safetensors.torch import load_file, save_file

        key = json.dumps([asdict(data_config), seed, _CLASSIFIER_VERSION], sort_keys=True)
        name = f"digit_classifier_{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
        path = None if cache_dir is None else Path(cache_dir) / name
        if path is not None and path.is_file():
            model = DigitClassifier()
            model.load_state_dict(load_file(str(path)))
            return model.eval().requires_grad_(False)
        model = train_digit_classifier(self.train_set.images, self.train_set.labels, seed=seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return model

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.features(images.float().cpu()).numpy()

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> DigitScores:
        """``images`` (N, 1, H, W) in [-1, 1] generated for the digits ``labels`` (N,)."""
        if images.shape[1:] != self.holdout.images.shape[1:]:
            raise ValueError(
                f"images {tuple(images.shape[1:])} do not match the digits "
                f"{tuple(self.holdout.images.shape[1:])}"
            )
        images = images.float().cpu()
        predicted = self.classifier(images).argmax(1)
        accuracy = float((predicted == labels.cpu()).float().mean())
        fd = frechet_distance(self.features(images), self.holdout_features)
        return DigitScores(fd=fd, accuracy=accuracy, num_images=len(images))

    def noise_floor(self, *, num_draws: int = 5, seed: int = 0) -> dict[str, Any]:
        """Reference scores of real images, at the held-out split's per-class sample size.

        ``train_real``: random train-split images (``num_draws`` draws: mean and std), the best
        a generator reproducing its training data could score. ``holdout_self_accuracy``: the
        classifier's accuracy on the held-out images. ``class_means``: each class's mean train
        image repeated (perfect conditioning, no diversity). ``gaussian_noise``: N(0, 0.5^2)
        pixels clamped to [-1, 1].
        """
        g = torch.Generator().manual_seed(seed)
        labels = self.train_set.labels
        draws = []
        for _ in range(num_draws):
            rows = torch.cat(
                [
                    torch.nonzero(labels == c).flatten()[
                        torch.randperm(int((labels == c).sum()), generator=g)[: self.per_class]
                    ]
                    for c in range(10)
                ]
            )
            draws.append(self.score(self.train_set.images[rows], labels[rows]))
        wanted = torch.arange(10).repeat_interleave(self.per_class)
        means = torch.stack([self.train_set.images[labels == c].mean(0) for c in range(10)])
        noise = (0.5 * torch.randn((len(wanted), *means.shape[1:]), generator=g)).clamp(-1, 1)
        holdout_accuracy = float(
            (self.classifier(self.holdout.images).argmax(1) == self.holdout.labels).float().mean()
        )
        return {
            "per_class": self.per_class,
            "holdout_self_accuracy": holdout_accuracy,
            "train_real": _seed_summary([asdict(d) for d in draws], ("fd", "accuracy")),
            "class_means": asdict(self.score(means[wanted], wanted)),
            "gaussian_noise": asdict(self.score(noise, wanted)),
        }


def _seed_summary(per_seed: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """``<key>_mean`` / ``<key>_std`` (sample std; 0 for one seed) over the seeds that report
    ``key`` (a key no seed reports is left out), and ``num_seeds``."""
    out: dict[str, Any] = {}
    for key in keys:
        values = np.array([s[key] for s in per_seed if key in s])
        if len(values):
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out["num_seeds"] = len(per_seed)
    return out


def _scored_schedules(
    config: Any, num_steps: Sequence[int], by_k: dict[str, Any]
) -> Iterator[tuple[int, Any]]:
    """(K, sampler schedule) for each K an export can be sampled at; a K that per-step networks
    were not trained for is recorded in ``by_k`` as skipped instead."""
    from .sampler import build_schedule

    trained_steps = config.trajectory.num_steps
    for k in num_steps:
        if not config.model.share_across_steps and k != trained_steps:
            by_k[str(k)] = {"skipped": f"per-step networks trained for K={trained_steps}"}
            continue
        yield k, build_schedule(config.sampler, k)


def _digit_prompts(dataset: DigitsDataset, per_class: int) -> tuple[Any, torch.Tensor]:
    from .network import Conditioning

    labels = torch.arange(10).repeat_interleave(per_class)
    states, mask = dataset.encode([f"a handwritten digit {DIGIT_WORDS[int(c)]}" for c in labels])
    return Conditioning(states, mask), labels


def _load_export(export_dir: str | Path, device: torch.device) -> tuple[Any, nn.Module, Any]:
    """An export's config, its networks (eval mode, on ``device``) and its decoder (the VAE of
    ``model.vae_path``, or the identity in pixel space), as ``e2ed2 sample`` loads them."""
    from .config import load_config
    from .export import CONFIG_NAME, load_exported_networks
    from .models import build_autoencoder

    config = load_config(str(Path(export_dir) / CONFIG_NAME))
    networks = load_exported_networks(export_dir, config.trajectory.num_steps).to(device).eval()
    decode = build_autoencoder(config.model).to(device).decode
    return config, networks, decode


def evaluate_export(
    export_dir: str | Path,
    *,
    num_steps: Sequence[int] = (1, 2, 4),
    seeds: Sequence[int] = (0, 1, 2),
    evaluator: DigitEvaluator | None = None,
    grid_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Digit scores of an ``e2ed2 train`` export at each K in ``num_steps``, per sampling seed.

    Every K and seed draws ``evaluator.per_class`` images per digit from pure noise (the same
    noise for every export, so models are compared on identical seeds). Per-step networks are
    scored only at the K they were trained for. ``grid_dir``: also write a PNG of the first
    seed's first ten images per digit at each K.
    """
    from .sample import generate_pixels, save_grid

    export_dir = Path(export_dir)
    device = torch.device(device)
    config, networks, decode = _load_export(export_dir, device)
    if evaluator is None:
        evaluator = DigitEvaluator(config.data)
    cond, labels = _digit_prompts(evaluator.train_set, evaluator.per_class)
    results: dict[str, Any] = {"export": str(export_dir), "per_class": evaluator.per_class}
    by_k: dict[str, Any] = {}
    for k, schedule in _scored_schedules(config, num_steps, by_k):
        scores = []
        for seed in seeds:
            pixels = generate_pixels(
                networks,
                schedule,
                decode,
                cond,
                evaluator.train_set.latent_shape,
                seed=seed,
                device=device,
            )
            scores.append(evaluator.score(pixels, labels))
            if grid_dir is not None and seed == seeds[0]:
                first = torch.cat([pixels[c * evaluator.per_class :][:10] for c in range(10)]).cpu()
                save_grid(first, Path(grid_dir) / f"K{k}.png", nrow=10)
        per_seed = [asdict(s) for s in scores]
        by_k[str(k)] = {"per_seed": per_seed, **_seed_summary(per_seed, ("fd", "accuracy"))}
    results["num_steps"] = by_k
    return results


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

    def __init__(self, model: nn.Module) -> None:
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
    import inspect

    from torchmetrics.functional.multimodal.clip_score import _get_clip_model_and_processor
    from torchmetrics.multimodal.clip_score import CLIPScore

    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        model = _ClipEmbeddings(CLIPModel.from_pretrained(folder).eval())
        return model, CLIPProcessor.from_pretrained(folder)

    # Newer torchmetrics accept only hub names they know, or a callable returning (model,
    # processor); older ones pass any string to from_pretrained.
    takes_callable = "Callable" in str(
        inspect.signature(_get_clip_model_and_processor).parameters["model_name_or_path"]
    )
    return CLIPScore(model_name_or_path=load if takes_callable else str(folder))


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
    time (a bad sample is replaced by the dataset's next good one, caption included)."""
    from .network import Conditioning

    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        cond = Conditioning(
            torch.stack([it["encoder_hidden_states"] for it in items]),
            torch.stack([it["encoder_attention_mask"] for it in items]),
        )
        captions = [dataset.captions[int(it["index"])] for it in items]
        yield cond, torch.stack([it["latents"] for it in items]), captions


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
    import dataclasses

    from .data import build_dataset, derive_seed
    from .sample import generate_pixels, save_grid

    export_dir = Path(export_dir)
    device = torch.device(device)
    check_metric_paths(inception_weights, clip_model)
    config, networks, decode = _load_export(export_dir, device)
    data_config = config.data
    if shard_dir is not None:
        data_config = dataclasses.replace(data_config, shard_dir=str(shard_dir))
    dataset = build_dataset(data_config)
    count = min(num_images, len(dataset))
    scorer = RealDataScorer(
        inception_weights=inception_weights, clip_model=clip_model, device=device
    )
    with torch.no_grad():
        for _, latents, _ in _shard_batches(dataset, count, batch_size):
            scorer.add_reference(to_uint8(decode(latents.to(device))))

    by_k: dict[str, Any] = {}
    for k, schedule in _scored_schedules(config, num_steps, by_k):
        scores = []
        for seed in seeds:
            batches = _shard_batches(dataset, count, batch_size)
            for number, (cond, _, captions) in enumerate(batches):
                pixels = generate_pixels(
                    networks,
                    schedule,
                    decode,
                    cond,
                    dataset.latent_shape,
                    seed=derive_seed(seed, "evaluate", number),
                    device=device,
                )
                if grid_dir is not None and seed == seeds[0] and number == 0:
                    save_grid(pixels[:64].cpu(), Path(grid_dir) / f"K{k}.png", nrow=8)
                scorer.add_generated(to_uint8(pixels), captions)
            scores.append({"seed": seed, **scorer.compute()})
        by_k[str(k)] = {"per_seed": scores, **_seed_summary(scores, ("fid", "clip_score"))}
    return {
        "export": str(export_dir),
        "shard_dir": str(data_config.shard_dir),
        "num_images": count,
        "reference": "the prompts' own latents decoded by the export's decoder "
        "(VAE reconstructions of the real images)",
        "clip_model": None if clip_model is None else str(clip_model),
        "num_steps": by_k,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``e2ed2 evaluate EXPORT_OR_RUN_DIR``: scores at several K, as JSON.

    data.source='digits' exports: digit FD / accuracy (offline, nothing to download).
    data.source='shards' exports: FID (and CLIP score with --clip-model) of images generated for
    the first --num-images shard prompts, against those samples' latents decoded by the export's
    VAE (VAE reconstructions of the real images); weights from local paths only.
    """
    from .config import ConfigError, load_config
    from .export import CONFIG_NAME

    parser = argparse.ArgumentParser(
        prog="e2ed2 evaluate",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="an export folder, or a run output_dir (uses its export/)")
    parser.add_argument("--num-steps", type=int, nargs="+", default=[1, 2, 4], help="K values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    parser.add_argument("--out", default=None, help="JSON path (default: stdout)")
    parser.add_argument("--grid-dir", default=None, help="also write a sample grid per K here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    digits = parser.add_argument_group("digits exports (data.source='digits')")
    digits.add_argument(
        "--classifier-cache", default=None, help="folder caching the digit classifier's weights"
    )
    digits.add_argument(
        "--noise-floor", action="store_true", help="also report real-vs-real reference scores"
    )
    real = parser.add_argument_group(
        "latent-shard exports (data.source='shards'): FID against VAE reconstructions of the "
        "prompts' real images, CLIP score against their captions"
    )
    real.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help="required: torch-fidelity's InceptionV3 FID weights file "
        "(pt_inception-2015-12-05-6726825d.pth)",
    )
    real.add_argument(
        "--clip-model",
        metavar="DIR",
        default=None,
        help="a local transformers CLIP folder (config.json, weights, processor); adds clip_score",
    )
    real.add_argument(
        "--shard-dir",
        metavar="DIR",
        default=None,
        help="shard folder with the prompts and reference latents (default: the export "
        "config's data.shard_dir)",
    )
    real.add_argument(
        "--num-images",
        metavar="N",
        type=int,
        default=1000,
        help="prompts / reference images: the first N samples (capped at the dataset size)",
    )
    real.add_argument(
        "--batch-size", type=int, default=32, help="images generated and scored at a time"
    )
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"e2ed2 evaluate: {message}", file=sys.stderr)
        return 2

    root = Path(args.path)
    export = root if (root / CONFIG_NAME).is_file() else root / "export"
    if not (export / CONFIG_NAME).is_file():
        return fail(f"no {CONFIG_NAME} in {root} or {root / 'export'}")
    try:
        config = load_config(str(export / CONFIG_NAME))
    except ConfigError as err:
        return fail(str(err))
    if any(k < 1 for k in args.num_steps):
        return fail("--num-steps values must be >= 1")
    if config.data.source == "shards":
        if args.inception_weights is None:
            return fail(
                "--inception-weights PATH is required for data.source='shards' exports "
                "(torch-fidelity's InceptionV3 FID weights, pt_inception-2015-12-05-6726825d.pth)"
            )
        if args.num_images < 2 or args.batch_size < 1:
            return fail("--num-images must be >= 2 and --batch-size >= 1")
        try:
            check_metric_paths(args.inception_weights, args.clip_model)
        except FileNotFoundError as err:
            return fail(str(err))
        shard_dir = args.shard_dir or config.data.shard_dir
        option = "--shard-dir" if args.shard_dir else "data.shard_dir (from the export config)"
        if not (Path(shard_dir) / "index.json").is_file():
            hint = "" if args.shard_dir else "; pass --shard-dir to use another folder"
            return fail(
                f"{option} {shard_dir!r} has no index.json (make it with `e2ed2 precompute`)" + hint
            )
        try:
            results = evaluate_shard_export(
                export,
                inception_weights=args.inception_weights,
                clip_model=args.clip_model,
                shard_dir=shard_dir,
                num_images=args.num_images,
                num_steps=args.num_steps,
                seeds=args.seeds,
                batch_size=args.batch_size,
                grid_dir=args.grid_dir,
                device=args.device,
            )
        except ImportError as err:
            return fail(str(err))
    else:
        evaluator = DigitEvaluator(config.data, cache_dir=args.classifier_cache)
        results = evaluate_export(
            export,
            num_steps=args.num_steps,
            seeds=args.seeds,
            evaluator=evaluator,
            grid_dir=args.grid_dir,
            device=args.device,
        )
        if args.noise_floor:
            results["noise_floor"] = evaluator.noise_floor()
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
