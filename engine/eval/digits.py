"""Sample-quality metrics for the embedded digits, offline: classifier FD and prompted accuracy.

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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..config.data import DataConfig
from ..core.network import Conditioning
from ..core.sampling import generate_pixels, save_grid
from ..data.digits import DigitsDataset, digit_prompt
from ..objectives.reward import fit_classifier
from .common import frechet_distance, load_export, scored_schedules, seed_summary

__all__ = [
    "DigitClassifier",
    "DigitEvaluator",
    "DigitScores",
    "evaluate_export",
    "score_networks",
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    return fit_classifier(
        model,
        images,
        labels,
        augment=lambda batch, g: _random_shift(batch, 1, g),
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
    )


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
        self,
        data_config: DataConfig,
        *,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
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
        self, data_config: DataConfig, seed: int, cache_dir: str | os.PathLike | None
    ) -> DigitClassifier:
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
            "train_real": seed_summary([asdict(d) for d in draws], ("fd", "accuracy")),
            "class_means": asdict(self.score(means[wanted], wanted)),
            "gaussian_noise": asdict(self.score(noise, wanted)),
        }


def digit_prompts(dataset: DigitsDataset, per_class: int) -> tuple[Any, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(per_class)
    states, mask = dataset.encode([digit_prompt(int(c)) for c in labels])
    # With the empty prompt, for a sampler that guides (sampler.guidance_scale > 1).
    null = dataset.null_condition
    unconditional = Conditioning(null["encoder_hidden_states"], null["encoder_attention_mask"])
    return Conditioning(states, mask, unconditional=unconditional), labels


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
    export_dir = Path(export_dir)
    device = torch.device(device)
    config, networks, decode = load_export(export_dir, device)
    if evaluator is None:
        evaluator = DigitEvaluator(config.data)
    results: dict[str, Any] = {"export": str(export_dir), "per_class": evaluator.per_class}
    results["num_steps"] = score_networks(
        networks,
        config,
        decode,
        evaluator,
        num_steps=num_steps,
        seeds=seeds,
        device=device,
        grid_dir=grid_dir,
    )
    return results


def score_networks(
    networks: nn.Module,
    config: Any,
    decode: Any,
    evaluator: DigitEvaluator,
    *,
    num_steps: Sequence[int],
    seeds: Sequence[int],
    device: torch.device,
    grid_dir: str | Path | None = None,
    solver: Callable[[Conditioning, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Per K: the digit scores of each sampling seed and their mean / std (see
    :func:`evaluate_export`); ``config`` gives the sampler and whether networks are per step.
    ``solver``: a deterministic sampler in place of the config's (``generate_pixels``)."""
    cond, labels = digit_prompts(evaluator.train_set, evaluator.per_class)
    by_k: dict[str, Any] = {}
    for k, schedule in scored_schedules(config, num_steps, by_k):
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
                solver=solver,
            )
            scores.append(evaluator.score(pixels, labels))
            if grid_dir is not None and seed == seeds[0]:
                first = torch.cat([pixels[c * evaluator.per_class :][:10] for c in range(10)]).cpu()
                save_grid(first, Path(grid_dir) / f"K{k}.png", nrow=10)
        per_seed = [asdict(s) for s in scores]
        by_k[str(k)] = {"per_seed": per_seed, **seed_summary(per_seed, ("fd", "accuracy"))}
    return by_k
